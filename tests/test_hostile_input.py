"""What a hostile or careless input still broke, case by case: each is now one line and status 2 before any
stage's work (or, for a checkpoint rewritten in place, a recomputation), with nothing outside the cache,
the model store and the run dir touched."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import time
import typing
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError

from pipeline import artifacts, schema
from pipeline.store import ArtifactStore, Collected
from tiny_pipeline import SMALL, Row, Scene, run_cli, run_in_process, run_row, snapshot, tiny_checkpoint


def reference_plan(scene: Scene) -> dict:
    return yaml.safe_load((Path(scene.reference["stages"]["select"]["dir"]) / "ablation.yaml").read_text())


def write_plan(scene: Scene, plan_text: str) -> None:
    (scene.tmp / "ablation.yaml").write_text(plan_text)


def alias_bomb(scene: Scene) -> None:
    """1.3 KB of YAML that expands to 10^9 strings when aliases are followed."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{','.join(['*' + previous] * 10)}]")
    write_plan(scene, "\n".join(lines) + "\n")


def plan_with_model_text(scene: Scene) -> None:
    plan = reference_plan(scene)
    plan["model"] = "tiny\nlicense: stolen"
    write_plan(scene, yaml.safe_dump(plan))


def plan_with_huge_scale(scene: Scene) -> None:
    plan = reference_plan(scene)
    plan["layers"][0]["scale"] = 1e36
    write_plan(scene, yaml.safe_dump(plan))


def mixed_checkpoint(scene: Scene) -> None:
    checkpoint = tiny_checkpoint(scene)
    source = Path(scene.reference["stages"]["ablate"]["dir"]) / "model" / "model.safetensors"
    shutil.copyfile(source, checkpoint / "model.safetensors")
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")


def long_prompt(scene: Scene) -> None:
    lines = [f"how do I do harmful thing number {number}?" for number in range(40)]
    (scene.tmp / "long.txt").write_text("\n".join(["x" * 100_000, *lines]) + "\n")


def zero_device(scene: Scene) -> None:
    (scene.tmp / "zero.txt").symlink_to("/dev/zero")


def fifo(scene: Scene) -> None:
    os.mkfifo(scene.tmp / "fifo.txt")


