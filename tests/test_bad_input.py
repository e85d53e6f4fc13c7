"""Bad input gets a clear error and loses nothing: the table in docs/troubleshooting.md, one row each.

Every row runs the real entry point (`python -m pipeline` through `cli()` in this process, or
`python -m pipeline.regen`) and asserts: a non-zero exit status, a last stderr line that names the
problem and the fix in one line, no traceback, and no change to the cache (or the configs folder for
regen): same files, same bytes. The cache starts as a copy of a finished tiny run, so a row that fails
at a late stage shows that the finished upstream work survives.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from pipeline.architectures import ARCHITECTURES
from pipeline.regen import main as regen_main
from pipeline.measurement import COPIED_METADATA, DIRECTION_TENSORS, STATISTIC_TENSORS, Measurements, write_measurements
from tiny_pipeline import SMALL, Row, Scene, args_with, compose_config, one_line_error, run_cli, run_command, run_row, snapshot, tiny_checkpoint


def bert_checkpoint(scene: Scene) -> None:
    checkpoint = tiny_checkpoint(scene)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors: reading weights would fail differently")


def pickle_only_checkpoint(scene: Scene) -> None:
    (tiny_checkpoint(scene) / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")


def empty_prompt_file(scene: Scene) -> None:
    (scene.tmp / "empty.txt").write_text("")


def unreadable_prompt_file(scene: Scene) -> None:
    (scene.tmp / "secret.txt").write_text("how do I pick a lock?\n" * 3)
    (scene.tmp / "secret.txt").chmod(0)


def permission_denied_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a non-root user gets from reading a chmod 000 file, for machines where tests run as root."""
    read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:
        if path.name == "secret.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)


def root_reads_anyway(tmp: Path) -> str | None:
    return "root reads a chmod 000 file" if os.access(tmp / "secret.txt", os.R_OK) else None


def plan_with_layer_7(scene: Scene) -> None:
    """The reference plan (4-layer model) edited to ablate layer 7."""
    plan = yaml.safe_load((Path(scene.reference["stages"]["select"]["dir"]) / "ablation.yaml").read_text())
    plan["layers"][0] = {**plan["layers"][0], "layer": 7, "direction_from": 7}
    (scene.tmp / "ablation.yaml").write_text(yaml.safe_dump(plan))


def read_only_cache(scene: Scene) -> None:
    scene.cache.chmod(0o555)


def root_writes_anyway(tmp: Path) -> str | None:
    return "root writes into a chmod 555 directory" if os.access(tmp / "cache", os.W_OK) else None


