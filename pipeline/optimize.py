"""`python -m pipeline.optimize`: search ablation plans for few refusals at low KL, export only the winner.

The search space is select's own settings (`pipeline.search_space`): a trial is a `select.*` point
(direction depth, depth window, MLP and attention scales, method), its plan is the one select writes
for it, and the winner is reported as the `mode=band select.*=...` overrides that select it again.

Objectives, both minimized, as the evaluate stage computes them (`pipeline.scoring`): the refusal rate
on the held-out harmful prompts and the KL divergence on the held-out harmless prompts against the
`baseline` stage's log-probabilities. KL is computed first: a trial whose KL exceeds
`optimize.prune_above_kl` is PRUNED without generating (generation is most of a trial's cost).

A trial is cheap: collect, measure and baseline come from the cache, the original model is loaded
once, and each plan is applied in memory, rounded to the checkpoint's storage dtype, and undone
(`pipeline.plan_trial`), so the exported model scores exactly what its trial scored.

Sampler: multivariate TPE (MOTPE), seeded by `run.seed`; it models the front after
`optimize.startup_trials` trials, takes hand-picked seeds as ordinary trials, and its multivariate
kernel captures the coupling between direction depth, window and scales.

Checkpointing: trials go to an Optuna journal (JSON lines) in `<cache.dir>/optimize/<key>/journal.log`,
where the key hashes the measure and baseline cache keys and the search settings (not `trials` nor
`max_kl`: a rerun with more trials resumes the study, a new `max_kl` only re-chooses). The study is
held exclusively (`ArtifactStore.exclusive`) for the whole search, so a trial still RUNNING when the
next run starts belongs to a dead process: it is marked FAIL and its parameters queued again.

Choice: the trial with the fewest refusals among those with KL <= `optimize.max_kl`, ties to the
lower KL, then the earlier trial; when none is within `max_kl`, the lowest-KL trial, with a warning.
That plan is written with `pipeline.plan.write_plan` and exported through the normal runner with
`plan=` replay (select -> ablate -> evaluate), so `python -m pipeline plan=<ablation.yaml>` reproduces it.
`optimize.trials` counts finished trials (complete or pruned); the front and the choice use complete ones.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from pipeline import artifacts
from pipeline.cli import run_entry_point
from pipeline.errors import PipelineError
from pipeline.evaluation import kl_divergence
from pipeline.measurement import Measurements, read_measurements
from pipeline.pareto import pareto_front
from pipeline.paths import user_path
from pipeline.plan import write_plan
from pipeline.plan_trial import InMemoryModel
from pipeline.plots import plot_pareto
from pipeline.runner import Runner, config_slice
from pipeline.judge_models import make_judge
from pipeline.scoring import eval_prompts, harmless_logprobs, read_baseline, refusals
from pipeline.search_space import PARAMS, Search, plan_summary, preset, select_values, suggest, trial_plan, validate
from pipeline.store import ArtifactStore

log = logging.getLogger("pipeline.optimize")

STUDY_VERSION = "3"  # 3: refusals are the judged `refusal` class (pipeline.judges), not any marker anywhere
"""Bump when trial scoring or the parameters -> plan mapping changes: old journals stop matching."""
STUDY_NAME = "optimize"
SEARCH_KEYS = ("space", "seeds", "startup_trials", "trial_max_new_tokens", "prune_above_kl")
"""The optimize settings that shape the trials, hence the study key; `trials` and `max_kl` do not."""
RESULT_FILES = ("pareto.csv", "pareto.png", "trials.csv", "ablation.yaml")
"""Written into the study dir, then copied into the Hydra run dir (with optimize.json)."""


# --- scoring -----------------------------------------------------------------------------------------


class TrialScorer:
    """The original model, loaded once; each plan is applied in memory, scored as evaluate does, and undone."""

    def __init__(self, cfg: DictConfig, measurements: Measurements, baseline_dir: Path, model_store: Path,
                 eval_cfg: Mapping[str, Any]):
        self.measurements = measurements
        self.eval_cfg = dict(eval_cfg)
        self.progress = cfg.run.progress is True
        self.embed = cfg.ablate.embed.enabled is True
        plain = config_slice(cfg, ("model", "prompts"))
        self.harmful, self.harmless = eval_prompts(plain["prompts"], self.eval_cfg)
        self.reference = read_baseline(baseline_dir, len(self.harmless)).logprobs
        self.loaded = InMemoryModel(plain["model"], model_store, self.progress)
        self.judge = make_judge(self.eval_cfg, model_store)

    def applied(self, plan: Mapping[str, Any]):
        return self.loaded.applied(plan, self.measurements.tensors, self.embed)

    def kl(self) -> float:
        """KL(original || current model) on the harmless eval prompts."""
        loaded = self.loaded
        logprobs = harmless_logprobs(loaded.model, loaded.tokenizer, self.harmless, self.eval_cfg, self.progress)
        return kl_divergence(self.reference, logprobs)

    def refused(self) -> list[bool]:
        """One refusal flag per harmful eval prompt: greedy completions judged into classes as evaluate does."""
        return refusals(self.loaded.model, self.loaded.tokenizer, self.harmful, self.eval_cfg, self.progress, self.judge)[1]


# --- the study ---------------------------------------------------------------------------------------


def study_key(measure_key: str, baseline_key: str, settings: Mapping[str, Any], seed: int, embed: bool) -> str:
    search = {key: settings[key] for key in SEARCH_KEYS}
    return artifacts.content_key(
        {"version": STUDY_VERSION, "measure": measure_key, "baseline": baseline_key, "seed": seed, "embed": embed,
         "search": search}
    )


def open_study(study_dir: Path, search: Search, seed: int) -> optuna.Study:
    """Create or resume the study in `study_dir` (the caller holds it exclusively).

    Trials left RUNNING belong to a killed run: they are marked FAIL (never counted) and their
    parameters queued again, so an interrupted seed is not lost. Seeds are queued once, in a new study.
    """
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    existing = len(storage.get_all_studies()) > 0
    # Seeded by run.seed plus the trials already run, so a resumed study draws a fresh, reproducible stream.
    trials_so_far = storage.get_n_trials(storage.get_study_id_from_name(STUDY_NAME)) if existing else 0
    with warnings.catch_warnings():  # multivariate TPE and metric names are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            multivariate=True, seed=seed + trials_so_far, n_startup_trials=search.startup_trials
        )
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                    sampler=sampler, load_if_exists=True)
        study.set_metric_names(["refusal_rate", "kl"])
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, stale.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
        log.warning("trial %d was left running by an interrupted study: marked failed and queued again", stale.number)
    if not existing:
        for seed_params in search.seeds:
            study.enqueue_trial(dict(seed_params), user_attrs={"seed_point": True})
    return study


def trials_in(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""The trials `optimize.trials` counts (never failed or interrupted ones)."""


