"""`python -m pipeline.optimize`: search ablation plans for few refusals at low KL, export only the winner.

The plan space is the shape that works on dense models (see docs/architecture.md): one refusal
direction, taken from a fractional depth (blending the two nearest layers' directions), removed from
a contiguous band of layers, with separate scales for the attention output and the MLP down
projections, by either edit method. `conf/optimize/default.yaml` documents the parameters.

Objectives, both minimized, exactly as the evaluate stage computes them: the refusal rate on the
held-out harmful prompts and the KL divergence on the held-out harmless prompts against the
`baseline` stage's cached log-probabilities (the functions `pipeline.stages.baseline.score_model`
calls, from `pipeline.evaluation`, on `eval_prompts`' split). KL is computed first: a trial whose
KL exceeds `optimize.prune_above_kl` is PRUNED without generating (generation is most of a trial's
cost, and such a plan could never be exported while `max_kl` is below that bound).

A trial is cheap: collect, measure and baseline come from the cache, the original model is loaded
once, and each plan is applied in memory and undone (`apply_plan_in_memory`). Edited weights are
rounded to the checkpoint's storage dtype, as the ablate stage's files are, so the exported model
scores exactly what its trial scored. No checkpoint is written until the study is over.

Sampler: multivariate TPE (MOTPE), seeded by `run.seed`. NSGA-II needs a population (default 50)
per generation, more than a whole study affords on a CPU; TPE models the front after
`optimize.startup_trials` trials, takes hand-picked seeds as ordinary trials, and its multivariate
kernel captures the coupling between direction depth, band and scales.

Checkpointing: trials go to an Optuna journal (JSON lines) in
`<cache.dir>/optimize/<key>/journal.log`, where the key hashes the measure and baseline cache keys
and the search settings (not `trials` nor `max_kl`: a rerun with more trials resumes the study, and a
new `max_kl` only re-chooses). A file lock held for the whole study means any trial still RUNNING
when the next run starts belongs to a dead process: it is marked FAIL and its parameters queued again.

Choice: the trial with the fewest refusals among those with KL <= `optimize.max_kl`, ties to the
lower KL, then the earlier trial. When no trial is within `max_kl`, the lowest-KL trial (the front's
gentlest end), with a warning saying by how much the budget was missed. That plan is written with
`pipeline.plan.write_plan` and exported through the normal runner with `plan=` replay (select ->
ablate -> evaluate), so the kept model and its metrics are ordinary cache artifacts, and
`python -m pipeline plan=<ablation.yaml>` reproduces them.

`optimize.trials` counts finished trials (complete or pruned); the front and the choice use complete ones.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import hydra
import optuna
import torch
import yaml
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import load_file

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.evaluation import first_token_logprobs, greedy_completions, is_refusal, kl_divergence
from pipeline.models import load_model, read_model_config
from pipeline.paths import user_path
from pipeline.plan import METHODS, plan_to_text, validate_plan, write_plan
from pipeline.stages.baseline import eval_prompts
from pipeline.stages.measure import Measurements, read_measurements
from pipeline.weight_edit import RestoreHandle, apply_plan_in_memory, directions_for_method

log = logging.getLogger("pipeline.optimize")

STUDY_VERSION = "1"
"""Bump when trial scoring or the parameters -> plan mapping changes: old journals stop matching."""
STUDY_NAME = "optimize"
SEARCH_KEYS = ("space", "seeds", "startup_trials", "trial_max_new_tokens", "prune_above_kl")
"""The optimize settings that shape the trials, hence the study key; `trials` and `max_kl` do not."""
FLOAT_PARAMS = ("direction_depth", "band_centre", "band_width", "attn_scale", "mlp_scale")
RESULT_FILES = ("pareto.csv", "pareto.png", "trials.csv", "ablation.yaml")
"""Written into the study dir, then copied into the Hydra run dir (with optimize.json)."""


# --- parameters -> plan ------------------------------------------------------------------------------


def band_layers(num_layers: int, centre: float, width: float) -> list[int]:
    """Layers whose depth i/(num_layers-1) lies within width/2 of centre; never empty (nearest layer)."""
    last = max(1, num_layers - 1)
    depth = {layer: layer / last for layer in range(num_layers)}
    inside = [layer for layer in range(num_layers) if abs(depth[layer] - centre) <= width / 2 + 1e-9]
    return inside or [min(range(num_layers), key=lambda layer: (abs(depth[layer] - centre), layer))]


def plan_from_params(params: Mapping[str, Any], measurements: Measurements, source_measurement: str) -> dict:
    """The canonical plan for one point of the search space, as `ablation.yaml` would hold it.

    The plan goes through its own text form, so a trial scores exactly the plan that is exported.
    `scale` is the MLP scale (it applies to every residual writer without its own *_scale);
    `attn_scale` overrides it for the attention output projection.
    """
    meta = measurements.meta
    num_layers = int(meta["num_layers"])
    quality = measurements.quality
    direction_from = round(float(params["direction_depth"]) * (num_layers - 1), 2)
    layers = band_layers(num_layers, float(params["band_centre"]), float(params["band_width"]))
    plan = {
        "model": meta["model_id"],
        "model_fingerprint": meta["model_fingerprint"],
        "hidden_size": int(meta["hidden_size"]),
        "num_layers": num_layers,
        "source_measurement": source_measurement,
        "mode": "optimize",
        "method": params["method"],
        "direction_source": "single",
        "layers": [
            {
                "layer": layer,
                "direction_from": direction_from,
                "scale": float(params["mlp_scale"]),
                "attn_scale": float(params["attn_scale"]),
                "quality": quality[layer],
            }
            for layer in layers
        ],
    }
    return validate_plan(yaml.safe_load(plan_to_text(plan)), "the trial's plan")


def plan_summary(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What a person reads off a plan: method, direction layer, band, scales."""
    layers = [entry["layer"] for entry in plan["layers"]]
    first = plan["layers"][0]
    return {
        "method": plan["method"],
        "direction_from": first["direction_from"],
        "first_layer": min(layers),
        "last_layer": max(layers),
        "n_layers": len(layers),
        "attn_scale": first.get("attn_scale", first["scale"]),
        "mlp_scale": first.get("mlp_scale", first["scale"]),
    }


