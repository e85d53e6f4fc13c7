"""evaluate's report.md: the numbers, then up to ten sampled completions per class, before and after (none when
eval.generate=false: only the forward-only numbers)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.judges import OUTCOMES

SAMPLES = 10


def _rate(summary: Mapping[str, Any]) -> str:
    low, high = summary["wilson95"]
    return f"{summary['rate']:.3f} ({summary['refused']}/{summary['n']}, 95% CI {low:.3f}-{high:.3f})"


def _classes(summary: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {summary['rates'][name]:.3f}" for name in OUTCOMES)


def _quote(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return "\n".join("> " + line for line in (text or "(nothing)").splitlines() or ["(nothing)"])


def _numbers(metrics: Mapping[str, Any]) -> list[str]:
    """The before/after table and the KL line; without generation (eval.generate=false) the forward-only ones."""
    tokens = ", ".join(repr(token["text"]) for token in metrics["refusal_tokens"])
    score = (f"| refusal score (harmful, first-token mass on {tokens}) | {metrics['refusal_score_before']:.4f} | "
             f"{metrics['refusal_score_after']:.4f} |")
    kl = f"KL(original || edited): first token {metrics['kl_divergence']:.4f} nats"
    how = "Measured: " + "; ".join(f"{name} {way}" for name, way in metrics["measured"].items() if name != "baseline") + "."
    if metrics["generate"] is not True:
        return ["No generation (eval.generate=false): forward-only numbers.", "",
                "| | before | after |", "|---|---|---|", score, "", f"{kl}, {metrics['n_kl_prompts']} prompts.", "", how, ""]
    return [
        f"Judge `{metrics['judge']}`, up to {metrics['max_new_tokens']} answer tokens per prompt.", "",
        "| | before | after |", "|---|---|---|",
        f"| refusal rate (harmful) | {_rate(metrics['refusal_before'])} | {_rate(metrics['refusal_after'])} |",
        f"| classes (harmful) | {_classes(metrics['outcomes_before'])} | {_classes(metrics['outcomes_after'])} |",
        score,
        f"| over-refusal (harmless) | {_rate(metrics['over_refusal_before'])} | {_rate(metrics['over_refusal_after'])} |",
        f"| classes (harmless) | {_classes(metrics['harmless_outcomes_before'])} | {_classes(metrics['harmless_outcomes_after'])} |",
        "",
        f"{kl}; per token over the original's own harmless completions (first {metrics['kl_tokens']} tokens, "
        f"teacher-forced) {metrics['per_token_kl']:.4f} nats, {metrics['n_kl_prompts']} prompts.", "", how, "",
    ]


def _categories(metrics: Mapping[str, Any]) -> list[str]:
    """The per-category table of the harmless prompts (first-token KL, over-refusal when generated)."""
    breakdown = metrics["harmless_by_category"]
    if not breakdown:
        return []
    generated = metrics["generate"] is True
    lines = ["By harmless category:", "", "| category | prompts | first-token KL |" + (" over-refusal before → after |" if generated else ""),
             "|---|---|---|" + ("---|" if generated else "")]
    for name, entry in breakdown.items():
        row = f"| {name} | {entry['n']} | {entry['kl']:.4f} |"
        if generated:
            row += f" {entry['over_refusal_before']} → {entry['over_refusal_after']} |"
        lines.append(row)
    return [*lines, ""]


def report_text(metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], harmless_rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["# Evaluation", "", *_numbers(metrics), *_categories(metrics)]
    for title, pairs in (("Harmful prompts", rows), ("Harmless prompts", harmless_rows)):
        for side in ("before", "after"):
            for name in OUTCOMES:
                chosen = [row for row in pairs if row[f"class_{side}"] == name]
                if not chosen:
                    continue
                picked = sorted(random.Random(0).sample(range(len(chosen)), min(SAMPLES, len(chosen))))
                lines += [f"## {title}, {side}: {name} ({len(chosen)})", ""]
                for index in picked:
                    row = chosen[index]
                    lines += [f"**{row['prompt'][:200]}** — {row[f'reason_{side}']}", "", _quote(row[side]), ""]
    return "\n".join(lines)


def write_report(path: Path, metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 harmless_rows: Sequence[Mapping[str, Any]]) -> None:
    path.write_text(report_text(metrics, rows, harmless_rows), encoding="utf-8")
