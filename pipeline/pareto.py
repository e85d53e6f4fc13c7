"""The Pareto front of two minimized objectives: the sweep summary's and the plan search's one rule."""

from __future__ import annotations

from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates minimized), by x then y.

    A point is dominated when another is <= in both coordinates and < in at least one; equal points
    do not dominate each other, so duplicates on the front are all kept (ties in order of index).
    """

    def dominated(i: int) -> bool:
        x, y = points[i]
        return any(ox <= x and oy <= y and (ox < x or oy < y) for ox, oy in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i], i))
