"""Faults lose at most the stage in flight: a run killed with SIGKILL inside any stage leaves only a
temporary, the rerun resumes from the cache and ends with the same bytes as an uninterrupted run;
a damaged artifact is recomputed, never consumed; the source model is never written.

The kill inside a stage uses the runner's one test hook, PIPELINE_FAULT=<stage>: the process SIGKILLs
itself right after the stage's `run` returns and before its manifest and rename, the worst moment
(every output file is written, none is committed). See docs/troubleshooting.md. Those runs are
separate processes forked from a preloaded server (`tiny_pipeline.run_killed_at`); the kill from
outside uses the real `python -m pipeline`.
"""

from __future__ import annotations

import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts
from pipeline.models import resolve_model_dir
from pipeline.stages import registry
from tiny_pipeline import (
    ROOT,
    STAGES,
    compose_config,
    pipeline_command,
    run_in_process,
    run_killed_at,
    snapshot,
    subprocess_env,
    temporaries,
)


def copy_stages(reference_cache: Path, cache: Path, names: list[str]) -> None:
    for name in names:
        shutil.copytree(reference_cache / name, cache / name)


def committed(cache: Path, stage: str) -> list[str]:
    """Names of finished artifact directories of a stage (temporaries and locks start with a dot)."""
    folder = cache / stage
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def assert_same_outcome(cache: Path, summary: dict, reference_summary: dict) -> None:
    """Same keys, same plan bytes, same ablated tensors (and every other ablate file) as the reference."""
    keys = {name: info["key"] for name, info in summary["stages"].items()}
    assert keys == {name: info["key"] for name, info in reference_summary["stages"].items()}
    select_dir = Path(summary["stages"]["select"]["dir"])
    reference_select = Path(reference_summary["stages"]["select"]["dir"])
    assert (select_dir / "ablation.yaml").read_bytes() == (reference_select / "ablation.yaml").read_bytes()
    ablated = artifacts.read_manifest(Path(summary["stages"]["ablate"]["dir"]))["files"]
    reference_ablated = artifacts.read_manifest(Path(reference_summary["stages"]["ablate"]["dir"]))["files"]
    assert any(name.endswith(".safetensors") for name in ablated)
    assert ablated == reference_ablated
    assert temporaries(cache) == []


def affected_by(stage: str) -> list[str]:
    """The stage and every stage that (transitively) reads its artifact, in execution order."""
    stages = registry()
    hit = {stage}
    for name in STAGES:
        if hit & set(stages[name].needs):
            hit.add(name)
    return [name for name in STAGES if name in hit]


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_inside_a_stage_leaves_only_a_temporary_and_the_rerun_resumes(stage, tmp_path, reference, model_store):
    """The cache starts with every artifact the stage does not affect, as a run killed there would leave it."""
    reference_cache, reference_summary = reference
    unaffected = [name for name in STAGES if name not in affected_by(stage)]
    cache = tmp_path / "cache"
    copy_stages(reference_cache, cache, unaffected)
    key = reference_summary["stages"][stage]["key"]

    assert run_killed_at(stage, [f"cache.dir={cache}", f"cache.models={model_store}"]) == -signal.SIGKILL
    assert committed(cache, stage) == [], "the killed stage must not look finished"
    leftovers = [p for p in (cache / stage).iterdir() if p.name.startswith(".tmp-")]
    assert [p.name.startswith(f".tmp-{key}-") for p in leftovers] == [True]
    assert not (leftovers[0] / artifacts.MANIFEST).exists() and any(leftovers[0].iterdir())
    for name in affected_by(stage):
        assert committed(cache, name) == []

    summary = run_in_process([f"cache.dir={cache}", f"cache.models={model_store}"])

    assert [name for name, info in summary["stages"].items() if info["cached"]] == unaffected
    assert_same_outcome(cache, summary, reference_summary)


