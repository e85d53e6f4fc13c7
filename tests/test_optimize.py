"""`python -m pipeline.optimize` and plan replay, on the tiny model with small prompt counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

import pipeline.optimize as optimize
import pipeline.search_space as space
from pipeline.__main__ import run_pipeline
from pipeline.errors import PipelineError
from pipeline.pareto import pareto_front
from pipeline.plan import plan_to_text, read_plan, validate_plan
from pipeline.runner import Runner, execution_order
from pipeline.stages import registry
from pipeline.measurement import Measurements
from pipeline.selection import build_plan, settings_from_config
from pipeline.store import ArtifactStore

CONF = Path(__file__).resolve().parents[1] / "conf"
# Single bytes the tiny model's random completions sometimes contain, so refusal counts are not all zero.
SMALL = [
    "model=tiny",
    "prompts.n_train=16",
    "prompts.n_eval=8",
    "eval.kl_prompts=8",
    "eval.max_new_tokens=4",
    "eval.refusal_markers=[u,d]",
    "run.progress=false",
    "optimize.startup_trials=2",
    "optimize.max_kl=10",
    "optimize.prune_above_kl=null",
    "optimize.seeds=[{direction_from: 0.5, skip_first: 0.0, skip_last: 0.0, attn_scale: 1.5, scale: 1.5, "
    "method: orthogonal}, {direction_from: 0.3, skip_first: 0.15, skip_last: 0.35, attn_scale: 1.0, "
    "scale: 0.5, method: norm_preserving}]",
]


def config(cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=[*SMALL, f"cache.dir={cache}", *overrides])


def fake_measurements(num_layers: int = 24, hidden: int = 8) -> Measurements:
    meta = {"model_id": "m", "model_fingerprint": "f", "hidden_size": str(hidden), "num_layers": str(num_layers)}
    quality = torch.linspace(0.001, 0.1, num_layers, dtype=torch.float64)
    return Measurements(meta=meta, tensors={"signal_quality": quality})


# --- the plan space --------------------------------------------------------------------------------------------


def params(**changes) -> dict:
    base = {"direction_from": 0.5, "skip_first": 0.25, "skip_last": 0.25, "attn_scale": 0.15000000000000002,
            "scale": 1.25, "method": "norm_preserving"}
    return {**base, **changes}


def test_a_trial_plan_is_select_keeping_every_layer_of_the_window_with_a_fractional_direction():
    # 24 layers: skip_first 0.25 and skip_last 0.25 leave floor(6) first and floor(6) last layers out: 6..17
    plan = space.trial_plan(params(), fake_measurements(), "abc")
    assert [entry["layer"] for entry in plan["layers"]] == list(range(6, 18))
    first = plan["layers"][0]
    assert (first["direction_from"], first["attn_scale"], first["scale"]) == (11.5, 0.15, 1.25)
    assert plan["direction_source"] == "single" and plan["mode"] == "search" and plan["method"] == "norm_preserving"
    assert plan["thresholds"] == {"min_quality": 0.0, "top_n": 24, "relative_min": 0.0, "skip_first": 0.25,
                                  "skip_last": 0.25}
    assert space.plan_summary(plan) == {"direction_layer": 11.5, "first_layer": 6, "last_layer": 17, "n_layers": 12}


def test_the_preset_is_the_select_overrides_of_the_trial():
    preset = space.preset(params())
    assert preset == ["mode=band", "select.method=norm_preserving", "select.direction_from=0.5", "select.skip_first=0.25",
                      "select.skip_last=0.25", "select.scale=1.25", "select.attn_scale=0.15"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[*preset, "mode.name=search", "mode.top_n=24"])
    selected = build_plan(fake_measurements(), settings_from_config(OmegaConf.to_container(cfg)), "abc")
    assert plan_to_text(selected) == plan_to_text(space.trial_plan(params(), fake_measurements(), "abc"))


def test_the_searched_windows_always_keep_a_layer():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        search = space.validate(dict(compose("config").optimize))
    widest = params(skip_first=search.floats["skip_first"][1], skip_last=search.floats["skip_last"][1])
    for num_layers in range(1, 130):
        assert space.trial_plan(widest, fake_measurements(num_layers), "abc")["layers"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["optimize.space.skip_last=[0.0,0.55,0.005]"])
    with pytest.raises(PipelineError, match="optimize.space.skip_first and skip_last may exclude every layer"):
        space.validate(dict(cfg.optimize))


def test_plan_format_checks_fractional_and_shared_directions():
    plan = space.trial_plan(params(skip_first=0.45, skip_last=0.45, method="orthogonal"), fake_measurements(), "abc")
    own = {**plan, "direction_source": "own"}
    with pytest.raises(PipelineError, match="direction_source is own but a direction_from is fractional"):
        validate_plan(own, "p")
    split = {**plan, "layers": [plan["layers"][0], {**plan["layers"][1], "direction_from": 3}]}
    with pytest.raises(PipelineError, match="single but the layers take directions from different layers"):
        validate_plan(split, "p")
    beyond = {**plan, "layers": [{**entry, "direction_from": 23.5} for entry in plan["layers"]]}
    with pytest.raises(PipelineError, match="direction_from 23.5 is outside 0..23"):
        validate_plan(beyond, "p")


def test_default_config_is_a_valid_search_space_seeded_with_the_band_default():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config")
    search = space.validate(dict(cfg.optimize))
    assert set(search.floats) == set(space.FLOAT_PARAMS) and len(search.seeds) >= 3
    assert {name: cfg.select[name] for name in space.PARAMS} in search.seeds  # mode=band's settings
    assert cfg.plan is None and cfg.optimize.max_kl == 0.10


def test_seeds_outside_the_space_are_refused():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["optimize.space.attn_scale=[0.0,0.4,0.05]"])
    with pytest.raises(PipelineError, match=r"optimize.seeds\[\d\] lies outside optimize.space"):
        space.validate(dict(cfg.optimize))


# --- choosing --------------------------------------------------------------------------------------------------


def finished(number: int, refused: int, kl: float, n: int = 64):
    trial = create_trial(values=[refused / n, kl], user_attrs={"refused": refused, "n": n},
                         params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)})
    trial.number = number
    return trial


def test_choice_is_fewest_refusals_within_max_kl_then_lower_kl():
    trials = [finished(0, 30, 0.02), finished(1, 5, 0.30), finished(2, 9, 0.09), finished(3, 9, 0.05),
              finished(4, 12, 0.01)]
    assert optimize.choose(trials, max_kl=0.10).number == 3
    assert optimize.choose(trials, max_kl=0.01).number == 4
    assert optimize.choose(trials, max_kl=1.0).number == 1


def test_without_a_trial_within_max_kl_the_lowest_kl_trial_is_chosen():
    trials = [finished(0, 2, 0.5), finished(1, 20, 0.2), finished(2, 10, 0.2)]
    assert optimize.choose(trials, max_kl=0.1).number == 2


def test_pareto_front_keeps_non_dominated_trials_by_kl():
    trials = [finished(0, 30, 0.02), finished(1, 5, 0.30), finished(2, 9, 0.09), finished(3, 9, 0.05),
              finished(4, 12, 0.01), finished(5, 12, 0.4)]
    assert [trials[i].number for i in pareto_front([optimize.objectives(t) for t in trials])] == [4, 3, 1]


# --- the study on the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """3 trials, then a killed 4th (left RUNNING), then a rerun asking for 5: scoring calls per run counted."""
    root = tmp_path_factory.mktemp("optimize")
    calls: list[int] = []
    original = optimize.harmless_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(optimize, "harmless_logprobs", counting)
    try:
        first = optimize.run_optimize(config(root / "cache", "optimize.trials=3"), root / "run1")
        first_calls = len(calls)
        storage = JournalStorage(JournalFileBackend(str(Path(first["study_dir"]) / "journal.log")))
        killed = optuna.load_study(study_name=optimize.STUDY_NAME, storage=storage).ask()
        killed_params = {"direction_from": killed.suggest_float("direction_from", 0.2, 0.8, step=0.01)}
        second = optimize.run_optimize(config(root / "cache", "optimize.trials=5"), root / "run2")
    finally:
        patch.undo()
    return {"root": root, "first": first, "second": second, "first_calls": first_calls,
            "second_calls": len(calls) - first_calls, "killed": killed.number, "killed_params": killed_params}


def test_a_resumed_study_scores_only_the_missing_trials(study):
    assert study["first_calls"] == 3 and study["first"]["trials"] == 3
    assert study["second_calls"] == 2 and study["second"]["trials"] == 5
    assert study["first"]["study_dir"] == study["second"]["study_dir"]


def test_a_trial_left_running_is_failed_and_its_parameters_retried(study):
    storage = JournalStorage(JournalFileBackend(str(Path(study["second"]["study_dir"]) / "journal.log")))
    trials = optuna.load_study(study_name=optimize.STUDY_NAME, storage=storage).get_trials()
    assert trials[study["killed"]].state == TrialState.FAIL
    retry = [trial for trial in trials if trial.user_attrs.get("retry_of") == study["killed"]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["direction_from"] == study["killed_params"]["direction_from"]
    assert sum(trial.state == TrialState.COMPLETE for trial in trials) == 5
    assert [trial.user_attrs.get("seed_point") for trial in trials[:2]] == [True, True]


def test_results_land_in_the_run_dir_and_the_study_dir(study):
    run_dir, study_dir = study["root"] / "run2", Path(study["second"]["study_dir"])
    for name in (*optimize.RESULT_FILES, "optimize.json"):
        assert (run_dir / name).read_bytes() == (study_dir / name).read_bytes(), name
    assert (run_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    rows = (run_dir / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,refusal_rate,refused,n,kl,method,direction_from") and len(rows) == 6
    front = (run_dir / "pareto.csv").read_text().splitlines()[1:]
    assert 1 <= len(front) <= 5 and sum(line.endswith(",True,True") for line in front) == 1
    assert study["second"]["chosen"]["trial"] == optimize.choose(
        [t for t in optuna.load_study(study_name="optimize", storage=JournalStorage(
            JournalFileBackend(str(study_dir / "journal.log")))).get_trials() if t.state == TrialState.COMPLETE],
        max_kl=10).number


def test_the_export_is_the_chosen_trial_scored_by_the_evaluate_stage(study):
    summary = study["second"]
    chosen, final = summary["chosen"], summary["final"]
    assert chosen["kl"] > 1e-4, "KL must be far above the 1e-6 replay tolerance for the check to mean anything"
    assert final["refused"] == chosen["refused"] and final["n"] == chosen["n"] == 8
    assert final["kl"] == pytest.approx(chosen["kl"], abs=1e-6)
    select_dir = Path(summary["export"]["stages"]["select"]["dir"])
    assert (select_dir / "ablation.yaml").read_bytes() == (Path(summary["study_dir"]) / "ablation.yaml").read_bytes()


def test_python_m_pipeline_with_plan_reproduces_the_trial(study):
    root, summary = study["root"], study["second"]
    plan_path = study["root"] / "run2" / "ablation.yaml"
    result = run_pipeline(config(root / "cache", f"plan={plan_path}", "run.force=[select,ablate,evaluate]"))
    assert not any(result["stages"][name]["cached"] for name in ("select", "ablate", "evaluate"))
    evaluate_dir = Path(result["stages"]["evaluate"]["dir"])
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    assert metrics["refusal_after"]["refused"] == summary["chosen"]["refused"]
    assert metrics["kl_divergence"] == pytest.approx(summary["chosen"]["kl"], abs=1e-6)
    replayed = Path(result["stages"]["select"]["dir"]) / "ablation.yaml"
    assert replayed.read_bytes() == plan_path.read_bytes()
    assert read_plan(replayed)["layers"][0]["direction_from"] == summary["chosen"]["plan"]["direction_layer"]


def test_the_chosen_trial_plan_is_what_select_writes_for_its_preset(study):
    """The winner's settings, given to the select stage through the normal pipeline, select the same plan."""
    root, summary = study["root"], study["second"]
    exported = Path(summary["study_dir"]) / "ablation.yaml"
    overrides, num_layers = summary["chosen"]["preset"], read_plan(exported)["num_layers"]
    exact = run_pipeline(config(root / "cache", *overrides, "mode.name=search", f"mode.top_n={num_layers}",
                                "run.stages=[select]"))
    assert (Path(exact["stages"]["select"]["dir"]) / "ablation.yaml").read_bytes() == exported.read_bytes()
    band = run_pipeline(config(root / "cache", *overrides, "run.stages=[select]"))
    assert read_plan(Path(band["stages"]["select"]["dir"]) / "ablation.yaml")["layers"] == read_plan(exported)["layers"]


