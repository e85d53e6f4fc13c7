"""The plan search: `python -m pipeline -m +search=default hydra.sweeper.n_trials=30`.

A sweep whose points a study chooses. The sweeper (`hydra/sweeper=pipeline_search`, the shell in
`pipeline/hydra_plugins/`) asks an Optuna study for a batch of trials, turns each into the overrides of an
ordinary pipeline job (`pipeline.search_space`: `select.scale=1.25 ...`, plus `run.stages=[evaluate]
run.export=false` and `hydra.sweeper.trial_overrides`) and hands the batch to the launcher `hydra/launcher`
names: the basic launcher runs the jobs one after another in this process (one model load in all), joblib
or submitit run them side by side. A trial therefore is select -> evaluate through the cache: collect, measure
and baseline are computed once (the per-key locks make parallel jobs wait for each other), the plan is applied
to the loaded model in memory, nothing is exported, and its objectives are the evaluate stage's metrics, both
minimized: the refusal rate on the held-out harmful prompts and the first-token KL on the harmless ones.

Sampler: multivariate TPE (MOTPE) seeded by `run.seed` plus the trials already run, models the front after
`startup_trials` trials, takes the hand-picked `seeds` first, and lies constantly about trials still running
(`constant_liar`) so a batch asked at once spreads out.

Persistence: the study is an Optuna journal (JSON lines) in `<cache.dir>/search/<key>/journal.log`, held
exclusively for the whole search (`ArtifactStore.exclusive`), so a trial still RUNNING when the next search
opens it belongs to a dead process: it is marked FAIL and its parameters queued again. The key hashes what
the trials' numbers depend on besides the searched values (`study_key`), not `n_trials` nor `max_kl`: a rerun
with more trials resumes the study, a new `max_kl` only re-chooses.

Choice: the trial with the fewest refusals among those with KL <= `max_kl`, ties to the lower KL, then the
earlier trial; when none is within `max_kl`, the lowest-KL trial, with a warning. The sweep's last job exports
it: the chosen overrides with `run.export=true` and without the trial overrides (so it is scored with the eval
settings a single run uses), in `<sweep dir>/export/`. `<sweep dir>/search/` gets search.json, trials.csv,
pareto.csv, pareto.png and the chosen ablation.yaml.

Pruning on a large KL (the hand-written loop's `prune_above_kl`) is gone: a trial is the evaluate stage, whose
artifact is whole or absent, and a stage that stops halfway on a search setting would need a second artifact
shape under the same key; Optuna's pruners do not serve multi-objective studies either.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shlex
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.pareto import pareto_front
from pipeline.paths import user_path
from pipeline.plan import read_plan, write_plan
from pipeline.plots import plot_pareto
from pipeline.runner import Runner, execution_order, hashed_slice
from pipeline.schema import check
from pipeline.search_space import Search, overrides, plan_summary, validate, values
from pipeline.stage import Stage
from pipeline.store import ArtifactStore

log = logging.getLogger("pipeline.search")

STUDY_VERSION = "4"  # 4: a trial is a pipeline job (select -> evaluate), its objectives the evaluate stage's metrics
"""Bump when what a trial measures changes: old journals stop matching."""
STUDY_NAME = "search"
STORE = "search"
"""`<cache.dir>/search/<study key>/journal.log`."""
TRIAL = ("run.stages=[evaluate]", "run.export=false")
EXPORT = ("run.stages=[evaluate]", "run.export=true", "hydra.sweep.subdir=export")
RESULTS = "search"
"""The folder in the sweep dir for the search's own files (the sweep summary writes its pareto.png beside it)."""
CSV_COLUMNS = ("trial", "refusal_rate", "refused", "n", "kl", "direction_layer", "first_layer", "last_layer",
               "n_layers", "job", "on_front", "chosen")


# --- the study -----------------------------------------------------------------------------------------------


def open_study(study_dir: Path, search: Search, seed: int) -> optuna.Study:
    """Create or resume the study in `study_dir` (the caller holds it exclusively).

    Trials left RUNNING belong to a killed search: they are marked FAIL (never counted) and their
    parameters queued again, so an interrupted seed is not lost. Seeds are queued once, in a new study.
    """
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    existing = len(storage.get_all_studies()) > 0
    # Seeded by run.seed plus the trials already run, so a resumed study draws a fresh, reproducible stream.
    trials_so_far = storage.get_n_trials(storage.get_study_id_from_name(STUDY_NAME)) if existing else 0
    with warnings.catch_warnings():  # multivariate TPE, constant_liar and metric names are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed + trials_so_far,
                                             n_startup_trials=search.startup_trials)
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                    sampler=sampler, load_if_exists=True)
        study.set_metric_names(["refusal_rate", "kl"])
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, stale.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
        log.warning("trial %d was left running by an interrupted search: marked failed and queued again", stale.number)
    if not existing:
        for point in search.seeds:
            study.enqueue_trial(dict(point), user_attrs={"seed_point": True})
    return study


