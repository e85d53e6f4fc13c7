"""report.html: one self-contained page per run (and per sweep) that needs no network.

The page holds the metrics with their intervals, the plan's layers, the layer-quality and selection
plots (inlined as base64 PNG), sampled before/after completions per outcome class, and where the model
is. Every piece of text from an artifact (prompts, completions, paths) goes through `html.escape`: a
completion is model output and may hold markup. `bench/render_report.sh` renders a page in headless
Chromium to check it by eye.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline.outcome import layer_ranges
from pipeline.plan import read_plan

REPORT = "report.html"
SAMPLES_PER_CLASS = 3
OUTCOMES = (
    ("refused before, answers after", True, False),
    ("refused before and after", True, True),
    ("answered before and after", False, False),
    ("answered before, refuses after", False, True),
)
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code,pre{font-family:ui-monospace,monospace;font-size:.9em}
pre{white-space:pre-wrap;word-break:break-word;margin:0;max-height:12em;overflow:auto}
img{max-width:100%;border:1px solid #eee}.big{font-size:1.3em;font-weight:600}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def image(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined, or a note when the file is absent."""
    if not path.is_file():
        return f"<p>({esc(alt)}: not produced by this run)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: Iterable[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>\n")


def _rate(summary: Mapping[str, Any]) -> str:
    low, high = summary["wilson95"]
    return f"{summary['rate']:.3f}  [{low:.3f}, {high:.3f}]  ({summary['refused']}/{summary['n']})"


def _metrics(evaluate_dir: Path) -> str:
    metrics = json.loads((evaluate_dir / "metrics.json").read_text(encoding="utf-8"))
    score = (metrics["refusal_score_before"], metrics["refusal_score_after"])
    rows = [("refusal score before -> after (first-token mass on refusal tokens)", f"{score[0]:.4f} -> {score[1]:.4f}"),
            (f"KL divergence, first token, {metrics['n_kl_prompts']} harmless prompts (nats)", f"{metrics['kl_divergence']:.6f}")]
    if "refusal_before" not in metrics:  # eval.generate=false: forward-only numbers
        return f'<p class="big">refusal score {score[0]:.4f} &rarr; {score[1]:.4f}, KL {metrics["kl_divergence"]:.4f}</p>' + table(
            ("measure", "value"), rows)
    before, after = metrics["refusal_before"], metrics["refusal_after"]
    return (
        f'<p class="big">refusal {before["rate"]:.3f} &rarr; {after["rate"]:.3f}, '
        f'KL {metrics["kl_divergence"]:.4f}</p>'
        + table(("measure", "value"), [
            ("refusal rate before (95% Wilson interval, refused/n)", _rate(before)),
            ("refusal rate after (95% Wilson interval, refused/n)", _rate(after)),
            *rows,
        ])
    )


def _plan(select_dir: Path) -> str:
    plan = read_plan(select_dir / "ablation.yaml")
    layers = sorted(plan["layers"], key=lambda entry: int(entry["layer"]))
    rows = [(e["layer"], e["direction_from"], e.get("attn_scale", e["scale"]), e.get("mlp_scale", e["scale"]),
             e.get("quality", "")) for e in layers]
    return (f"<p>method <code>{esc(plan['method'])}</code>, mode <code>{esc(plan.get('mode', ''))}</code>, "
            f"layers {esc(layer_ranges([int(e['layer']) for e in layers]))} of {esc(plan.get('num_layers', '?'))}</p>"
            + table(("layer", "direction_from", "attn scale", "mlp scale", "quality"), rows))


def _completions(evaluate_dir: Path) -> str:
    rows = [json.loads(line) for line in (evaluate_dir / "completions.jsonl").read_text(encoding="utf-8").splitlines() if line]
    parts = []
    for label, before, after in OUTCOMES:
        chosen = [row for row in rows if bool(row["refused_before"]) == before and bool(row["refused_after"]) == after]
        parts.append(f"<h3>{esc(label)}: {len(chosen)} of {len(rows)}</h3>")
        if chosen:
            parts.append("<table><tr><th>prompt</th><th>before</th><th>after</th></tr>" + "".join(
                f"<tr><td><pre>{esc(row['prompt'])}</pre></td><td><pre>{esc(row['before'])}</pre></td>"
                f"<td><pre>{esc(row['after'])}</pre></td></tr>" for row in chosen[:SAMPLES_PER_CLASS]) + "</table>")
    return "".join(parts)


def run_report(run: Mapping[str, Any], run_dir: Path) -> Path:
    """Write `run_dir/report.html` for run.json's content `run`; returns its path."""
    stages = {name: Path(info["dir"]) for name, info in run.get("stages", {}).items()}
    sections = []
    if "evaluate" in stages:
        sections.append("<h2>Result</h2>" + _metrics(stages["evaluate"]))
    if "ablate" in stages:
        model = stages["ablate"] / "model"
        sections.append(f"<h2>Model</h2><p><code>{esc(model)}</code></p>"
                        f"<p>try it: <code>python -m pipeline.chat {esc(run_dir / 'model')}</code></p>")
    if "select" in stages:
        sections.append("<h2>Selected layers</h2>" + _plan(stages["select"]))
    if "measure" in stages:
        sections.append("<h2>Refusal-direction quality per layer</h2>" + image(stages["measure"] / "quality.png", "quality per layer"))
    if "select" in stages:
        sections.append("<h2>Selection</h2>" + image(stages["select"] / "selection.png", "selected layers"))
    if "evaluate" in stages and (stages["evaluate"] / "completions.jsonl").is_file():  # none with eval.generate=false
        sections.append("<h2>Sampled completions (held-out harmful prompts)</h2>" + _completions(stages["evaluate"]))
    if run.get("error"):
        sections.append(f"<h2>Error</h2><pre>{esc(run['error'])}</pre>")
    sections.append("<h2>Provenance</h2>" + table(("stage", "cache key", "cached", "seconds"), [
        (name, info["key"], info["cached"], info["seconds"]) for name, info in run.get("stages", {}).items()])
        + f"<p>overrides: <code>{esc(' '.join(run.get('overrides', [])) or '(none)')}</code></p>")
    path = run_dir / REPORT
    path.write_text(page("abliteration run " + run_dir.name, sections), encoding="utf-8")
    return path


def sweep_report(sweep_dir: Path, summary_csv: Path, pareto_png: Path) -> Path:
    """Write `sweep_dir/report.html`: the Pareto plot and summary.csv's rows, each job linked to its own report."""
    with open(summary_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    cells = []
    for row in body:
        job = row[0]
        report = sweep_dir / job / REPORT
        link = f'<a href="{esc(job)}/{REPORT}">{esc(job)}</a>' if report.is_file() else esc(job)
        cells.append("<tr><td>" + link + "</td>" + "".join(f"<td>{esc(cell)}</td>" for cell in row[1:]) + "</tr>")
    head = "".join(f"<th>{esc(cell)}</th>" for cell in header)
    path = sweep_dir / REPORT
    path.write_text(page("abliteration sweep " + sweep_dir.name, [
        "<h2>Refusal rate vs KL</h2>" + image(pareto_png, "Pareto plot"),
        f"<h2>Jobs</h2><table><tr>{head}</tr>{''.join(cells)}</table>",
    ]), encoding="utf-8")
    return path
