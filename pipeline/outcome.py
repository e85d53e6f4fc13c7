"""What a run produced, said in plain words, and gathered in the run folder.

After `run_pipeline` the run folder (`outputs/runs/<date>/<time>/`, or a sweep job's folder) gets links
to the artifacts a user looks for (`RUN_LINKS`: the model, the plan, the numbers, the plots), and the
run ends with a few lines: refusal before -> after with 95% intervals, KL, the layers edited, where the
model is and the command that talks to it. Everything is read back from the artifacts, so a run served
entirely from the cache says the same as the run that computed it.

Links are relative symbolic links whose targets must resolve inside the cache directory; where a link
cannot be made (a filesystem without them), small files are copied instead and the model is named by
its path, never copied. Nothing here follows a link when it replaces one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from pipeline.plan import read_plan

RUN_LINKS = {
    "model": ("ablate", "model"),
    "lora": ("ablate", "lora"),
    "metrics.json": ("evaluate", "metrics.json"),
    "completions.jsonl": ("evaluate", "completions.jsonl"),
    "ablation.yaml": ("select", "ablation.yaml"),
    "selection.png": ("select", "selection.png"),
    "quality.png": ("measure", "quality.png"),
}
"""{name in the run folder: (stage, path inside that stage's artifact)}."""
COPY_LIMIT = 16 << 20
"""Bytes: the largest file copied into the run folder where links are not possible."""


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def link_artifacts(run_dir: Path, stages: Mapping[str, Mapping[str, Any]], cache_dir: Path) -> dict[str, Path]:
    """Link (or copy, when links fail) the artifacts of `stages` ({name: {"dir": ...}}, run.json's) into
    `run_dir`; returns {name in run_dir: target}. A target outside `cache_dir` is never linked."""
    linked: dict[str, Path] = {}
    for name, (stage, relative) in RUN_LINKS.items():
        if stage not in stages:
            continue
        target = Path(stages[stage]["dir"]) / relative
        if not target.exists() or not _inside(target, cache_dir):
            continue
        place = run_dir / name
        if place.is_symlink() or place.is_file():
            place.unlink()  # an earlier run into the same folder; a link is removed, never followed
        elif place.exists():
            continue  # a real directory someone put there: left alone
        try:
            os.symlink(os.path.relpath(target.resolve(), run_dir.resolve()), place,
                       target_is_directory=target.is_dir())
        except OSError:
            if target.is_dir() or target.stat().st_size > COPY_LIMIT:
                continue  # the model is never copied; the summary names its path
            shutil.copyfile(target, place)
        linked[name] = target
    return linked


def _interval(summary: Mapping[str, Any]) -> str:
    low, high = summary["wilson95"]
    return f"{summary['rate']:.3f} [{low:.3f}, {high:.3f}] ({summary['refused']}/{summary['n']})"


def layer_ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    parts, layers = [], sorted(set(layers))
    start = previous = None
    for layer in [*layers, None]:
        if start is not None and layer != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if start is None:
            start = layer
        previous = layer
    return ", ".join(parts) if parts else "none"


def _plan_line(select_dir: Path) -> str:
    plan = read_plan(select_dir / "ablation.yaml")
    layers = [int(entry["layer"]) for entry in plan["layers"]]
    return f"layers edited (0-based): {layer_ranges(layers)} ({len(layers)} of {plan.get('num_layers', '?')}), method {plan['method']}"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _partial_lines(stages: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a run without ablate/evaluate did, from its last artifacts."""
    lines = []
    if "collect" in stages:
        meta = _read_json(Path(stages["collect"]["dir"]) / "meta.json")
        lines.append(f"collected residual activations of {meta['n_harmful']} harmful and {meta['n_harmless']} harmless "
                     f"prompts over {meta['num_layers']} layers of {meta['model_id']}: {stages['collect']['dir']}")
    if "baseline" in stages:
        baseline = _read_json(Path(stages["baseline"]["dir"]) / "baseline.json")
        if "refusal" in baseline:  # absent with eval.generate=false
            lines.append(f"original model's refusal rate on held-out harmful prompts: {_interval(baseline['refusal'])}")
        lines.append(f"original model's refusal score (first-token mass on refusal tokens): {baseline['refusal_score']:.4f}")
    if "measure" in stages:
        lines.append(f"refusal directions and quality per layer: {Path(stages['measure']['dir']) / 'quality.png'}")
    if "select" in stages and "ablate" not in stages:
        lines.append(_plan_line(Path(stages["select"]["dir"])) + f": {Path(stages['select']['dir']) / 'ablation.yaml'}")
    return lines


def summary_lines(run: Mapping[str, Any], run_dir: Path | None = None, linked: Mapping[str, Path] = ()) -> list[str]:
    """The run's last lines, from run.json's content and the artifacts it names."""
    stages = run.get("stages", {})
    lines = []
    if "evaluate" in stages:
        metrics = _read_json(Path(stages["evaluate"]["dir"]) / "metrics.json")
        if "refusal_before" in metrics:  # absent with eval.generate=false
            lines.append("refusal rate on held-out harmful prompts (95% Wilson interval): "
                         f"{_interval(metrics['refusal_before'])} -> {_interval(metrics['refusal_after'])}")
        lines.append("refusal score (first-token mass on refusal tokens): "
                     f"{metrics['refusal_score_before']:.4f} -> {metrics['refusal_score_after']:.4f}")
        lines.append(f"KL divergence on {metrics['n_kl_prompts']} harmless prompts (first token): "
                     f"{metrics['kl_divergence']:.4f} nats")
    else:
        lines.extend(_partial_lines(stages))
    if "evaluate" in stages or "ablate" in stages:
        lines.append(_plan_line(Path(stages["select"]["dir"])))
    if "ablate" in stages:
        ablate_dir = Path(stages["ablate"]["dir"])
        model = run_dir / "model" if run_dir is not None and "model" in linked else ablate_dir / "model"
        lines.append(f"ablated model: {model}")
        if (ablate_dir / "lora").is_dir():
            lines.append(f"LoRA adapter (PEFT): {run_dir / 'lora' if run_dir is not None and 'lora' in linked else ablate_dir / 'lora'}")
        lines.append(f"try it: python -m pipeline.chat {model}")
    elif "evaluate" in stages:
        lines.append("no model written (run.export=false, or a sweep job); the same command with run.export=true "
                     "writes it from the cache")
    else:
        missing = [name for name in ("select", "evaluate") if name not in stages]
        lines.append(f"not run: {', '.join(missing)}, so no model was edited (run.stages chose the stages); "
                     "`python -m pipeline` with the same settings reuses this work and writes the model")
    if run_dir is not None and (run_dir / "report.html").is_file():
        lines.append(f"report: {run_dir / 'report.html'}")
    if run_dir is not None:
        lines.append(f"run folder: {run_dir}")
    return lines


def finish_run(run: Mapping[str, Any], run_dir: Path | None, cache_dir: Path) -> list[str]:
    """Link the artifacts into `run_dir`, write its report.html, and return the run's last lines."""
    linked: dict[str, Path] = {}
    if run_dir is not None:
        from pipeline.report import run_report

        linked = link_artifacts(run_dir, run.get("stages", {}), cache_dir)
        run_report(run, run_dir)
    return summary_lines(run, run_dir, linked)