def trials_in(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def ended(study: optuna.Study) -> list[FrozenTrial]:
    """The trials `n_trials` counts: complete, or failed in their job (not those a dead search left running)."""
    return [trial for trial in study.get_trials(deepcopy=False)
            if trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)]


def study_key(keys: Mapping[str, tuple[str, dict, dict]], registry: Mapping[str, Stage], search: Search, seed: int) -> str:
    """What the trials' numbers depend on besides the searched values: the cache keys of the stages no searched
    setting reaches, and for the others their version, config slice without the searched settings and inputs."""
    stages, reached = {}, set()
    for name, (key, slice_values, digests) in keys.items():
        stage = registry[name]
        if any(covers(slice_values, setting) for setting in search.keys) or reached & set(stage.needs):
            reached.add(name)
            kept = hashed_slice(without(slice_values, search.keys))
            stages[name] = {"version": stage.version, "config": kept, "inputs": digests}
        else:
            stages[name] = key
    space = [[param.key, param.describe()] for param in search.params]
    return artifacts.content_key({"version": STUDY_VERSION, "stages": stages, "seed": seed, "space": space,
                                  "seeds": list(search.seeds), "startup_trials": search.startup_trials})


def covers(slice_values: Mapping[str, Any], setting: str) -> bool:
    return any(setting == key or setting.startswith(f"{key}.") for key in slice_values)


def _place(slice_values: dict, setting: str) -> tuple[dict, str] | None:
    """(the mapping that holds the dotted `setting` in a config slice, its key there); None when there is none."""
    for key in slice_values:
        if setting == key:
            return slice_values, key
        if setting.startswith(f"{key}."):
            node, parts = slice_values[key], setting[len(key) + 1:].split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            return (node, parts[-1]) if isinstance(node, dict) else None
    return None


def without(slice_values: Mapping[str, Any], settings: Sequence[str]) -> dict[str, Any]:
    """A config slice (`{"select": {...}, "ablate.embed": {...}}`) with the dotted `settings` removed."""
    kept = copy.deepcopy(dict(slice_values))
    for setting in settings:
        if (place := _place(kept, setting)) is not None:
            place[0].pop(place[1], None)
    return kept


def with_value(slice_values: Mapping[str, Any], setting: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(dict(slice_values))
    if (place := _place(changed, setting)) is not None:
        place[0][place[1]] = value
    return changed


def point_checker(keys: Mapping[str, tuple[str, dict, dict]], registry: Mapping[str, Stage]) -> Callable[[str, Any], None]:
    """`check_value` for `search_space.validate`: the schema's types and ranges, then the validate step of every
    stage whose config slice holds the setting, on the trials' config with the value put in."""
    def check_value(setting: str, value: Any) -> None:
        check(setting, value)
        for name, (_, slice_values, _) in keys.items():
            if covers(slice_values, setting) and registry[name].validate is not None:
                registry[name].validate(with_value(slice_values, setting, value))

    return check_value


# --- trials --------------------------------------------------------------------------------------------------


def batch_size(search: Search, config: DictConfig) -> int:
    """`n_jobs`, else the launcher's (`hydra.launcher.n_jobs`, joblib's negatives counted as joblib counts them)."""
    if search.n_jobs is not None:
        return search.n_jobs
    jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
    if not isinstance(jobs, int) or jobs == 0:
        return 1
    return jobs if jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + jobs)