def test_kill_9_from_outside_during_collect_then_the_rerun_completes(tmp_path, reference, model_store):
    cache = tmp_path / "cache"
    overrides = [f"cache.dir={cache}", f"cache.models={model_store}", "run.stages=[collect]"]
    job = subprocess.Popen(
        pipeline_command(*overrides, f"hydra.run.dir={tmp_path / 'killed'}"),
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((cache / "collect").glob(".tmp-*")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert committed(cache, "collect") == [] and len(temporaries(cache)) == 1

    summary = run_in_process(overrides)

    collect_dir = Path(summary["stages"]["collect"]["dir"])
    reference_dir = Path(reference[1]["stages"]["collect"]["dir"])
    assert summary["stages"]["collect"]["cached"] is False and artifacts.verify(collect_dir) == (True, "")
    assert committed(cache, "collect") == [reference_dir.name] and temporaries(cache) == []
    assert artifacts.read_manifest(collect_dir)["files"] == artifacts.read_manifest(reference_dir)["files"]


PRIMARY_FILE = {
    "collect": "activations.safetensors",
    "baseline": "harmless_logprobs.safetensors",
    "measure": "measurements.safetensors",
    "select": "ablation.yaml",
    "ablate": "model/model.safetensors",
    "evaluate": "metrics.json",
}


def test_every_artifact_file_of_every_stage_is_covered_by_verify(reference):
    reference_cache, reference_summary = reference
    checked = 0
    for stage, info in reference_summary["stages"].items():
        directory = Path(info["dir"])
        for name in artifacts.read_manifest(directory)["files"]:
            path = directory / name
            original = path.read_bytes()
            try:
                path.write_bytes(bytes([original[0] ^ 1]) + original[1:])
                assert artifacts.verify(directory) == (False, f"{name} does not match its manifest hash"), (stage, name)
            finally:
                path.write_bytes(original)
            checked += 1
        assert artifacts.verify(directory) == (True, "")
    assert checked >= 6 * 2


@pytest.mark.parametrize("stage", STAGES)
def test_a_flipped_byte_is_detected_and_the_stage_recomputed_to_the_same_bytes(stage, tmp_path, reference, model_store, caplog):
    reference_cache, reference_summary = reference
    cache = tmp_path / "cache"
    copy_stages(reference_cache, cache, list(STAGES))
    directory = cache / stage / reference_summary["stages"][stage]["key"]
    expected = artifacts.read_manifest(directory)["files"][PRIMARY_FILE[stage]]
    target = directory / PRIMARY_FILE[stage]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))

    summary = run_in_process([f"cache.dir={cache}", f"cache.models={model_store}", f"run.stages=[{stage}]"])

    warnings = [r.message for r in caplog.records if r.levelname == "WARNING" and "not usable" in r.message]
    assert warnings and f"{PRIMARY_FILE[stage]} does not match its manifest hash" in warnings[0]
    assert summary["stages"][stage]["cached"] is False
    assert [name for name, info in summary["stages"].items() if not info["cached"]] == [stage]
    assert artifacts.sha256_file(target) == expected, "recomputed bytes differ from the uncorrupted artifact"


def test_the_model_card_names_the_source_the_plan_and_the_cache_keys(reference):
    """The ablated model's README.md carries its provenance: the lineage of cache keys (ablate and every
    stage it was derived from, not the unrelated baseline), the source and each planned layer."""
    _cache, summary = reference
    ablate_dir = Path(summary["stages"]["ablate"]["dir"])
    card = (ablate_dir / "model" / "README.md").read_text()
    for stage in ("collect", "measure", "select", "ablate"):
        assert f"- {stage}: `{summary['stages'][stage]['key']}`" in card, stage
    assert "baseline" not in card
    source = Path(artifacts.read_manifest(ablate_dir)["source"]["dir"])
    assert f"(checkpoint folder `{source.name}`)" in card and str(source) not in card  # no machine-specific path
    plan = yaml.safe_load((Path(summary["stages"]["select"]["dir"]) / "ablation.yaml").read_text())
    assert f"Method: `{plan['method']}`" in card
    for entry in plan["layers"]:
        assert f"| {entry['layer']} | {entry['direction_from']} |" in card


def test_the_source_model_is_never_written(tmp_path, reference, model_store):
    source = tmp_path / "read-only-model"
    shutil.copytree(resolve_model_dir(compose_config(["model=tiny"]).model, model_store), source)
    (source / artifacts.MANIFEST).unlink()  # a user's checkpoint has no manifest of ours
    for path in [source, *source.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_mode) for p in source.rglob("*")}
    hashes = snapshot(source)

    summary = run_in_process(
        [f"cache.dir={tmp_path / 'cache'}", f"cache.models={model_store}", "model.source=local", f"model.id={source}"]
    )

    assert [info["cached"] for info in summary["stages"].values()] == [False] * len(STAGES)
    assert snapshot(source) == hashes
    assert {p: (p.stat().st_mtime_ns, p.stat().st_mode) for p in source.rglob("*")} == before
    ablated = Path(summary["stages"]["ablate"]["dir"]) / "model"
    assert (ablated / "model.safetensors").read_bytes() != (source / "model.safetensors").read_bytes()
