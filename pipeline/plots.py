"""The pipeline's figures, drawn with matplotlib's Agg canvas (no display, byte-stable PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_quality(
    path: Path, quality: Sequence[float], title: str, selected: Sequence[int] = (), threshold: float | None = None
) -> None:
    """Quality by layer as a bar chart; `selected` layers in red, `threshold` as a dashed line."""
    figure = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    chosen = set(selected)
    colours = ["tab:red" if layer in chosen else "tab:blue" for layer in range(len(quality))]
    axes.bar(range(len(quality)), quality, color=colours)
    if threshold is not None:
        axes.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"mode.min_quality={threshold:g}")
        axes.legend(loc="upper left")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer (0-based)")
    axes.set_ylabel("signal quality")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


def plot_pareto(
    path: Path,
    points: Sequence[tuple[float, float]],
    front: Sequence[int],
    title: str,
    *,
    labels: Sequence[str] = (),
    point_label: str = "points",
    chosen: int | None = None,
    chosen_label: str = "chosen",
    max_kl: float | None = None,
    empty: str = "nothing to plot",
    y_label: str = "refusal rate on held-out harmful prompts",
) -> None:
    """Refusal rate (or `y_label`'s figure) against KL for points `(kl, refusal_rate)`: every point in grey, the Pareto front
    (`pipeline.pareto.pareto_front` indices) as a step line, optional per-point labels, the `chosen`
    point as a star and the search's `max_kl` budget as a dashed line (the sweep summary and the plan search)."""
    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if points:
        axes.scatter([x for x, _ in points], [y for _, y in points], s=18, color="tab:gray", label=point_label)
        axes.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="tab:red",
                  marker="o", markersize=4, label="Pareto front")
        for label, point in zip(labels, points):
            if label:
                axes.annotate(label, point, textcoords="offset points", xytext=(4, 4), fontsize=7)
        if chosen is not None:
            axes.scatter(*points[chosen], s=160, marker="*", color="gold", edgecolor="black", zorder=5,
                         label=chosen_label)
        if max_kl is not None:
            axes.axvline(max_kl, color="black", linestyle="--", linewidth=1, label=f"max_kl={max_kl:g}")
        axes.legend(loc="upper right", fontsize=8)
    else:
        axes.text(0.5, 0.5, empty, ha="center", va="center", transform=axes.transAxes)
    axes.set_xscale("symlog", linthresh=1e-3)
    # KL >= 0; at least the linear part [0, 1e-3] is shown, so a few tiny KLs do not get a zero-width axis
    axes.set_xlim(0, 1.5 * max([1e-3, *(x for x, _ in points), *([] if max_kl is None else [max_kl])]))
    axes.set_xlabel("KL divergence on harmless prompts (nats, symlog; lower is better)")
    axes.set_ylabel(y_label)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