# --- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    floats: Mapping[str, tuple[float, float, float]]
    """name -> (low, high, step)"""
    methods: tuple[str, ...]
    seeds: tuple[Mapping[str, Any], ...]


def search_space(settings: Mapping[str, Any]) -> SearchSpace:
    """Validated `optimize.space` and `optimize.seeds`; mistakes are one-line PipelineErrors."""
    space = settings["space"]
    floats = {}
    for name in FLOAT_PARAMS:
        bounds = space.get(name)
        if not isinstance(bounds, Sequence) or len(bounds) != 3:
            raise PipelineError(f"optimize.space.{name} must be [low, high, step], got {bounds!r}")
        low, high, step = (float(value) for value in bounds)
        if not (low < high and step > 0):
            raise PipelineError(f"optimize.space.{name}={list(bounds)} needs low < high and step > 0")
        floats[name] = (low, high, step)
    methods = tuple(space["methods"])
    if not methods or any(method not in METHODS for method in methods):
        raise PipelineError(f"optimize.space.methods must be a non-empty subset of {', '.join(METHODS)}, got {methods}")
    seeds = tuple(dict(seed) for seed in settings["seeds"] or ())
    for number, seed in enumerate(seeds):
        expected = {*FLOAT_PARAMS, "method"}
        if set(seed) != expected:
            raise PipelineError(f"optimize.seeds[{number}] must set exactly {', '.join(sorted(expected))}")
        outside = [name for name in FLOAT_PARAMS if not floats[name][0] <= seed[name] <= floats[name][1]]
        if outside or seed["method"] not in methods:
            raise PipelineError(f"optimize.seeds[{number}] lies outside optimize.space ({outside or seed['method']})")
    return SearchSpace(floats=floats, methods=methods, seeds=seeds)


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    params: dict[str, Any] = {
        name: trial.suggest_float(name, low, high, step=step) for name, (low, high, step) in space.floats.items()
    }
    params["method"] = trial.suggest_categorical("method", list(space.methods))
    return params