def make_objective(scorer: TrialScorer, search: Search, source_measurement: str):
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        params = suggest(trial, search)
        plan = trial_plan(params, scorer.measurements, source_measurement)
        described = "({method}, direction {direction_from:g}, skip {skip_first:g}/{skip_last:g}, mlp {scale:g}, " \
                    "attn {attn_scale:g}: layers {first_layer}-{last_layer})".format(
                        **select_values(params), **plan_summary(plan))
        with scorer.applied(plan):
            kl = scorer.kl()
            trial.set_user_attr("kl", kl)
            if search.prune_above_kl is not None and kl > search.prune_above_kl:
                trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
                log.info("trial %d: KL %.4f > optimize.prune_above_kl, pruned  %s", trial.number, kl, described)
                raise optuna.TrialPruned(f"KL {kl:.4f} > optimize.prune_above_kl={search.prune_above_kl:g}")
            flags = scorer.refused()
        seconds = time.perf_counter() - started
        for key, value in {"refused": sum(flags), "n": len(flags), "seconds": round(seconds, 1)}.items():
            trial.set_user_attr(key, value)
        log.info("trial %d: refused %d/%d, KL %.4f  %s %.0f s", trial.number, sum(flags), len(flags), kl, described, seconds)
        return sum(flags) / len(flags), kl

    return objective


