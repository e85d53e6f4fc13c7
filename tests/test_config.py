"""The typed config: every shipped option composes onto the schema with the values it documents, and a value of
the wrong type, an unknown key or a value out of range fails in one line, exit status 2, before any stage runs."""

from __future__ import annotations

import json
import time

import pytest
from omegaconf import OmegaConf

from pipeline.activations import POSITIONS
from pipeline.errors import PipelineError
from pipeline.models import MATERIALIZED_SOURCES
from pipeline.plan import METHODS
from pipeline.runner import config_slice
from pipeline.schema import Method, ModelSource, Positions, check
from pipeline.selection import settings_from_config
from pipeline.stages import registry
from tiny_pipeline import CONF, compose_config, run_cli

MODELS = {  # preset: (kind, dtype); the packaged default computes in ${compute_dtype:auto}
    "deepseek_v3": ("moe", "bfloat16"),
    "gemma3_12b": ("dense", "bfloat16"),
    "glm45air": ("moe", "bfloat16"),
    "gpt_oss_20b": ("moe", "bfloat16"),
    "llama31_8b": ("dense", "bfloat16"),
    "mistral_7b": ("dense", "bfloat16"),
    "mixtral_8x7b": ("moe", "bfloat16"),
    "qwen25_7b": ("dense", "bfloat16"),
    "qwen25_coder_05b": ("dense", None),
    "qwen3_30b_a3b": ("moe", "bfloat16"),
    "qwen3_8b": ("dense", "bfloat16"),
    "tiny": ("dense", "float32"),
    "tiny_moe": ("moe", "float32"),
}
MODES = {  # mode: {kind: (effective min_quality, top_n)}
    "band": {"dense": (0.0, 1000), "moe": (0.0, 1000)},
    "conservative": {"dense": (0.025, 8), "moe": (0.020, 16)},
    "balanced": {"dense": (0.015, 12), "moe": (0.012, 26)},
    "aggressive": {"dense": (0.010, 20), "moe": (0.008, 36)},
}
PROMPTS = {  # set: (harmful source, n_train, n_eval)
    "default": ("pkg:prompts/harmful.txt", 128, 64),
    "advbench": ("hf:walledai/AdvBench", 128, 64),
    "alpaca": ("pkg:prompts/harmful.txt", 128, 64),
    "harmbench": ("hf:walledai/HarmBench", 128, 64),
    "jailbreakbench": ("hf:JailbreakBench/JBB-Behaviors", 64, 32),
}


def presets(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def file_values(group: str, name: str = "default") -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))


def slices(cfg) -> dict:
    """Every stage's config slice: the schema's checks (types, ranges, keys) pass for shipped presets."""
    return {name: config_slice(cfg, stage.config_keys) for name, stage in registry().items()}


def test_every_option_of_every_group_composes_with_its_documented_values():
    assert set(presets("model")) == set(MODELS) and set(presets("mode")) == set(MODES)
    assert set(presets("prompts")) == set(PROMPTS)
    for model, (kind, dtype) in MODELS.items():
        cfg = compose_config([f"model={model}"])
        assert (cfg.model.name, cfg.model.kind, cfg.model.trust_remote_code) == (model, kind, False), model
        assert cfg.model.dtype == (dtype or cfg.model.dtype) and cfg.collect.dtype == cfg.model.dtype, model
        assert cfg.model.source in ModelSource and (cfg.model.source == "tiny") == (cfg.model.tiny is not None)
        assert (cfg.model.source == "packaged") == (cfg.model.gguf is not None), model
        slices(cfg)
    for mode, effective in MODES.items():
        for model, kind in (("tiny", "dense"), ("tiny_moe", "moe")):
            cfg = compose_config([f"model={model}", f"mode={mode}"])
            assert (cfg.mode.name, cfg.mode.min_quality, cfg.mode.top_n) == (mode, *effective[kind]), (mode, kind)
            settings = settings_from_config(slices(cfg)["select"])
            assert (settings.min_quality, settings.top_n) == effective[kind]
            if mode != "band":  # band also sets select.* (a depth window, one direction, split scales)
                assert OmegaConf.to_container(cfg.select, enum_to_str=True) == file_values("select")
    band = compose_config(["mode=band"]).select
    assert (band.skip_first, band.skip_last, band.direction_from, band.method, band.scale) == (
        0.125, 0.21, 0.6, "norm_preserving", 1.2)
    for name, (harmful, n_train, n_eval) in PROMPTS.items():
        cfg = compose_config(["model=tiny", f"prompts={name}"])
        assert (cfg.prompts.name, cfg.prompts.harmful.source, cfg.prompts.n_train, cfg.prompts.n_eval) == (
            name, harmful, n_train, n_eval)
        slices(cfg)
    cfg = compose_config(["model=tiny"])
    assert OmegaConf.to_container(cfg.eval) == file_values("eval")
    assert (cfg.collect.positions, cfg.collect.keep_activations, cfg.ablate.embed.enabled, cfg.plan) == (
        "last", True, False, None)


def test_closed_sets_are_the_ones_the_code_implements():
    assert tuple(Method) == METHODS and tuple(Positions) == POSITIONS
    assert set(MATERIALIZED_SOURCES) < set(ModelSource)