def a_regular_file(scene: Scene) -> None:
    (scene.tmp / "a-file").write_text("a file, not a directory\n")


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS calls that write the ablated shards fail as a full disk makes them: no file name attached."""

    def no_space(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", no_space)  # the kernel copy of each file
    monkeypatch.setattr(os, "pwrite", no_space)  # the edited tensors


def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import; the env var is set too


FAMILIES = ", ".join(sorted(ARCHITECTURES))
ROWS = {
    "unknown model preset": Row(("model=nope",), ("model=nope: no such model preset; choose one of", "qwen25_coder_05b", "tiny_moe")),
    "mode.top_n not a number": Row(("mode.top_n=abc",), ("mode.top_n must be an integer, got 'abc'",)),
    "override syntax": Row(("run.stages=[collect",), ("cannot parse override 'run.stages=[collect'",)),
    "unknown config key": Row(("mode.nope=3",), ("mode.nope is not a setting; remove it",)),
    "misspelled config key": Row(("mode.top_m=3",), ("mode.top_m is not a setting; did you mean mode.top_n?",)),
    "missing local model dir": Row(
        ("model.source=local", "model.id=/nonexistent"), ("model directory /nonexistent does not exist; set model.id",)
    ),
    "hub id while offline": Row(
        ("model.source=hub", "model.id=org/does-not-exist"),
        ("hub model 'org/does-not-exist' could not be fetched (HF_HUB_OFFLINE is set", "model.source=local"),
        patch=hub_offline,
        env={"HF_HUB_OFFLINE": "1"},
    ),
    "unknown architecture": Row(
        ("model.source=local", "model.id={tmp}/checkpoint"),
        (f"model_type 'bert' is not supported; supported families: {FAMILIES}",),
        setup=bert_checkpoint,
    ),
    "checkpoint without safetensors": Row(
        ("model.source=local", "model.id={tmp}/checkpoint"),
        ("has only pytorch_model.bin; we load safetensors only and never unpickle", "safe_serialization=True"),
        setup=pickle_only_checkpoint,
    ),
    "empty prompt file": Row(
        ("prompts.harmful.source={tmp}/empty.txt",), ("prompt file {tmp}/empty.txt contains no prompts",),
        setup=empty_prompt_file,
    ),
    "unreadable prompt file": Row(
        ("prompts.harmful.source={tmp}/secret.txt",), ("{tmp}/secret.txt is not readable (permission denied)",),
        setup=unreadable_prompt_file,
        skip_unless=root_reads_anyway,
    ),
    "unreadable prompt file (simulated)": Row(
        ("prompts.harmful.source={tmp}/secret.txt",), ("{tmp}/secret.txt is not readable (permission denied)",),
        setup=unreadable_prompt_file,
        patch=permission_denied_on_read,
    ),
    "mode.top_n=0": Row(("mode.top_n=0",), ("mode.top_n must be >= 1, got 0",)),
    "mode.min_quality=-1": Row(("mode.min_quality=-1",), ("mode.min_quality must be >= 0, got -1",)),
    "unknown stage": Row(
        ("run.stages=[nope]",), ("unknown stage 'nope' in run.stages; choose from collect, baseline, measure",)
    ),
    "plan layer out of range": Row(
        ("plan={tmp}/ablation.yaml",), ("{tmp}/ablation.yaml is not an ablation plan: layer 7 is outside 0..3",),
        setup=plan_with_layer_7,
    ),
    "cache dir read-only": Row(
        ("cache.dir={tmp}/cache",), ("cache.dir={tmp}/cache is not writable (Permission denied)",),
        setup=read_only_cache,
        skip_unless=root_writes_anyway,
    ),
    "cache dir under a file": Row(
        ("cache.dir={tmp}/a-file/cache",),
        ("cache.dir={tmp}/a-file/cache is not writable (Not a directory); choose a writable directory",),
        setup=a_regular_file,
    ),
    "run dir under a file": Row(
        ("hydra.run.dir={tmp}/a-file/run",), ("cannot write {tmp}/a-file/run: Not a directory",), setup=a_regular_file
    ),
    "disk full during ablate": Row(
        ("run.stages=[ablate]", "run.force=[ablate]"),
        ("model/model.safetensors: No space left on device; free disk space",),
        patch=disk_full,
    ),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, scene, capsys, monkeypatch):
    run_row(ROWS[name], scene, capsys, monkeypatch)


# --- python -m pipeline.regen: measurements from elsewhere ---------------------------------------


def settings_file(folder: Path) -> None:
    """A select.yaml with the settings of the composed tiny config."""
    config = compose_config(list(SMALL))
    mode = {key: value for key, value in OmegaConf.to_container(config.mode, resolve=True).items() if key != "presets"}
    folder.mkdir(parents=True)
    (folder / "select.yaml").write_text(yaml.safe_dump({"mode": mode, "select": OmegaConf.to_container(config.select, enum_to_str=True)}))


def foreign_measurement(folder: Path, plan: Path) -> None:
    """A 24-layer, 896-wide measurement (a 0.5B model's shape) beside a plan made for the 64-wide tiny model."""
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(24, 896, generator=generator) for name in DIRECTION_TENSORS}
    tensors |= {name: torch.rand(24, generator=generator, dtype=torch.float64) for name in STATISTIC_TENSORS}
    meta = {key: "x" for key in COPIED_METADATA} | {"hidden_size": "896", "num_layers": "24", "formula_version": "1"}
    write_measurements(folder / "measurements.safetensors", Measurements(meta=meta, tensors=tensors))
    shutil.copyfile(plan, folder / "ablation.yaml")


def pickled_measurement(folder: Path, plan: Path) -> None:
    (folder / "measurements.pt").write_bytes(b"\x80\x04never unpickled")


REGEN_ROWS = {
    "measurement from a model of another hidden size": (
        foreign_measurement,
        "measurements.safetensors is from a model with hidden size 896, this model has 64; measure this model",
    ),
    ".pt offered as measurements": (pickled_measurement, "measurements.pt: we never unpickle; measurements must be .safetensors"),
}


@pytest.mark.parametrize("name", list(REGEN_ROWS))
def test_bad_input_regen(name, tmp_path, reference, capsys):
    build, says = REGEN_ROWS[name]
    folder = tmp_path / "plans" / "borrowed"
    settings_file(folder)
    build(folder, Path(reference[1]["stages"]["select"]["dir"]) / "ablation.yaml")
    before = snapshot(tmp_path / "plans")

    status = regen_main(["--plans", str(tmp_path / "plans")])

    line = one_line_error(status, capsys.readouterr().err)
    assert says in line
    assert snapshot(tmp_path / "plans") == before


# --- the real command line maps both error kinds to one line and status 2 --------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (["run.stages=[nope]"], "error: unknown stage 'nope' in run.stages; choose from collect, baseline, measure"),
        (["model=nope"], "error: model=nope: no such model preset; choose one of deepseek_v3,"),
    ],
    ids=["PipelineError", "Hydra error"],
)
def test_the_command_line_prints_one_line_and_exits_2(args, says, tmp_path):
    result = run_command([sys.executable, "-m", "pipeline", *args, f"cache.dir={tmp_path / 'cache'}",
                          f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "cache").exists()


def test_ctrl_c_inside_a_stage_is_one_line_status_130_and_leaves_no_temporary(scene, capsys, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.stages.collect.shared_model", interrupted)
    before = snapshot(scene.cache, scene.store)
    args = args_with(SMALL, ["prompts.n_train=17", f"cache.dir={scene.cache}", f"cache.models={scene.store}",
                             f"hydra.run.dir={scene.tmp / 'run'}"])  # a new collect key: collect must start

    status, err = run_cli(args, capsys, monkeypatch)

    assert status == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "error: interrupted; finished stages are cached, rerun the same command to resume"
    assert snapshot(scene.cache, scene.store) == before, "the interrupted collect left something behind"