# --- plan replay in the select stage ---------------------------------------------------------------------------


def select_key(cfg) -> str:
    runner = Runner(cfg, registry(), cache_dir=Path(cfg.cache.dir), model_store=Path(cfg.cache.models))
    return runner.plan(execution_order(registry(), ["select"]))["select"][0]


def test_the_plan_file_content_is_part_of_the_select_key(study, tmp_path):
    cache = study["root"] / "cache"
    plan_path = tmp_path / "ablation.yaml"
    plan_path.write_bytes((study["root"] / "run2" / "ablation.yaml").read_bytes())
    unplanned = select_key(config(cache))
    before = select_key(config(cache, f"plan={plan_path}"))
    plan_path.write_text(plan_path.read_text() + "# reviewed\n")  # same plan, other bytes: select must re-run
    after = select_key(config(cache, f"plan={plan_path}"))
    assert len({unplanned, before, after}) == 3


def test_a_missing_plan_file_is_a_pipeline_error(study, tmp_path):
    with pytest.raises(PipelineError, match=r"^plan=.*does-not-exist.yaml does not exist"):
        run_pipeline(config(study["root"] / "cache", f"plan={tmp_path / 'does-not-exist.yaml'}"))


def test_a_plan_for_another_model_shape_is_refused(study, tmp_path):
    plan_path = tmp_path / "ablation.yaml"
    text = (study["root"] / "run2" / "ablation.yaml").read_text()
    plan_path.write_text(text.replace("hidden_size: 64", "hidden_size: 128"))
    with pytest.raises(PipelineError, match=r"is for a model with hidden_size=128, the measurement has 64"):
        run_pipeline(config(study["root"] / "cache", f"plan={plan_path}", "run.stages=[select]"))