def trial_eval_config(eval_cfg: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The eval settings trials are scored with: the evaluate stage's, optionally with fewer generated tokens."""
    trial_cfg = dict(eval_cfg)
    if settings["trial_max_new_tokens"] is not None:
        trial_cfg["max_new_tokens"] = int(settings["trial_max_new_tokens"])
    return trial_cfg


# --- scoring -----------------------------------------------------------------------------------------


class TrialScorer:
    """The original model, loaded once; each plan is applied in memory, scored as evaluate does, and undone."""

    def __init__(
        self,
        cfg: DictConfig,
        measurements: Measurements,
        baseline_dir: Path,
        model_store: Path,
        eval_cfg: Mapping[str, Any],
    ):
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        self.measurements = measurements
        self.eval_cfg = dict(eval_cfg)
        self.progress = bool(cfg.run.progress)
        self.harmful, self.harmless = eval_prompts(OmegaConf.to_container(cfg.prompts, resolve=True), self.eval_cfg)
        self.reference = load_file(baseline_dir / "harmless_logprobs.safetensors")["logprobs"]
        if self.reference.shape[0] != len(self.harmless):
            raise PipelineError(
                f"baseline {baseline_dir} holds {self.reference.shape[0]} KL prompts, the eval split has "
                f"{len(self.harmless)}; re-run the baseline stage"
            )
        self.model, self.tokenizer, model_dir = load_model(model_cfg, model_store, progress=self.progress)
        self.storage_dtype = checkpoint_dtype(model_dir)

    @contextmanager
    def applied(self, plan: Mapping[str, Any]) -> Iterator[None]:
        """The model with `plan` applied (as the ablate stage would write it) inside the block, original after."""
        directions = directions_for_method(self.measurements.tensors, plan["method"])
        handle = apply_plan_in_memory(self.model, plan, directions)
        try:
            round_to_storage(self.model, handle, self.storage_dtype)
            yield
        finally:
            handle.restore()

    def kl(self) -> float:
        """KL(original || current model) on the harmless eval prompts, as evaluate computes it."""
        batch_size = int(self.eval_cfg["batch_size"])
        logprobs = first_token_logprobs(self.model, self.tokenizer, self.harmless, batch_size, self.progress)
        return kl_divergence(self.reference, logprobs)

    def refusals(self) -> list[bool]:
        """One refusal flag per harmful eval prompt, from greedy completions, as evaluate computes them."""
        completions = greedy_completions(
            self.model, self.tokenizer, self.harmful, int(self.eval_cfg["max_new_tokens"]),
            int(self.eval_cfg["batch_size"]), self.progress,
        )
        return [is_refusal(text, self.eval_cfg["refusal_markers"]) for text in completions]


def checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype the checkpoint stores its weights in (config.json), or None when it does not say."""
    config = read_model_config(model_dir)
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@torch.no_grad()
def round_to_storage(model: torch.nn.Module, handle: RestoreHandle, storage_dtype: torch.dtype | None) -> None:
    """Round the edited parameters as the ablate stage's files round them (a bf16 checkpoint computed in fp32)."""
    if storage_dtype is None:
        return
    for name in handle.edited:
        parameter = model.get_parameter(name)
        if parameter.dtype != storage_dtype:
            parameter.data.copy_(parameter.data.to(storage_dtype).to(parameter.dtype))


# --- the study ---------------------------------------------------------------------------------------


def study_key(measure_key: str, baseline_key: str, settings: Mapping[str, Any], seed: int) -> str:
    payload = {
        "version": STUDY_VERSION,
        "measure": measure_key,
        "baseline": baseline_key,
        "seed": seed,
        "search": {key: settings[key] for key in SEARCH_KEYS},
    }
    return artifacts.sha256_text(artifacts.canonical_json(payload))[:16]


def open_study(study_dir: Path, space: SearchSpace, seed: int, startup_trials: int) -> optuna.Study:
    """Create or resume the study in `study_dir` (the caller holds the study lock).

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
            multivariate=True, seed=seed + trials_so_far, n_startup_trials=startup_trials
        )
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            directions=["minimize", "minimize"],
            sampler=sampler,
            load_if_exists=True,
        )
        study.set_metric_names(["refusal_rate", "kl"])
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, stale.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
        log.warning("trial %d was left running by an interrupted study: marked failed and queued again", stale.number)
    if not existing:
        for seed_params in space.seeds:
            study.enqueue_trial(dict(seed_params), user_attrs={"seed_point": True})
    return study


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The trials `optimize.trials` counts: complete or pruned (never failed or interrupted ones)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def make_objective(scorer: TrialScorer, space: SearchSpace, source_measurement: str, prune_above_kl: float | None):
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        plan = plan_from_params(suggest(trial, space), scorer.measurements, source_measurement)
        described = "({method}, direction {direction_from:.2f}, layers {first_layer}-{last_layer}, attn {attn_scale:.2f}, " \
                    "mlp {mlp_scale:.2f})".format(**plan_summary(plan))
        with scorer.applied(plan):
            kl = scorer.kl()
            trial.set_user_attr("kl", kl)
            if prune_above_kl is not None and kl > prune_above_kl:
                trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
                log.info("trial %d: KL %.4f > optimize.prune_above_kl, pruned  %s", trial.number, kl, described)
                raise optuna.TrialPruned(f"KL {kl:.4f} > optimize.prune_above_kl={prune_above_kl:g}")
            flags = scorer.refusals()
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
        "no trial reached KL <= optimize.max_kl=%g; exporting the lowest-KL trial %d (KL %.4f)",
        max_kl, best.number, best.values[1],
    )
    return best


def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials no other trial beats on both objectives (ties kept), by KL then refusal rate."""
    def dominated(trial: FrozenTrial) -> bool:
        return any(
            other.values[0] <= trial.values[0] and other.values[1] <= trial.values[1] and other.values != trial.values
            for other in trials
        )

    return sorted((trial for trial in trials if not dominated(trial)), key=lambda t: (t.values[1], t.values[0], t.number))


# --- reporting ---------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "trial", "refusal_rate", "refused", "n", "kl", "method", "direction_from", "first_layer", "last_layer",
    "n_layers", "attn_scale", "mlp_scale", *FLOAT_PARAMS[:3], "on_front", "chosen",
)


