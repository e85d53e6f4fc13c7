"""The runner's contract: what a cache key depends on, when a cached artifact is trusted, who may delete
a temporary, and what `python -m pipeline` reports in run.json.

Most tests use a registry of two fake stages (no model, milliseconds); the CLI tests run the real
`collect` on the tiny model.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import artifacts
from pipeline.cache import collect_garbage
from pipeline.cache import main as cache_main
from pipeline.runner import NON_SEMANTIC_KEYS, Runner, cache_key, config_slice, hashed_slice
from pipeline.stage import Stage, StageContext
from pipeline.store import ArtifactStore
from pipeline.stages import registry
from tiny_pipeline import ROOT, compose_config, pipeline_command, run_cli, subprocess_env, temporaries

OUTPUT = "out.json"


def _write_slice_and_inputs(ctx: StageContext) -> None:
    """A fake stage's output: its config slice and the bytes it read from each upstream artifact."""
    inputs = {name: (path / OUTPUT).read_text() for name, path in sorted(ctx.inputs.items())}
    (ctx.out_dir / OUTPUT).write_text(json.dumps({"config": ctx.config, "inputs": inputs}, sort_keys=True))


def fake_registry(first_version: str = "1", second_version: str = "1") -> dict[str, Stage]:
    first = Stage("first", first_version, (), ("first",), _write_slice_and_inputs)
    second = Stage("second", second_version, ("first",), ("second", "model"), _write_slice_and_inputs)
    return {"first": first, "second": second}


def fake_config(**dotted: object):
    config = OmegaConf.create(
        {
            "first": {"alpha": 1},
            "second": {"beta": 2},
            "model": {"id": "m", "device_map": "cpu", "max_memory": None, "offload_folder": None},
            "unrelated": {"gamma": 3},
            "run": {"seed": 0, "progress": False},
        }
    )
    for key, value in dotted.items():
        OmegaConf.update(config, key, value)
    return config


def keys(config, stages: dict[str, Stage] | None = None, tmp: Path = Path("/nonexistent")) -> dict[str, str]:
    runner = Runner(config, stages or fake_registry(), cache_dir=tmp, model_store=tmp)
    return {name: planned[0] for name, planned in runner.plan(["first", "second"]).items()}


def run_fake(tmp_path: Path, config=None, force: tuple[str, ...] = ()) -> Runner:
    runner = Runner(config or fake_config(), fake_registry(), cache_dir=tmp_path / "cache", model_store=tmp_path)
    runner.run(["second"], force)
    return runner


# --- cache keys --------------------------------------------------------------------------------


def test_a_key_changes_with_the_stages_own_slice_and_with_every_upstream_key():
    base = keys(fake_config())
    first_changed = keys(fake_config(**{"first.alpha": 5}))
    second_changed = keys(fake_config(**{"second.beta": 5}))
    assert first_changed["first"] != base["first"] and first_changed["second"] != base["second"]
    assert second_changed == {"first": base["first"], "second": second_changed["second"]}
    assert second_changed["second"] != base["second"]


def test_a_key_ignores_config_outside_its_slice():
    base = keys(fake_config())
    assert keys(fake_config(**{"unrelated.gamma": 4})) == base
    assert keys(fake_config(**{"second.beta": 9}))["first"] == base["first"]


def test_a_key_changes_with_the_stage_version_and_upstream_versions():
    base = keys(fake_config())
    bumped_second = keys(fake_config(), fake_registry(second_version="2"))
    bumped_first = keys(fake_config(), fake_registry(first_version="2"))
    assert bumped_second == {"first": base["first"], "second": bumped_second["second"]} and bumped_second != base
    assert bumped_first["first"] != base["first"] and bumped_first["second"] != base["second"]


@pytest.mark.parametrize("dotted", sorted(NON_SEMANTIC_KEYS))
def test_non_semantic_keys_never_change_a_key(dotted):
    if "." in dotted:
        section, leaf = dotted.split(".", 1)
        stage = Stage("only", "1", (), (section,), _write_slice_and_inputs)
        config = OmegaConf.create({section: {leaf: "a", "semantic": 1}, "run": {"seed": 0, "progress": False}})
    else:  # a top-level key (plan=): the stage reads it beside a semantic section
        section = "other"
        stage = Stage("only", "1", (), (dotted, section), _write_slice_and_inputs)
        config = OmegaConf.create({dotted: "a", section: {"semantic": 1}, "run": {"seed": 0, "progress": False}})

    def key_with(**dotted_values: object) -> str:
        changed = config.copy()
        for key, value in dotted_values.items():
            OmegaConf.update(changed, key, value)
        runner = Runner(changed, {"only": stage}, cache_dir=Path("/nonexistent"), model_store=Path("/nonexistent"))
        return runner.plan(["only"])["only"][0]

    assert key_with(**{dotted: "b"}) == key_with()
    assert key_with(**{f"{section}.semantic": 2}) != key_with(), "the rest of the section must still count"