def choose(trials: Sequence[FrozenTrial], max_kl: float) -> FrozenTrial:
    """Fewest refusals with KL <= max_kl (ties: lower KL, then earlier trial); else the lowest-KL trial."""
    if not trials:
        raise PipelineError(
            "the study has no completed trial to choose from (all pruned?); raise optimize.trials or optimize.prune_above_kl"
        )
    within = [trial for trial in trials if trial.values[1] <= max_kl]
    if within:
        return min(within, key=lambda trial: (trial.user_attrs["refused"], trial.values[1], trial.number))
    best = min(trials, key=lambda trial: (trial.values[1], trial.user_attrs["refused"], trial.number))
    log.warning(
        "no trial reached KL <= optimize.max_kl=%g; exporting the lowest-KL trial %d (KL %.4f, %.4f over)",
        max_kl, best.number, best.values[1], best.values[1] - max_kl,
    )
    return best


def objectives(trial: FrozenTrial) -> tuple[float, float]:
    """(KL, refusal rate): the front's and the plot's coordinates."""
    return trial.values[1], trial.values[0]


# --- reporting ---------------------------------------------------------------------------------------

CSV_COLUMNS = ("trial", "refusal_rate", "refused", "n", "kl", *PARAMS, "direction_layer", "first_layer",
               "last_layer", "n_layers", "on_front", "chosen")


def trial_row(trial: FrozenTrial, plan: Mapping[str, Any], on_front: bool, chosen: bool) -> dict[str, Any]:
    values = {"refused": trial.user_attrs["refused"], "n": trial.user_attrs["n"], "kl": f"{trial.values[1]:.6f}"}
    return {"trial": trial.number, "refusal_rate": f"{trial.values[0]:.6f}", **values, **select_values(trial.params),
            **plan_summary(plan), "on_front": on_front, "chosen": chosen}


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summarize(study: optuna.Study, measurements: Measurements, source_measurement: str, max_kl: float,
              trial_tokens: int, study_dir: Path) -> dict[str, Any]:
    """Choose the plan, write it and the front into `study_dir`, and return the facts for optimize.json."""
    trials = trials_in(study, TrialState.COMPLETE)
    chosen = choose(trials, max_kl)
    points = [objectives(trial) for trial in trials]
    front = pareto_front(points)
    plans = [trial_plan(trial.params, measurements, source_measurement) for trial in trials]
    rows = [trial_row(trial, plan, i in front, trial is chosen) for i, (trial, plan) in enumerate(zip(trials, plans))]
    write_rows(study_dir / "trials.csv", rows)
    write_rows(study_dir / "pareto.csv", [rows[i] for i in front])
    plot_pareto(
        study_dir / "pareto.png", points, front,
        f"{measurements.meta['model_id']}: {len(trials)} trials, {trial_tokens} tokens per completion",
        point_label="trials", chosen=trials.index(chosen), chosen_label=f"exported (trial {chosen.number})", max_kl=max_kl,
    )
    write_plan(study_dir / "ablation.yaml", plans[trials.index(chosen)])
    return {
        "study_dir": str(study_dir),
        "trials": len(trials),
        "trial_max_new_tokens": trial_tokens,
        "pruned": len(trials_in(study, TrialState.PRUNED)),
        "failed_or_retried": len(trials_in(study, TrialState.FAIL)),
        "trial_seconds": round(sum(trial.user_attrs["seconds"] for trial in trials_in(study, *FINISHED)), 1),
        "max_kl": max_kl,
        "chosen": {
            "trial": chosen.number,
            "refused": chosen.user_attrs["refused"],
            "n": chosen.user_attrs["n"],
            "refusal_rate": chosen.values[0],
            "kl": chosen.values[1],
            "params": select_values(chosen.params),
            "plan": plan_summary(plans[trials.index(chosen)]),
            "preset": preset(chosen.params),
        },
        "front": [rows[i] for i in front],
    }