def test_slices_hold_plain_strings_and_leave_unset_settings_out():
    """What is hashed: no enum member (its string), no optional section the preset does not have."""
    cfg = compose_config(["model=tiny", "mode=band"])
    values = {key: value for stage in slices(cfg).values() for key, value in stage.items()}
    assert type(values["model"]["source"]) is str and type(values["model"]["kind"]) is str
    assert type(values["collect"]["positions"]) is str and type(values["select"]["method"]) is str
    assert "gguf" not in values["model"] and "presets" not in values["mode"]
    assert "subset" not in values["prompts"]["harmful"]
    assert json.loads(json.dumps(values)) == values


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("prompts.n_train=abc", "prompts.n_train must be an integer, got 'abc'"),
        ("prompts.n_train=1.5", "prompts.n_train must be an integer, got 1.5"),
        ("ablate.embed.enabled=no", "ablate.embed.enabled must be true or false, got 'no'"),
        ("model.trust_remote_code=no", "model.trust_remote_code must be true or false, got 'no'"),
        ("model.trust_remote_code='false'", "model.trust_remote_code must be true or false, got 'false'"),
        ("model.trust_remote_code=1", "model.trust_remote_code must be true or false, got 1"),
        ("eval.max_new_tokens=abc", "eval.max_new_tokens must be an integer, got 'abc'"),
        ("select.method=nonsense", "select.method must be one of orthogonal, norm_preserving, got 'nonsense'"),
        ("mode.top_n='3'", "mode.top_n must be an integer, got '3'"),
        ("collect.positions=first", "collect.positions must be one of last, post_instruction, post_instruction_mean, got 'first'"),
        ("collect.keep_activations=maybe", "collect.keep_activations must be true or false, got 'maybe'"),
        ("+model.trust_remote_cod=true", "model.trust_remote_cod is not a setting; did you mean model.trust_remote_code?"),
        ("model=typo", "model/typo: model.trust_remote_cod is not a setting; did you mean model.trust_remote_code?"),
        ("prompts=typo", "prompts/typo: prompts.n_train must be an integer, got 'abc'"),
        # ranges: the stages' validate step, before any key is computed
        ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1, got 0"),
        ("eval.kl_prompts=0", "eval.kl_prompts must be >= 1, got 0"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
        ("prompts.n_eval=0", "prompts.n_eval must be >= 1, got 0"),
        ("select.scale=9", "select.scale must be within [0, 4], got 9.0"),
        ("select.attn_scale=-1", "select.attn_scale must be within [0, 4], got -1.0"),
    ],
)
def test_a_bad_setting_is_one_line_and_status_2_before_any_work(override, says, tmp_path, capsys, monkeypatch):
    conf = tmp_path / "conf"
    for group, name, edit in (("model", "tiny", ("trust_remote_code:", "trust_remote_cod:")),
                              ("prompts", "default", ("n_train: 128", "n_train: abc"))):
        (conf / group).mkdir(parents=True)
        (conf / group / "typo.yaml").write_text((CONF / group / f"{name}.yaml").read_text().replace(*edit))
    cache = tmp_path / "cache"
    args = [arg for arg in ("model=tiny", "run.progress=false") if arg.split("=")[0] != override.split("=")[0]]
    args += [override, f"cache.dir={cache}", f"cache.models={tmp_path / 'models'}",
             f"hydra.run.dir={tmp_path / 'run'}", f"hydra.searchpath=[file://{conf}]"]
    started = time.perf_counter()

    status, err = run_cli(args, capsys, monkeypatch)

    assert time.perf_counter() - started < 10
    assert (status, err.strip().splitlines()) == (2, [f"error: {says}"])
    assert not [path for path in tmp_path.rglob("*") if cache in path.parents or path == tmp_path / "models"]


@pytest.mark.parametrize(
    ("section", "value", "says"),
    [
        ("mode", {"name": "x", "min_quality": 0.1, "top_n": True}, "mode.top_n must be an integer, got True"),
        ("mode", {"name": "x", "min_quality": 0.1}, "mode is missing mode.top_n; add it"),
        ("mode", {"name": "x", "min_quality": "0.1", "top_n": 3}, "mode.min_quality must be a number, got '0.1'"),
        ("ablate", {"embed": {"enabled": "no"}}, "ablate.embed.enabled must be true or false, got 'no'"),
        ("collect.positions", "first", "collect.positions must be one of last, post_instruction, post_instruction_mean"),
        ("model.arch.anything", "goes", None),
    ],
)
def test_check_holds_plain_values_to_the_schema_strictly(section, value, says):
    if says is None:
        check(section, value)
        return
    with pytest.raises(PipelineError, match=f"^{says}"):
        check(section, value)


def test_a_setting_left_unset_fails_when_sliced(tmp_path):
    cfg = compose_config(["model=tiny"])
    OmegaConf.update(cfg, "model.revision", "???")
    with pytest.raises(PipelineError, match=r"^model is missing model\.revision; add it"):
        config_slice(cfg, ["model"])


def test_the_schema_applies_to_the_shipped_config_files_read_raw():
    """Every group file, merged onto its section's schema by hand, is accepted (no stray or misspelled key)."""
    for group, section in (("eval", "eval"), ("select", "select")):
        check(section, file_values(group))
    for name in PROMPTS:
        check("prompts", file_values("prompts", name))
