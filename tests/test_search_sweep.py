"""The plan search as a Hydra sweep (`python -m pipeline -m +search=default`), on the tiny model.

A search of 4 trials, then a trial left RUNNING in the journal (a killed search), then the same command with
n_trials=6: the study resumes, the killed trial is retried, nothing is recomputed, and only the chosen plan is
exported. Also: the space's rules, the choice rule, a batch of trials launched together, and plan replay.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

import pipeline.search as search
import pipeline.search_space as space
from pipeline import model_cache
from pipeline.errors import PipelineError
from pipeline.pareto import pareto_front
from pipeline.plan import read_plan
from pipeline.search_schema import SearchSweeperConf
from tiny_pipeline import SMALL, compose_config, one_line_error, run_cli, run_in_process

SEED = ("{select: {direction_from: %s, skip_first: %s, skip_last: %s, scale: %s, attn_scale: %s, method: %s, "
        "directions: %s}}")
SEEDS = "hydra.sweeper.seeds=[%s, %s]" % (SEED % (0.5, 0.0, 0.0, 1.5, 1.5, "orthogonal", 1),
                                          SEED % (0.3, 0.15, 0.35, 0.5, 1.0, "norm_preserving", 2))
TINY = (*SMALL, "prompts.n_val=4", "eval.kl_prompts=4", "eval.harmless_max_new_tokens=4", "eval.kl_tokens=4",
        "eval.refusal_markers=[u,d,Sorry]")
"""SMALL with a small validation split and short harmless answers (a trial scores 4 + 4 prompts); single-letter
markers so that refusal counts differ between trials."""
SEARCH = ("+search=default", "hydra.sweeper.startup_trials=2", "hydra.sweeper.max_kl=10", SEEDS)


def default_settings(*overrides: str) -> dict:
    from omegaconf import OmegaConf
    from hydra import compose, initialize_config_dir
    from tiny_pipeline import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["+search=default", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)


def load(study_dir: Path) -> list:
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name=search.STUDY_NAME, storage=storage).get_trials()


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- the space and the choice, without a model -------------------------------------------------------------------


def test_the_default_preset_is_a_valid_space_seeded_with_the_band_default():
    settings = default_settings()
    found = space.validate(settings)
    assert found.keys == ("select.direction_from", "select.skip_first", "select.skip_last", "select.scale",
                          "select.attn_scale", "select.method", "select.directions")
    assert found.trial_overrides == ("eval.split=validation",) and found.export and found.n_jobs is None
    band = compose_config(["mode=band"]).select
    assert {key: band[key.split(".")[1]] for key in found.keys} in found.seeds
    assert set(settings) == {field for field in SearchSweeperConf.__dataclass_fields__}


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.params.select.skip_last.high=0.6", "select.skip_first and select.skip_last sum to >= 1"),
    ("hydra.sweeper.params.select.scale.high=5.0", "reaches a value select.scale does not take"),
    ("+hydra.sweeper.params.select.nonsense={low: 0, high: 1}", "select.nonsense is not a setting"),
    ("hydra.sweeper.params.select.method.choices=[]", "must be {choices: [a, b, ...]} (non-empty"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials must be >= 1"),
])
def test_a_bad_space_is_one_line(override, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        space.validate(default_settings(override))


def test_an_integer_setting_is_sampled_as_integers_and_values_round_trip_as_overrides():
    settings = default_settings("+hydra.sweeper.params.mode.top_n={low: 1, high: 3}", "hydra.sweeper.seeds=[]")
    found = space.validate(settings)
    top_n = [param for param in found.params if param.key == "mode.top_n"][0]
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {top_n.suggest(study.ask()) for _ in range(30)}
    assert drawn == {1, 2, 3}
    assert space.overrides({"select.attn_scale": 0.15000000000000002, "mode.top_n": 2, "select.method": "orthogonal",
                            "x.text": "a b", "x.flag": True}) == [
        "select.attn_scale=0.15", "mode.top_n=2", "select.method=orthogonal", "x.text='a b'", "x.flag=true"]


def finished(number: int, refused: int, kl: float, n: int = 64):
    trial = create_trial(values=[refused / n, kl], user_attrs={"refused": refused, "n": n},
                         params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)})
    trial.number = number
    return trial


def test_choice_is_fewest_refusals_within_max_kl_then_lower_kl_else_the_lowest_kl():
    trials = [finished(0, 30, 0.02), finished(1, 5, 0.30), finished(2, 9, 0.09), finished(3, 9, 0.05),
              finished(4, 12, 0.01)]
    assert [search.choose(trials, max_kl).number for max_kl in (0.10, 0.01, 1.0)] == [3, 4, 1]
    assert search.choose([finished(0, 2, 0.5), finished(1, 20, 0.2), finished(2, 10, 0.2)], max_kl=0.1).number == 2


# --- a search on the tiny model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory, model_store):
    """4 trials; a trial left RUNNING in the journal; the same command with n_trials=6 (model loads counted)."""
    root = tmp_path_factory.mktemp("search")
    base = ["-m", *TINY, *SEARCH, f"cache.dir={root / 'cache'}", f"cache.models={model_store}"]
    patch = pytest.MonkeyPatch()
    model_cache.release()
    loads = model_cache.loads()
    try:
        first = _search(base, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={root / 'first'}", patch=patch)
        loads = model_cache.loads() - loads
        study_dir = Path(first["study_dir"])
        storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
        killed = optuna.load_study(study_name=search.STUDY_NAME, storage=storage).ask()
        killed_value = killed.suggest_float("select.direction_from", 0.2, 0.8, step=0.01)
        second = _search(base, "hydra.sweeper.n_trials=6", f"hydra.sweep.dir={root / 'second'}", patch=patch)
    finally:
        patch.undo()
    return {"root": root, "first": first, "second": second, "loads": loads, "killed": killed.number,
            "killed_value": killed_value}


class Uncaptured:
    """`run_cli`'s capsys where pytest's (per test) cannot serve a module fixture: output stays on the terminal."""

    def readouterr(self) -> SimpleNamespace:
        return SimpleNamespace(out="", err="")


def _search(base: list[str], *more: str, patch: pytest.MonkeyPatch) -> dict:
    """search.json of `python -m pipeline <base> <more>`, run in this process through the real entry point."""
    status, _ = run_cli([*base, *more], Uncaptured(), patch)
    assert status == 0
    sweep_dir = Path([item for item in more if item.startswith("hydra.sweep.dir=")][0].split("=", 1)[1])
    return json.loads((sweep_dir / "search" / "search.json").read_text())


def test_trials_are_pipeline_jobs_that_export_nothing_and_share_one_model_load(searched):
    root, first = searched["root"], searched["first"]
    jobs = sorted(path.name for path in (root / "first").iterdir() if (path / "run.json").exists())
    assert jobs == ["0", "1", "2", "3", "export"]
    for job in "0123":
        run = json.loads((root / "first" / job / "run.json").read_text())
        assert set(run["stages"]) == {"collect", "baseline", "measure", "select", "evaluate"}, job
        assert "eval.split=validation" in run["overrides"] and "run.export=false" in run["overrides"]
    export = json.loads((root / "first" / "export" / "run.json").read_text())
    assert "ablate" in export["stages"] and "eval.split=validation" not in export["overrides"]
    exported = {Path(json.loads((root / run / "export" / "run.json").read_text())["stages"]["ablate"]["dir"]).name
                for run in ("first", "second")}  # the resumed search may choose another plan
    assert {path.name for path in (root / "cache" / "ablate").iterdir() if not path.name.startswith(".")} == exported
    assert searched["loads"] == 1  # trials, the export's baseline on the eval split and its evaluate: one load
    assert (Path(first["study_dir"]) / "journal.log").is_file() and first["trials"] == 4
    summary = rows(root / "first" / "summary.csv")  # the sweep summary still covers every job
    assert len(summary) == 5
    assert summary[0]["export"].endswith("select.method=orthogonal select.directions=1 'run.stages=[ablate]'")
    assert "search=" not in summary[0]["export"]  # a single run that exports the trial, not another search


def test_a_rerun_with_more_trials_resumes_and_retries_the_killed_trial(searched):
    root, second = searched["root"], searched["second"]
    assert second["study_dir"] == searched["first"]["study_dir"] and second["trials"] == 6
    assert second["launched_now"] == 2 and second["interrupted"] == 1
    trials = load(Path(second["study_dir"]))
    assert trials[searched["killed"]].state == TrialState.FAIL
    retry = [trial for trial in trials if trial.user_attrs.get("retry_of") == searched["killed"]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["select.direction_from"] == searched["killed_value"]
    assert [trial.user_attrs.get("seed_point") for trial in trials[:2]] == [True, True]
    launched = sorted(path.name for path in (root / "second").iterdir() if (path / "run.json").exists())
    assert launched == [str(retry[0].number), str(retry[0].number + 1), "export"]  # the first 4 are not rerun
    first_values = {row["trial"]: row["kl"] for row in rows(root / "first" / "search" / "trials.csv")}
    again = {row["trial"]: row["kl"] for row in rows(root / "second" / "search" / "trials.csv")}
    assert {trial: again[trial] for trial in first_values} == first_values


def test_the_front_and_the_choice_follow_the_trials(searched):
    results = searched["root"] / "second" / "search"
    trials = rows(results / "trials.csv")
    assert len(trials) == 6 and (results / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    points = [(float(row["kl"]), float(row["refusal_rate"])) for row in trials]
    assert [row["trial"] for row in rows(results / "pareto.csv")] == [trials[i]["trial"] for i in pareto_front(points)]
    best = min(trials, key=lambda row: (int(row["refused"]), float(row["kl"]), int(row["trial"])))  # max_kl=10
    chosen = searched["second"]["chosen"]
    assert chosen["trial"] == int(best["trial"]) and [row["chosen"] for row in trials].count("True") == 1
    assert chosen["kl"] > 1e-5 and 0 < sum(int(row["refused"]) for row in trials) < 6 * 4


def test_the_chosen_trial_is_the_evaluate_stage_and_the_export_its_plan(searched, model_store):
    """The trial's numbers are what evaluate computes again for its overrides; the export applies the same plan."""
    root, summary = searched["root"], searched["second"]
    chosen = summary["chosen"]
    again = run_in_process([*TINY, *chosen["overrides"], "eval.split=validation", "run.force=[evaluate]",
                            "run.export=false", f"cache.dir={root / 'cache'}", f"cache.models={model_store}"])
    assert not again["stages"]["evaluate"]["cached"]
    metrics = json.loads((Path(again["stages"]["evaluate"]["dir"]) / "metrics.json").read_text())
    assert (metrics["refusal_after"]["refused"], metrics["kl_divergence"]) == (chosen["refused"], chosen["kl"])
    export = summary["export"]
    plan = root / "second" / "search" / "ablation.yaml"
    assert (Path(export["stages"]["select"]["dir"]) / "ablation.yaml").read_bytes() == plan.read_bytes()
    assert Path(export["model"]).is_dir() and export["n"] == 8 and chosen["n"] == 4  # eval split, validation split
    assert read_plan(plan)["layers"][0]["direction_from"] == chosen["direction_layer"]