def test_a_key_changes_with_the_content_of_declared_external_inputs():
    def stage_reading(digest: str) -> dict[str, Stage]:
        stage = Stage("first", "1", (), ("first",), _write_slice_and_inputs, input_digest=lambda values, store: {"f": digest})
        return {**fake_registry(), "first": stage}

    assert keys(fake_config(), stage_reading("aa")) != keys(fake_config(), stage_reading("bb"))
    assert keys(fake_config(), stage_reading("aa")) == keys(fake_config(), stage_reading("aa"))


def test_golden_cache_keys():
    """Hard-coded keys: a change here silently orphans every user's cache, so it must be deliberate."""
    stage = Stage("collect", "1", (), ("collect",), _write_slice_and_inputs)
    values = {"collect": {"batch_size": 16, "dtype": "float32", "positions": "last"}}
    assert cache_key(stage, values, {}, {"harmful": "ab" * 32}) == "041ec65c1523c663"
    measure = registry()["measure"]
    assert cache_key(measure, {}, {"collect": "0" * 16}, {}) == "efc9f9c1f5cb9aba"  # measure version 3


def test_eval_batch_size_is_part_of_the_scores_keys():
    """In bfloat16 the first-token numbers depend on the padding batch (runner.NON_SEMANTIC_KEYS), so a cached score
    computed at one batch size is never served for another; collect's batch size stays out of its key."""
    stages = registry()
    slices = {size: {name: hashed_slice(config_slice(compose_config([f"eval.batch_size={size}", f"collect.batch_size={size}"]),
                                                     stages[name].config_keys), stages[name].unkeyed)
                     for name in ("collect", "baseline", "evaluate")} for size in (16, 64)}
    assert slices[16]["collect"] == slices[64]["collect"]
    assert slices[16]["baseline"] != slices[64]["baseline"] and slices[16]["evaluate"] != slices[64]["evaluate"]