def job_summary(result: JobReturn) -> tuple[dict | None, str]:
    """(run.json's content, the job's folder) of a finished job; None when the job failed."""
    folder = str(OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir", default="")) if result.hydra_cfg else ""
    if result.status == JobStatus.COMPLETED and isinstance(result.return_value, Mapping):
        return dict(result.return_value), folder
    return None, folder


def job_error(folder: str) -> str:
    run_json = Path(folder) / "run.json"
    if folder and run_json.is_file():
        return str(json.loads(run_json.read_text(encoding="utf-8")).get("error", "the job failed"))
    return "the job failed before writing run.json"


def trial_numbers(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The objectives and what the trial planned, read from its evaluate and select artifacts."""
    stages = summary["stages"]
    if "evaluate" not in stages:
        raise PipelineError("the job ran no evaluate stage")
    metrics = json.loads((Path(stages["evaluate"]["dir"]) / "metrics.json").read_text(encoding="utf-8"))
    if "refusal_after" not in metrics:
        raise PipelineError("metrics.json has no refusal rate (eval.generate=false?); a trial needs generation")
    after = metrics["refusal_after"]
    plan = read_plan(Path(stages["select"]["dir"]) / "ablation.yaml")
    return {"refusal_rate": float(after["rate"]), "refused": int(after["refused"]), "n": int(after["n"]),
            "kl": float(metrics["kl_divergence"]), "select": stages["select"]["dir"], **plan_summary(plan)}


def tell(study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
    summary, folder = job_summary(result)
    trial.set_user_attr("job", folder)
    try:
        if summary is None:
            raise PipelineError(job_error(folder))
        numbers = trial_numbers(summary)
    except PipelineError as error:
        trial.set_user_attr("error", str(error))
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed (it counts as run, its settings are not retried): %s", trial.number, error)
        return
    for name, value in numbers.items():
        trial.set_user_attr(name, value)
    study.tell(trial, [numbers["refusal_rate"], numbers["kl"]])
    log.info("trial %d: refused %d/%d, KL %.4f, layers %d-%d  %s", trial.number, numbers["refused"], numbers["n"],
             numbers["kl"], numbers["first_layer"], numbers["last_layer"], " ".join(overrides(trial.params)))


def run_trials(sweeper: Sweeper, study: optuna.Study, search: Search, job_overrides: Sequence[str]) -> int:
    """Ask, launch and tell batches until `n_trials` trials have ended; returns how many were launched."""
    launched, size = 0, batch_size(search, sweeper.config)
    while (left := search.n_trials - len(ended(study))) > 0:
        trials = [study.ask() for _ in range(min(size, left))]
        batch = [[*job_overrides, *overrides({param.key: param.suggest(trial) for param in search.params})]
                 for trial in trials]
        sweeper.validate_batch_is_legal(batch)
        # Trial numbers are consecutive (one search holds the study), so job numbers are trial numbers.
        results = sweeper.launcher.launch(batch, initial_job_idx=trials[0].number)
        for trial, result in zip(trials, results):
            tell(study, trial, result)
        launched += len(trials)
        if not trials_in(study, TrialState.COMPLETE):  # an error every trial meets (an upstream stage) stops here
            raise PipelineError(f"trial {trials[-1].number} failed and none has completed, so the search stops: "
                                f"{study.trials[trials[-1].number].user_attrs['error']}")
    return launched


# --- choosing and reporting ----------------------------------------------------------------------------------


def choose(trials: Sequence[FrozenTrial], max_kl: float) -> FrozenTrial:
    """Fewest refusals with KL <= max_kl (ties: lower KL, then earlier trial); else the lowest-KL trial."""
    if not trials:
        raise PipelineError("the study has no completed trial to choose from; see the failed jobs' errors in summary.csv")
    within = [trial for trial in trials if trial.values[1] <= max_kl]
    if within:
        return min(within, key=lambda trial: (trial.user_attrs["refused"], trial.values[1], trial.number))
    best = min(trials, key=lambda trial: (trial.values[1], trial.user_attrs["refused"], trial.number))
    log.warning("no trial reached KL <= hydra.sweeper.max_kl=%g; exporting the lowest-KL trial %d (KL %.4f, %.4f over)",
                max_kl, best.number, best.values[1], best.values[1] - max_kl)
    return best


def objectives(trial: FrozenTrial) -> tuple[float, float]:
    """(KL, refusal rate): the front's and the plot's coordinates."""
    return trial.values[1], trial.values[0]


def trial_row(trial: FrozenTrial, on_front: bool, chosen: bool) -> dict[str, Any]:
    attrs = trial.user_attrs
    row = {"trial": trial.number, "refusal_rate": f"{trial.values[0]:.6f}", "refused": attrs["refused"], "n": attrs["n"],
           "kl": f"{trial.values[1]:.6f}", **values(trial.params)}
    return {**row, **{name: attrs[name] for name in CSV_COLUMNS[5:10]}, "on_front": on_front, "chosen": chosen}


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS[:5], *keys, *CSV_COLUMNS[5:]], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summarize(study: optuna.Study, search: Search, results: Path, launched: int) -> tuple[dict[str, Any], FrozenTrial]:
    """Choose the plan, write the trials, the front, its plot and the chosen ablation.yaml into `results`."""
    trials = trials_in(study, TrialState.COMPLETE)
    chosen = choose(trials, search.max_kl)
    points = [objectives(trial) for trial in trials]
    front = pareto_front(points)
    rows = [trial_row(trial, i in front, trial is chosen) for i, trial in enumerate(trials)]
    write_rows(results / "trials.csv", rows, search.keys)
    write_rows(results / "pareto.csv", [rows[i] for i in front], search.keys)
    plot_pareto(results / "pareto.png", points, front, f"plan search: {len(trials)} trials, {len(search.keys)} settings",
                point_label="trials", chosen=trials.index(chosen), chosen_label=f"exported (trial {chosen.number})",
                max_kl=search.max_kl)
    write_plan(results / "ablation.yaml", read_plan(Path(chosen.user_attrs["select"]) / "ablation.yaml"))
    failed = [trial for trial in ended(study) if trial.state == TrialState.FAIL]
    summary = {
        "trials": len(trials), "launched_now": launched, "failed": len(failed),
        "interrupted": len(trials_in(study, TrialState.FAIL)) - len(failed), "max_kl": search.max_kl,
        "chosen": {"trial": chosen.number, "refusal_rate": chosen.values[0], "kl": chosen.values[1],
                   **{name: chosen.user_attrs[name] for name in ("refused", "n", *CSV_COLUMNS[5:10])},
                   "overrides": overrides(chosen.params)},
        "front": [rows[i] for i in front],
    }
    return summary, chosen


# --- the sweep -----------------------------------------------------------------------------------------------


def single_values(arguments: Sequence[str], searched: Sequence[str]) -> None:
    """The command line gives every job the same settings: no sweeps, no replayed plan, no searched setting."""
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.key_or_group
        if override.is_sweep_override():
            raise PipelineError(f"{override.input_line}: a search varies only hydra.sweeper.params; give single values")
        if key == "plan" or key in searched:
            raise PipelineError(f"{override.input_line}: the search sets {'select' if key == 'plan' else key} "
                                "itself in every trial; remove it (or remove it from hydra.sweeper.params)")


def export(sweeper: Sweeper, arguments: Sequence[str], chosen: FrozenTrial, job: int) -> dict[str, Any]:
    """The sweep's last job: the chosen settings exported (ablate) and scored with the eval settings of a single run."""
    result = sweeper.launcher.launch([[*arguments, *EXPORT, *overrides(chosen.params)]], initial_job_idx=job)[0]
    summary, folder = job_summary(result)
    if summary is None:
        raise PipelineError(f"exporting trial {chosen.number} failed: {job_error(folder)}")
    numbers = trial_numbers(summary)
    return {"job": folder, "model": str(Path(summary["stages"]["ablate"]["dir"]) / "model"),
            "stages": summary["stages"], **{name: numbers[name] for name in ("refusal_rate", "refused", "n", "kl")}}


def run_search(sweeper: Sweeper, arguments: list[str]) -> dict[str, Any]:
    """Run (or resume) the study the sweeper's config describes, export its chosen plan; returns search.json."""
    from pipeline.stages import registry

    config = sweeper.config
    settings = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    search = validate(settings)
    single_values(arguments, search.keys)
    job_overrides = [*arguments, *TRIAL, *search.trial_overrides]
    trial_config = sweeper.hydra_context.config_loader.load_sweep_config(config, job_overrides)
    stages = registry()
    cache_dir = user_path(trial_config.cache.dir)
    runner = Runner(trial_config, stages, cache_dir=cache_dir, model_store=user_path(trial_config.cache.models))
    keys = runner.plan(execution_order(stages, ["evaluate"]))  # every setting and input checked before any work
    search = validate(settings, point_checker(keys, stages))
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    results = sweep_dir / RESULTS
    results.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    key = study_key(keys, stages, search, int(trial_config.run.seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with ArtifactStore(cache_dir / STORE).exclusive(key) as study_dir:
        study = open_study(study_dir, search, int(trial_config.run.seed))
        log.info("study %s: %d trials ended, %d wanted", study_dir, len(ended(study)), search.n_trials)
        launched = run_trials(sweeper, study, search, job_overrides)
        summary, chosen = summarize(study, search, results, launched)
        summary["study_dir"] = str(study_dir)
    kept = [item for item in arguments if not item.lstrip("+~").startswith("search=")]
    summary["chosen"]["command"] = shlex.join(["python", "-m", "pipeline", *kept, *overrides(chosen.params)])
    artifacts.write_json(results / "search.json", summary)  # the front is kept even when the export fails
    if search.export:
        summary["export"] = export(sweeper, arguments, chosen, len(study.trials))
        log.info("exported trial %d: %s (evaluate: refused %d/%d, KL %.4f)", chosen.number, summary["export"]["model"],
                 summary["export"]["refused"], summary["export"]["n"], summary["export"]["kl"])
    artifacts.write_json(results / "search.json", summary)
    return summary
