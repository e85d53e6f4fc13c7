"""evaluate's report.md: the numbers, then up to ten sampled completions per class, before and after."""

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


def report_text(metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], harmless_rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "# Evaluation", "",
        f"Judge `{metrics['judge']}`, up to {metrics['max_new_tokens']} answer tokens per prompt.", "",
        "| | before | after |", "|---|---|---|",
        f"| refusal rate (harmful) | {_rate(metrics['refusal_before'])} | {_rate(metrics['refusal_after'])} |",
        f"| classes (harmful) | {_classes(metrics['outcomes_before'])} | {_classes(metrics['outcomes_after'])} |",
        f"| over-refusal (harmless) | {_rate(metrics['over_refusal_before'])} | {_rate(metrics['over_refusal_after'])} |",
        f"| classes (harmless) | {_classes(metrics['harmless_outcomes_before'])} | {_classes(metrics['harmless_outcomes_after'])} |",
        "",
        f"KL(original || edited): first token {metrics['kl_divergence']:.4f} nats; per token over the original's own "
        f"harmless completions (first {metrics['kl_tokens']} tokens, teacher-forced) {metrics['per_token_kl']:.4f} nats, "
        f"{metrics['n_kl_prompts']} prompts.", "",
    ]
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