# --- trusting the cache ------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "byte flipped": lambda directory: flip_byte(directory / OUTPUT, 3),
    "file truncated": lambda directory: (directory / OUTPUT).write_bytes((directory / OUTPUT).read_bytes()[:-1]),
    "file deleted": lambda directory: (directory / OUTPUT).unlink(),
    "manifest deleted": lambda directory: (directory / artifacts.MANIFEST).unlink(),
    "manifest not json": lambda directory: (directory / artifacts.MANIFEST).write_text("{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_artifact_is_recomputed_with_a_warning_and_never_consumed(tmp_path, caplog, damage):
    runner = run_fake(tmp_path)
    first, second = runner.results["first"], runner.results["second"]
    original_first, original_second = (first.dir / OUTPUT).read_bytes(), (second.dir / OUTPUT).read_bytes()
    DAMAGE[damage](first.dir)

    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        rerun = run_fake(tmp_path, force=("second",))  # second re-reads first's artifact

    assert [r.message for r in caplog.records if "not usable" in r.message], "no warning about the damage"
    assert rerun.results["first"].cached is False and rerun.results["first"].key == first.key
    assert (first.dir / OUTPUT).read_bytes() == original_first
    assert (second.dir / OUTPUT).read_bytes() == original_second, "second consumed the damaged file"
    assert artifacts.verify(first.dir) == (True, "")


def test_a_complete_artifact_is_reused_without_running_the_stage(tmp_path):
    run_fake(tmp_path)
    calls = []
    stages = fake_registry()
    stages["first"] = Stage("first", "1", (), ("first",), calls.append)
    runner = Runner(fake_config(), stages, cache_dir=tmp_path / "cache", model_store=tmp_path)
    results = runner.run(["second"])
    assert calls == [] and results["first"].cached and results["first"].seconds == 0.0


def test_a_failing_stage_leaves_no_temporary_and_keeps_the_finished_upstream(tmp_path):
    def fails(ctx: StageContext) -> None:
        (ctx.out_dir / "half.bin").write_bytes(b"x" * 10)
        raise ValueError("boom")

    stages = {**fake_registry(), "second": Stage("second", "1", ("first",), ("second",), fails)}
    runner = Runner(fake_config(), stages, cache_dir=tmp_path / "cache", model_store=tmp_path)
    with pytest.raises(ValueError, match="boom"):
        runner.run(["second"])
    assert temporaries(tmp_path / "cache") == []
    assert [p.name for p in (tmp_path / "cache" / "second").iterdir() if not p.name.endswith(".lock")] == []
    assert artifacts.verify(runner.results["first"].dir) == (True, "")


# --- temporaries: removed only under their key's lock ----------------------------------------------

HOLD_LOCK = """
import sys
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def hold_lock(lock: Path) -> subprocess.Popen:
    """Another live process holding `lock` until its stdin is closed, as a running stage would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_runner_removes_a_temporary_only_once_its_writer_is_gone(tmp_path, caplog):
    config = fake_config()
    cache = tmp_path / "cache"
    first_key = keys(config)["first"]
    (cache / "first").mkdir(parents=True)
    live_tmp = cache / "first" / f".tmp-{first_key}-4242-0123abcd"
    live_tmp.mkdir()
    (live_tmp / "partial").write_text("being written")
    holder = hold_lock(ArtifactStore(cache / "first").lock_path(first_key))
    try:
        runner = Runner(config, fake_registry(), cache_dir=cache, model_store=tmp_path)
        worker = threading.Thread(target=runner.run, args=(["first"],))
        with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
            worker.start()
            time.sleep(1.0)
            assert worker.is_alive(), "the runner must wait for the key's lock"
            assert (live_tmp / "partial").read_text() == "being written"
            assert collect_garbage(cache, tmp_path / "models").kept == [live_tmp]
            holder.stdin.close()  # the writer dies without renaming: its temporary is now stale
            holder.wait(timeout=30)
            worker.join(timeout=30)
    finally:
        holder.kill()
    assert not worker.is_alive() and not live_tmp.exists()
    assert any("left by a run that was killed" in r.message for r in caplog.records)
    assert runner.results["first"].cached is False and artifacts.verify(runner.results["first"].dir)[0]


def test_cache_gc_removes_stale_temporaries_and_keeps_live_ones(tmp_path, capsys):
    cache, models = tmp_path / "cache", tmp_path / "cache" / "models"
    stale = cache / "collect" / f".tmp-{'a' * 16}-111-0123abcd"
    live = cache / "measure" / f".tmp-{'b' * 16}-222-4567cdef"
    stale_model = models / ".tmp-tiny-0123456789abcdef-333-89abcdef"
    foreign = models / ".tmp-other-program-444"
    finished = cache / "collect" / ("c" * 16)
    for directory in (stale, live, stale_model, foreign, finished):
        directory.mkdir(parents=True)
        (directory / "data.bin").write_bytes(b"\0" * 2**20)
    holder = hold_lock(ArtifactStore(cache / "measure").lock_path("b" * 16))
    try:
        assert cache_main(["gc", "--cache-dir", str(cache)]) == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"removed {stale} (1.0 MiB)",
        f"removed {stale_model} (1.0 MiB)",
        f"kept {live}: a running job holds its lock",
        "gc: removed 2 stale temporaries (2.0 MiB), kept 1 in use",
    ]
    assert not stale.exists() and not stale_model.exists() and live.exists() and finished.exists()
    assert foreign.exists(), "gc removes only temporaries named the way the store names them"
    assert cache_main(["gc", "--cache-dir", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cache dir {tmp_path / 'missing'} does not exist")


# --- the CLI: parallel runs, run.json, a second run is cached -----------------------------------


def test_two_parallel_runs_share_one_artifact_and_both_succeed(tmp_path, model_store):
    cache = tmp_path / "cache"
    jobs = [
        subprocess.Popen(
            pipeline_command("run.stages=[collect]", f"cache.dir={cache}", f"cache.models={model_store}",
                             f"hydra.run.dir={tmp_path / f'run{index}'}"),
            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in outputs]
    runs = [json.loads((tmp_path / f"run{index}" / "run.json").read_text())["stages"]["collect"] for index in range(2)]
    assert runs[0]["key"] == runs[1]["key"] and runs[0]["dir"] == runs[1]["dir"]
    assert sorted(run["cached"] for run in runs) == [False, True], "exactly one of them computes"
    assert [p.name for p in (cache / "collect").iterdir() if not p.name.startswith(".")] == [runs[0]["key"]]
    assert temporaries(cache) == []


def test_run_json_and_a_second_identical_run_is_cached_without_a_forward_pass(
    tmp_path, model_store, capsys, monkeypatch
):
    args = ["model=tiny", "prompts.n_train=16", "prompts.n_eval=8", "run.progress=false", "run.stages=[collect]",
            f"cache.dir={tmp_path / 'cache'}", f"cache.models={model_store}"]
    status, err = run_cli([*args, f"hydra.run.dir={tmp_path / 'first'}"], capsys, monkeypatch)
    assert status == 0, err
    first = json.loads((tmp_path / "first" / "run.json").read_text())

    def no_forward_pass(*_args, **_kwargs):
        raise AssertionError("the cached collect stage loaded the model")

    monkeypatch.setattr("pipeline.stages.collect.shared_model", no_forward_pass)
    assert run_cli([*args, f"hydra.run.dir={tmp_path / 'second'}"], capsys, monkeypatch)[0] == 0
    second = json.loads((tmp_path / "second" / "run.json").read_text())

    collect_dir = tmp_path / "cache" / "collect" / first["stages"]["collect"]["key"]
    assert set(first["stages"]) == {"collect"} and set(first["stages"]["collect"]) == {"key", "dir", "cached", "seconds"}
    assert first["stages"]["collect"]["dir"] == str(collect_dir) and artifacts.verify(collect_dir)[0]
    assert first["stages"]["collect"]["cached"] is False and first["stages"]["collect"]["seconds"] > 0
    assert second["stages"]["collect"] == {**first["stages"]["collect"], "cached": True, "seconds": 0.0}
    assert first["overrides"] == args
