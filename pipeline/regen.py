"""Regenerate committed ablation plans and check that they are up to date.

    python -m pipeline.regen [--check] --plans DIR

Every folder under DIR (this repository keeps its committed plans in `tests/plans/`) that holds a `select.yaml` (the
mode and select settings, `{mode: {name, min_quality, top_n}, select: {...}}`)
beside a `measurements.safetensors` gets its `ablation.yaml` recomputed with
the select stage's own functions. Without `--check` out-of-date plans are
rewritten; with `--check` (CI) they are shown as a unified diff and the exit
status is 1. A plan changes only when its inputs or the selection code do,
so a failing check means a code change altered committed plans.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Sequence

import yaml

from pipeline.errors import PipelineError
from pipeline.measurement import MEASUREMENT_SUFFIX, check_measurement_matches, read_measurements
from pipeline.plan import plan_to_text, read_plan
from pipeline.selection import build_plan, settings_from_config

SETTINGS_FILE = "select.yaml"
PLAN_FILE = "ablation.yaml"
MEASUREMENT_STEM = "measurements"


def _measurement_beside(settings_file: Path) -> Path:
    """The folder's measurement file; a `measurements.pt`/`.pkl`/`.bin` is returned so reading refuses it."""
    folder = settings_file.parent
    preferred = folder / f"{MEASUREMENT_STEM}{MEASUREMENT_SUFFIX}"
    if preferred.is_file():
        return preferred
    others = sorted(path for path in folder.iterdir() if path.stem == MEASUREMENT_STEM)
    if others:
        return others[0]
    raise PipelineError(
        f"{settings_file} has no {preferred.name} beside it; add the measurement or remove {settings_file}"
    )


def _load_settings_file(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); fix it") from None
    if not isinstance(loaded, dict):
        raise PipelineError(f"{path} must be a mapping with mode: and select: sections")
    return loaded


def regenerated_plan_text(settings_file: Path) -> str:
    """The plan text the select stage would write for this folder's measurement and settings."""
    settings = settings_from_config(_load_settings_file(settings_file), source=str(settings_file))
    measurement_file = _measurement_beside(settings_file)
    measurements = read_measurements(measurement_file)
    committed = settings_file.parent / PLAN_FILE
    if committed.is_file():
        plan = read_plan(committed)
        check_measurement_matches(measurements.meta, plan["hidden_size"], plan["num_layers"], str(measurement_file))
    return plan_to_text(build_plan(measurements, settings, source_measurement=measurement_file.parent.name))


def regenerate(plans: Path, check: bool) -> int:
    """Check or rewrite every plan under `plans`; returns the exit status (0 up to date, 1 out of date)."""
    if not plans.is_dir():
        raise PipelineError(f"plans folder {plans} does not exist; pass --plans DIR")
    settings_files = sorted(plans.rglob(SETTINGS_FILE))
    if not settings_files:
        raise PipelineError(f"no {SETTINGS_FILE} under {plans}; nothing to regenerate (wrong --plans?)")
    out_of_date = 0
    for settings_file in settings_files:
        plan_file = settings_file.parent / PLAN_FILE
        expected = regenerated_plan_text(settings_file)
        current = plan_file.read_text(encoding="utf-8") if plan_file.is_file() else ""
        if current == expected:
            continue
        out_of_date += 1
        if check:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    fromfile=f"{plan_file} (committed)",
                    tofile=f"{plan_file} (regenerated)",
                )
            )
        else:
            plan_file.write_text(expected, encoding="utf-8")
            print(f"updated {plan_file}")
    if check and out_of_date:
        print(
            f"{out_of_date} of {len(settings_files)} plans are out of date; run python -m pipeline.regen",
            file=sys.stderr,
        )
        return 1
    if check:
        print(f"all {len(settings_files)} plans are up to date")
    else:
        print(f"{len(settings_files)} plans checked, {out_of_date} rewritten")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.regen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff when a plan is stale")
    parser.add_argument("--plans", type=Path, required=True, help="folder of committed plans to search (here: tests/plans)")
    args = parser.parse_args(argv)
    try:
        return regenerate(args.plans, check=args.check)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