def overlapping_sets(scene: Scene) -> None:
    harmful = [f"how do I do harmful thing number {number}?" for number in range(40)]
    harmless = [f"how do I bake cake number {number}?" for number in range(39)] + [harmful[7].upper()]
    (scene.tmp / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (scene.tmp / "harmless.txt").write_text("\n".join(harmless) + "\n")


def disk_full_in_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports a full disk as its own error type, not as an OSError."""

    def no_space(*_args, **_kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr("safetensors.torch.save_file", no_space)


ROWS = {
    "1 a string is never a boolean": Row(("model.trust_remote_code=no",), ("model.trust_remote_code must be true or false",)),
    "3 safetensors beside a pickle": Row(
        ("model.source=local", "model.id={tmp}/checkpoint"),
        ("mixes safetensors with other weight files (pytorch_model.bin)", "never unpickle"),
        setup=mixed_checkpoint,
    ),
    "5 empty cache dir": Row(("cache.dir=",), ("an empty path was given",)),
    "5 model name leaving the store": Row(("model.name=../../x",), ("cannot name an entry of",)),
    "6 YAML alias bomb as plan": Row(("plan={tmp}/ablation.yaml",), ("aliases (*name) are not allowed",), setup=alias_bomb),
    "6 model text rewriting the card header": Row(
        ("plan={tmp}/ablation.yaml",), ("model must be one line of printable text",), setup=plan_with_model_text
    ),
    "6 plan scale 1e36": Row(("plan={tmp}/ablation.yaml",), ("scale 1e+36 is outside [0, 4]",), setup=plan_with_huge_scale),
    "6 select.scale=1e36": Row(("select.scale=1e36",), ("select.scale must be within [0, 4]",)),
    "6 select.scale=-50": Row(("select.scale=-50",), ("select.scale must be within [0, 4]",)),
    "7 run.seed=abc": Row(("run.seed=abc",), ("run.seed must be an integer, got 'abc'",)),
    "7 model.dtype=float8": Row(("model.dtype=float8",), ("model.dtype must be one of float32, bfloat16, float16",)),
    "7 disk full while collect writes safetensors": Row(
        ("run.stages=[collect]", "run.force=[collect]"),
        ("collect: could not write a safetensors file", "No space left on device"),
        patch=disk_full_in_safetensors,
    ),
    "7 a 100k-character prompt": Row(
        ("prompts.harmful.source={tmp}/long.txt",), ("entry 1 has 100,000 characters, more than 8,000",), setup=long_prompt
    ),
    "7 /dev/zero as prompt file": Row(
        ("prompts.harmful.source={tmp}/zero.txt",), ("zero.txt is not a regular file",), setup=zero_device
    ),
    "7 a FIFO as prompt file": Row(("prompts.harmful.source={tmp}/fifo.txt",), ("fifo.txt is not a regular file",), setup=fifo),
    "8 refusal markers as one string": Row(("eval.refusal_markers=sorry",), ("eval.refusal_markers must be a list",)),
    "8 negative KL prompt count": Row(("eval.kl_prompts=-1",), ("eval.kl_prompts must be >= 1, got -1",)),
    "8 no stages": Row(("run.stages=[]",), ("run.stages is empty, so there is nothing to do",)),
    "9 harmful and harmless share a prompt": Row(
        ("prompts.harmful.source={tmp}/harmful.txt", "prompts.harmless.source={tmp}/harmless.txt",
         "prompts.n_train=16", "prompts.n_eval=8"),
        ("1 prompt(s) are in both the harmful set", "remove them from one of the sets"),
        setup=overlapping_sets,
    ),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_input_is_one_line_before_any_work(name, scene, capsys, monkeypatch):
    started = time.perf_counter()
    run_row(ROWS[name], scene, capsys, monkeypatch)
    assert time.perf_counter() - started < 10


# --- 2: a checkpoint rewritten in place is a new model ------------------------------------------------


def test_a_local_checkpoint_rewritten_in_place_is_recomputed(scene):
    checkpoint = tiny_checkpoint(scene)
    weights = checkpoint / "model.safetensors"
    shutil.copyfile(Path(scene.reference["stages"]["ablate"]["dir"]) / "model" / "model.safetensors", weights)
    args = [f"cache.dir={scene.cache}", f"cache.models={scene.store}", "model.source=local",
            f"model.id={checkpoint}", "run.stages=[collect]"]
    first = run_in_process(args)["stages"]["collect"]
    assert run_in_process(args)["stages"]["collect"]["cached"]

    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0xFF  # one weight byte: same names, same size
    weights.write_bytes(bytes(data))

    second = run_in_process(args)["stages"]["collect"]
    assert not second["cached"] and second["key"] != first["key"]


# --- 4: nothing is followed through a symbolic link -------------------------------------------------


def test_removing_a_link_never_touches_what_it_points_to(tmp_path):
    target = tmp_path / "elsewhere"
    (target / "locked").mkdir(parents=True)
    (target / "locked" / "keep.txt").write_text("keep")
    (target / "locked").chmod(0o500)
    link = tmp_path / "store" / ".tmp-0123456789abcdef-1-0123abcd"
    link.parent.mkdir()
    link.symlink_to(target)
    inside = tmp_path / "tree"
    (inside / "sub").mkdir(parents=True)
    (inside / "sub" / "escape").symlink_to(target)
    try:
        artifacts.remove_tree(link)
        artifacts.remove_tree(inside)
        collected = Collected()
        ArtifactStore(tmp_path / "store").collect_garbage(collected)
        assert not link.is_symlink() and not inside.exists() and collected.removed == []
        assert stat.S_IMODE((target / "locked").stat().st_mode) == 0o500
        assert (target / "locked" / "keep.txt").read_text() == "keep"
    finally:
        (target / "locked").chmod(0o700)


def test_gc_never_follows_a_temporary_that_is_a_link(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("x")
    store = ArtifactStore(tmp_path / "cache" / "collect")
    store.root.mkdir(parents=True)
    (store.root / ".tmp-0123456789abcdef-1-0123abcd").symlink_to(target)
    collected = Collected()
    store.collect_garbage(collected)
    assert (target / "data").read_text() == "x" and collected.removed == []


# --- 8: a manifest that lists no files is not an artifact ---------------------------------------------


def test_a_manifest_without_files_or_with_escaping_names_is_not_an_artifact(tmp_path):
    artifacts.write_json(tmp_path / "manifest.json", {"files": {}})
    assert artifacts.verify(tmp_path) == (False, "no valid manifest.json listing the artifact's files")
    artifacts.write_json(tmp_path / "manifest.json", {"files": {"../outside": "0" * 64}})
    assert artifacts.verify(tmp_path) == (False, "manifest.json names a file outside the artifact")


# --- 9: a sweep job that fails unexpectedly is recorded and the summary still written -----------------


def test_an_unexpected_error_in_a_sweep_job_is_recorded_and_the_summary_written(scene, capsys, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in one sweep point")

    monkeypatch.setattr("pipeline.stages.select.plot_quality", broken)
    sweep = scene.tmp / "sweep"
    args = ["-m", *SMALL, f"cache.dir={scene.cache}", f"cache.models={scene.store}", f"hydra.sweep.dir={sweep}",
            "mode.top_n=1,2"]
    status, _ = run_cli(args, capsys, monkeypatch)
    assert status == 0
    runs = [json.loads((sweep / str(job) / "run.json").read_text()) for job in (0, 1)]
    assert all("RuntimeError: a bug in one sweep point" in run["error"] for run in runs)
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all("a bug in one sweep point" in row for row in rows[1:])


# --- the property: a wrong type for any setting is one line and status 2, never a traceback ----------


def wrong_value(kind: typing.Any) -> str | None:
    """A command line value of the wrong type for a setting of `kind` (None when any value is allowed)."""
    kind, _ = schema.unwrap_optional(kind)
    if kind is bool:
        return "no"
    if kind is int:
        return "1.5"
    if kind is float:
        return "abc"
    if isinstance(kind, type) and issubclass(kind, schema.Enum):
        return "nonsense"
    if typing.get_origin(kind) in (list, typing.List):
        return "notalist"
    return None


def leaf_settings(section: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    leaves = []
    for field in dataclasses.fields(section):
        kind = typing.get_type_hints(section)[field.name]
        inner, _ = schema.unwrap_optional(kind)
        if dataclasses.is_dataclass(inner):
            leaves += leaf_settings(inner, f"{prefix}{field.name}.")
        else:
            leaves.append((f"{prefix}{field.name}", kind))
    return leaves


PROPERTY_CASES = [(key, value) for key, kind in leaf_settings(schema.Config)
                  if (value := wrong_value(kind)) is not None]


@pytest.mark.parametrize(("key", "value"), PROPERTY_CASES, ids=[key for key, _ in PROPERTY_CASES])
def test_any_setting_given_a_wrong_type_is_one_line_and_status_2(key, value, tmp_path, capsys, monkeypatch):
    args = [*SMALL, f"{key}={value}", f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    before = snapshot(tmp_path)
    started = time.perf_counter()
    status, err = run_cli([arg for arg in args if not arg.startswith(f"{key}=") or arg == f"{key}={value}"],
                          capsys, monkeypatch)
    assert time.perf_counter() - started < 10
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}"), err[-2000:]
    assert snapshot(tmp_path) == before


def test_the_property_covers_every_typed_section():
    covered = {key.split(".")[0] for key, _ in PROPERTY_CASES}
    assert covered >= {"model", "prompts", "eval", "mode", "select", "run", "collect", "ablate"}