def test_a_second_study_on_the_same_dir_is_refused_while_one_runs(study):
    study_dir = Path(study["second"]["study_dir"])
    lock = FileLock(str(ArtifactStore(study_dir.parent).lock_path(study_dir.name)))
    with lock, pytest.raises(PipelineError, match="another run holds .*optimize"):
        optimize.run_optimize(config(study["root"] / "cache", "optimize.trials=5"))


def test_a_trial_above_prune_above_kl_is_pruned_without_generating(study, monkeypatch):
    generated: list[int] = []
    original = optimize.refusals
    monkeypatch.setattr(optimize, "refusals", lambda *a, **k: generated.append(1) or original(*a, **k))
    gentle = "{direction_from: 0.5, skip_first: 0.45, skip_last: 0.45, attn_scale: 0.0, scale: 0.05, method: orthogonal}"
    strong = "{direction_from: 0.5, skip_first: 0.0, skip_last: 0.0, attn_scale: 1.5, scale: 1.5, method: orthogonal}"
    summary = optimize.run_optimize(config(
        study["root"] / "cache", "optimize.trials=2", "optimize.max_kl=0.001", "optimize.prune_above_kl=0.001",
        "optimize.export=false",
        f"optimize.seeds=[{strong}, {gentle}]"))
    storage = JournalStorage(JournalFileBackend(str(Path(summary["study_dir"]) / "journal.log")))
    trials = optuna.load_study(study_name=optimize.STUDY_NAME, storage=storage).get_trials()
    assert [trial.state for trial in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[0].user_attrs["kl"] > 0.001 >= trials[1].values[1]
    assert len(generated) == 1 and summary["pruned"] == 1 and summary["chosen"]["trial"] == 1
    assert "export" not in summary


def test_prune_above_kl_below_max_kl_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="optimize.prune_above_kl=0.05 is below optimize.max_kl=0.1"):
        optimize.run_optimize(config(tmp_path, "optimize.max_kl=0.1", "optimize.prune_above_kl=0.05"))


@pytest.mark.parametrize("override, message", [
    ("optimize.space.skip_last=[0.0,0.6,0.01]", "optimize.space.skip_first and skip_last may exclude every layer"),
    ("optimize.band_width=0.5", "optimize.band_width"),  # the old parameters are gone: Hydra's error, in one line
])
def test_the_command_line_reports_a_bad_setting_in_one_line_with_status_2(tmp_path, override, message):
    command = [sys.executable, "-m", "pipeline.optimize", "model=tiny", override, f"cache.dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