def test_replaying_the_exported_plan_reproduces_it(searched, tmp_path, model_store):
    root = searched["root"]
    plan = root / "second" / "search" / "ablation.yaml"
    where = (f"cache.dir={root / 'cache'}", f"cache.models={model_store}")
    replay = run_in_process([*TINY, f"plan={plan}", "run.stages=[select]", *where])
    assert (Path(replay["stages"]["select"]["dir"]) / "ablation.yaml").read_bytes() == plan.read_bytes()
    edited = tmp_path / "ablation.yaml"
    edited.write_text(plan.read_text().replace("hidden_size: 64", "hidden_size: 128"))
    with pytest.raises(PipelineError, match=r"is for a model with hidden_size=128, the measurement has 64"):
        run_in_process([*TINY, f"plan={edited}", "run.stages=[select]", *where])


@pytest.mark.parametrize("args, says", [
    (("select.scale=1.0",), "select.scale=1.0: the search sets select.scale itself"),
    (("mode.top_n=1,2",), "mode.top_n=1,2: a search varies only hydra.sweeper.params"),
    (("hydra.sweeper.params.select.skip_last.high=0.6",), "sum to >= 1"),
    (("hydra.sweeper.params.select.direction_from.high=1.5",),  # a union the schema takes: select's validate step
     "select.direction_from must be one of own, best or a depth fraction in [0, 1], got 1.5"),
])
def test_the_command_line_says_what_is_wrong_in_one_line_before_any_work(tmp_path, model_store, args, says, capsys,
                                                                           monkeypatch):
    status, err = run_cli(["-m", *TINY, *SEARCH, *args, f"cache.dir={tmp_path / 'cache'}",
                           f"cache.models={model_store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys, monkeypatch)
    assert says in one_line_error(status, err)
    assert not (tmp_path / "cache" / "collect").exists()


def test_a_study_held_by_another_search_is_refused(searched, model_store, capsys, monkeypatch):
    from filelock import FileLock

    study_dir = Path(searched["second"]["study_dir"])
    root = searched["root"]
    with FileLock(str(study_dir.parent / f".{study_dir.name}.lock")):
        status, err = run_cli(["-m", *TINY, *SEARCH, "hydra.sweeper.n_trials=6", f"cache.dir={root / 'cache'}",
                               f"cache.models={model_store}", f"hydra.sweep.dir={root / 'held'}"], capsys, monkeypatch)
    assert "another run holds" in one_line_error(status, err)


def test_a_batch_of_trials_is_asked_for_and_launched_together(searched, tmp_path, model_store, capsys, monkeypatch):
    """`hydra.sweeper.n_jobs=2`: two trials per launch (on joblib, two workers; docs/sweeps.md), a new study
    (run.seed=1) over the cached upstream stages; without -m, as the preset sets hydra.mode=MULTIRUN."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    batches: list[int] = []
    launch = BasicLauncher.launch
    monkeypatch.setattr(BasicLauncher, "launch",
                        lambda self, jobs, **kw: batches.append(len(jobs)) or launch(self, jobs, **kw))
    status, err = run_cli([*TINY, *SEARCH, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
                           "hydra.sweeper.export=false", "run.seed=1", f"cache.dir={searched['root'] / 'cache'}",
                           f"cache.models={model_store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys, monkeypatch)
    assert status == 0, err[-3000:]
    assert batches == [2]
    summary = json.loads((tmp_path / "sweep" / "search" / "search.json").read_text())
    assert summary["trials"] == 2 and summary["study_dir"] != searched["second"]["study_dir"] and "export" not in summary