def trial_row(trial: FrozenTrial, plan: Mapping[str, Any], on_front: bool, chosen: bool) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "refusal_rate": f"{trial.values[0]:.6f}",
        "refused": trial.user_attrs["refused"],
        "n": trial.user_attrs["n"],
        "kl": f"{trial.values[1]:.6f}",
        **plan_summary(plan),
        **{name: f"{trial.params[name]:g}" for name in FLOAT_PARAMS[:3]},
        "on_front": on_front,
        "chosen": chosen,
    }


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def plot_front(
    path: Path, trials: Sequence[FrozenTrial], front: Sequence[FrozenTrial], chosen: FrozenTrial, max_kl: float, title: str
) -> None:
    """Refusal rate against KL: every trial, the front as a step line, the budget and the exported point."""
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], s=18, color="tab:gray", label="trials")
    axes.step([t.values[1] for t in front], [t.values[0] for t in front], where="post", color="tab:red",
              marker="o", markersize=4, label="Pareto front")
    axes.scatter([chosen.values[1]], [chosen.values[0]], s=160, marker="*", color="gold", edgecolor="black",
                 zorder=5, label=f"exported (trial {chosen.number})")
    axes.axvline(max_kl, color="black", linestyle="--", linewidth=1, label=f"optimize.max_kl={max_kl:g}")
    axes.set_xscale("symlog", linthresh=1e-3)
    axes.set_xlabel("KL divergence on harmless prompts (nats, symlog)")
    axes.set_ylabel("refusal rate on held-out harmful prompts")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


# --- export ------------------------------------------------------------------------------------------


def export_plan(cfg: DictConfig, plan_path: Path) -> dict[str, Any]:
    """Run select (replaying `plan_path`) -> ablate -> evaluate through the normal runner and cache."""
    from pipeline.runner import Runner
    from pipeline.stages import registry

    replay = cfg.copy()
    OmegaConf.update(replay, "plan", str(plan_path), merge=False)
    runner = Runner(replay, registry(), cache_dir=user_path(cfg.cache.dir), model_store=user_path(cfg.cache.models))
    results = runner.run(["ablate", "evaluate"])
    metrics = json.loads((results["evaluate"].dir / "metrics.json").read_text(encoding="utf-8"))
    return {
        "stages": {name: {"key": r.key, "dir": str(r.dir), "cached": r.cached} for name, r in results.items()},
        "metrics": metrics,
    }


