"""`python -m pipeline.regen`: committed plans are checked against a recomputation, and rewritten on request."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.regen import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "plans" / "example_dense"


@pytest.fixture
def plans(tmp_path: Path) -> Path:
    """A scratch copy of the committed example, so tests can edit it."""
    shutil.copytree(EXAMPLE, tmp_path / "plans" / "example_dense")
    return tmp_path / "plans"


def test_committed_example_is_up_to_date_via_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.regen", "--check", "--plans", "tests/plans"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "all 1 plans are up to date\n"


def test_committed_example_selects_the_planted_peak():
    text = (EXAMPLE / "ablation.yaml").read_text()
    layers = [line for line in text.splitlines() if line.startswith("- {")]
    # The synthetic measurement peaks at layer 13; dense balanced (0.015) keeps 11-15 (layer 16 is 0.0146).
    assert [line.split("layer: ")[1].split(",")[0] for line in layers] == ["11", "12", "13", "14", "15"]
    assert 'source_measurement: "example_dense"' in text


def test_check_fails_with_a_diff_after_an_edit_and_regen_repairs_it(plans, capsys):
    plan = plans / "example_dense" / "ablation.yaml"
    committed = plan.read_text()
    edited_line = "- {direction_from: 13, layer: 13, quality: 0.041595, scale: 0.500000}"
    plan.write_text(committed.replace(edited_line.replace("0.500000", "1.000000"), edited_line))

    assert main(["--check", "--plans", str(plans)]) == 1
    out, err = capsys.readouterr()
    assert f"-{edited_line}\n" in out
    assert "+- {direction_from: 13, layer: 13, quality: 0.041595, scale: 1.000000}" in out
    assert err == "1 of 1 plans are out of date; run python -m pipeline.regen\n"
    assert "scale: 0.500000" in plan.read_text(), "--check must not write"

    assert main(["--plans", str(plans)]) == 0
    assert plan.read_text() == committed
    assert main(["--check", "--plans", str(plans)]) == 0


def test_changed_settings_change_the_plan(plans, capsys):
    settings = plans / "example_dense" / "select.yaml"
    settings.write_text(settings.read_text().replace("top_n: 12", "top_n: 2"))
    assert main(["--check", "--plans", str(plans)]) == 1
    out, _ = capsys.readouterr()
    assert "-  top_n: 12" in out and "+  top_n: 2" in out
    assert main(["--plans", str(plans)]) == 0
    text = (plans / "example_dense" / "ablation.yaml").read_text()
    assert [line for line in text.splitlines() if line.startswith("- {")] == [
        "- {direction_from: 13, layer: 13, quality: 0.041595, scale: 1.000000}",
        "- {direction_from: 14, layer: 14, quality: 0.035702, scale: 1.000000}",
    ]


def test_missing_plan_is_out_of_date_then_written(plans, capsys):
    plan = plans / "example_dense" / "ablation.yaml"
    committed = plan.read_text()
    plan.unlink()
    assert main(["--check", "--plans", str(plans)]) == 1
    assert main(["--plans", str(plans)]) == 0
    assert plan.read_text() == committed


def test_measurement_of_another_model_shape_is_refused(plans, capsys):
    plan = plans / "example_dense" / "ablation.yaml"
    plan.write_text(plan.read_text().replace("hidden_size: 64", "hidden_size: 896"))
    assert main(["--check", "--plans", str(plans)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: measurement ")
    assert "measurements.safetensors is from a model with hidden size 64, this model has 896;" in err
    assert err.count("\n") == 1


def test_pickled_measurement_is_refused(plans, capsys):
    folder = plans / "example_dense"
    (folder / "measurements.safetensors").unlink()
    (folder / "measurements.pt").write_bytes(b"\x80\x04pickle that must never be loaded")
    assert main(["--check", "--plans", str(plans)]) == 2
    _, err = capsys.readouterr()
    assert err == f"error: {folder / 'measurements.pt'}: we never unpickle; measurements must be .safetensors\n"


def test_invalid_select_settings_name_the_file(plans, capsys):
    settings = plans / "example_dense" / "select.yaml"
    settings.write_text(settings.read_text().replace("top_n: 12", "top_n: 0"))
    assert main(["--check", "--plans", str(plans)]) == 2
    _, err = capsys.readouterr()
    assert err == f"error: {settings}: mode.top_n must be >= 1, got 0\n"


def test_a_folder_without_settings_is_an_error_not_a_pass(tmp_path, capsys):
    assert main(["--check", "--plans", str(tmp_path)]) == 2
    assert "no select.yaml under" in capsys.readouterr().err