# --- export and the command line ---------------------------------------------------------------------


def export_plan(cfg: DictConfig, plan_path: Path) -> dict[str, Any]:
    """Run select (replaying `plan_path`) -> ablate -> evaluate through the normal runner and cache."""
    replay = cfg.copy()
    OmegaConf.update(replay, "plan", str(plan_path), merge=False)
    results = runner_for(replay).run(["ablate", "evaluate"])
    metrics = json.loads((results["evaluate"].dir / "metrics.json").read_text(encoding="utf-8"))
    return {
        "stages": {name: {"key": r.key, "dir": str(r.dir), "cached": r.cached} for name, r in results.items()},
        "metrics": metrics,
    }


def runner_for(cfg: DictConfig):
    from pipeline.stages import registry

    return Runner(cfg, registry(), cache_dir=user_path(cfg.cache.dir), model_store=user_path(cfg.cache.models))


def run_optimize(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the study for `cfg`, export its chosen plan, and return optimize.json's content."""
    settings = config_slice(cfg, ("optimize",))["optimize"]
    search = validate(settings)
    torch.manual_seed(int(cfg.run.seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cache_dir, model_store = user_path(cfg.cache.dir), user_path(cfg.cache.models)
    upstream = runner_for(cfg).run(["measure", "baseline"])
    measure, baseline = upstream["measure"], upstream["baseline"]
    measurements = read_measurements(measure.dir / "measurements.safetensors")
    key = study_key(measure.key, baseline.key, settings, int(cfg.run.seed), cfg.ablate.embed.enabled is True)
    with ArtifactStore(cache_dir / "optimize").exclusive(key) as study_dir:
        study = open_study(study_dir, search, int(cfg.run.seed))
        remaining = search.trials - len(trials_in(study, *FINISHED))
        log.info("study %s: %d trials done, %d to run", study_dir, search.trials - max(remaining, 0), max(remaining, 0))
        eval_cfg = config_slice(cfg, ("eval",))["eval"]
        if search.trial_max_new_tokens is not None:  # trials may generate fewer tokens; the export is judged by eval.*
            eval_cfg["max_new_tokens"] = search.trial_max_new_tokens
        if remaining > 0:
            scorer = TrialScorer(cfg, measurements, baseline.dir, model_store, eval_cfg)
            study.optimize(make_objective(scorer, search, measure.key), n_trials=remaining, catch=())
            del scorer  # free the model before ablate/evaluate load their own copies
            gc.collect()
        summary = summarize(study, measurements, measure.key, search.max_kl, int(eval_cfg["max_new_tokens"]), study_dir)
    if search.export:
        summary["export"] = export_plan(cfg, study_dir / "ablation.yaml")
        final = summary["export"]["metrics"]
        after, before = final["refusal_after"], final["refusal_before"]
        summary["final"] = {"refused": after["refused"], "n": after["n"], "refusal_rate": after["rate"],
                            "kl": final["kl_divergence"]}
        log.info("exported trial %d: evaluate says refused %d/%d, KL %.4f (baseline refused %d/%d)",
                 summary["chosen"]["trial"], after["refused"], after["n"], final["kl_divergence"],
                 before["refused"], before["n"])
    artifacts.write_json(study_dir / "optimize.json", summary)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for name in (*RESULT_FILES, "optimize.json"):
            (Path(output_dir) / name).write_bytes((study_dir / name).read_bytes())
    return summary


@hydra.main(version_base=None, config_path="pkg://pipeline.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_optimize(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """`python -m pipeline.optimize`: `main` with every error a user can cause reported as one stderr line, status 2."""
    run_entry_point(main)


if __name__ == "__main__":
    cli()