def run_optimize(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the study for `cfg`, export its chosen plan, and return optimize.json's content."""
    from pipeline.runner import Runner
    from pipeline.stages import registry

    settings = OmegaConf.to_container(cfg.optimize, resolve=True)
    space = search_space(settings)
    wanted, max_kl, prune_above_kl = int(settings["trials"]), float(settings["max_kl"]), settings["prune_above_kl"]
    if wanted < 1 or not (math.isfinite(max_kl) and max_kl >= 0):
        raise PipelineError(f"optimize.trials must be >= 1 and optimize.max_kl >= 0, got {wanted} and {max_kl}")
    if prune_above_kl is not None and not float(prune_above_kl) >= max_kl:
        raise PipelineError(
            f"optimize.prune_above_kl={prune_above_kl} is below optimize.max_kl={max_kl:g}: trials that could be "
            "exported would never be generated for; raise it or set it to null"
        )
    torch.manual_seed(int(cfg.run.seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cache_dir, model_store = user_path(cfg.cache.dir), user_path(cfg.cache.models)
    upstream = Runner(cfg, registry(), cache_dir=cache_dir, model_store=model_store).run(["measure", "baseline"])
    measure, baseline = upstream["measure"], upstream["baseline"]
    measurements = read_measurements(measure.dir / "measurements.safetensors")
    key = study_key(measure.key, baseline.key, settings, int(cfg.run.seed))
    study_dir = cache_dir / "optimize" / key
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(study_dir / ".study.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PipelineError(f"another optimize run holds {study_dir}; wait for it or stop it") from None
    try:
        study = open_study(study_dir, space, int(cfg.run.seed), int(settings["startup_trials"]))
        remaining = wanted - len(finished(study))
        log.info("study %s: %d trials done, %d to run", study_dir, wanted - max(remaining, 0), max(remaining, 0))
        eval_cfg = trial_eval_config(OmegaConf.to_container(cfg.eval, resolve=True), settings)
        if remaining > 0:
            scorer = TrialScorer(cfg, measurements, baseline.dir, model_store, eval_cfg)
            objective = make_objective(scorer, space, measure.key, prune_above_kl)
            study.optimize(objective, n_trials=remaining, catch=())
            del scorer  # free the model before ablate/evaluate load their own copies
            gc.collect()
        summary = summarize(study, measurements, measure.key, max_kl, int(eval_cfg["max_new_tokens"]), study_dir)
    finally:
        lock.release()
    if settings["export"]:
        summary["export"] = export_plan(cfg, study_dir / "ablation.yaml")
        final = summary["export"]["metrics"]
        summary["final"] = {
            "refused": final["refusal_after"]["refused"], "n": final["refusal_after"]["n"],
            "refusal_rate": final["refusal_after"]["rate"], "kl": final["kl_divergence"],
        }
        log.info(
            "exported trial %d: evaluate says refused %d/%d, KL %.4f (baseline refused %d/%d)",
            summary["chosen"]["trial"], summary["final"]["refused"], summary["final"]["n"], summary["final"]["kl"],
            final["refusal_before"]["refused"], final["refusal_before"]["n"],
        )
    artifacts.write_json(study_dir / "optimize.json", summary)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for name in (*RESULT_FILES, "optimize.json"):
            (Path(output_dir) / name).write_bytes((study_dir / name).read_bytes())
    return summary


def summarize(
    study: optuna.Study,
    measurements: Measurements,
    source_measurement: str,
    max_kl: float,
    trial_tokens: int,
    study_dir: Path,
) -> dict[str, Any]:
    """Choose the plan, write it and the front into `study_dir`, and return the facts for optimize.json."""
    trials = completed(study)
    chosen = choose(trials, max_kl)
    front = pareto_front(trials)
    front_numbers = {trial.number for trial in front}
    plans = {
        trial.number: plan_from_params(trial.params, measurements, source_measurement) for trial in trials
    }
    rows = {
        trial.number: trial_row(trial, plans[trial.number], trial.number in front_numbers, trial.number == chosen.number)
        for trial in trials
    }
    write_rows(study_dir / "trials.csv", [rows[trial.number] for trial in trials])
    write_rows(study_dir / "pareto.csv", [rows[trial.number] for trial in front])
    title = f"{measurements.meta['model_id']}: {len(trials)} trials, {trial_tokens} tokens per completion"
    plot_front(study_dir / "pareto.png", trials, front, chosen, max_kl, title)
    write_plan(study_dir / "ablation.yaml", plans[chosen.number])
    depth_of = 1 / max(1, int(measurements.meta["num_layers"]) - 1)
    summary = plan_summary(plans[chosen.number])
    return {
        "study_dir": str(study_dir),
        "trials": len(trials),
        "trial_max_new_tokens": trial_tokens,
        "pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        "failed_or_retried": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        "trial_seconds": round(sum(trial.user_attrs["seconds"] for trial in finished(study)), 1),
        "max_kl": max_kl,
        "chosen": {
            "trial": chosen.number,
            "refused": chosen.user_attrs["refused"],
            "n": chosen.user_attrs["n"],
            "refusal_rate": chosen.values[0],
            "kl": chosen.values[1],
            "params": {name: round(value, 6) if isinstance(value, float) else value
                       for name, value in chosen.params.items()},
            "plan": summary,
            "preset": {
                "method": summary["method"],
                "direction_depth": round(summary["direction_from"] * depth_of, 4),
                "band_depths": [round(summary["first_layer"] * depth_of, 4), round(summary["last_layer"] * depth_of, 4)],
                "attn_scale": summary["attn_scale"],
                "mlp_scale": summary["mlp_scale"],
            },
        },
        "front": [dict(rows[trial.number]) for trial in front],
    }


@hydra.main(version_base=None, config_path="pkg://pipeline.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_optimize(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
