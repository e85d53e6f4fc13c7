"""What a user gets after a run: the last lines, the run folder's links, report.html, chat, the LoRA adapter."""

from __future__ import annotations

import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from pipeline import chat, report
from pipeline.artifacts import remove_tree
from pipeline.errors import PipelineError
from pipeline.outcome import RUN_LINKS, layer_ranges
from tiny_pipeline import run_in_process


@pytest.fixture(scope="module")
def run_dir(reference, model_store, tmp_path_factory) -> Path:
    """A run folder written by a rerun of the reference run (every stage served from the cache)."""
    cache, _ = reference
    folder = tmp_path_factory.mktemp("run-folder")
    run_in_process([f"cache.dir={cache}", f"cache.models={model_store}"], folder)
    return folder


def test_the_last_lines_say_what_happened(reference, model_store, tmp_path, capsys):
    cache, _ = reference
    summary = run_in_process([f"cache.dir={cache}", f"cache.models={model_store}"], tmp_path)
    out = capsys.readouterr().out
    assert all(stage["cached"] for stage in summary["stages"].values())
    assert re.search(r"refusal rate .*: \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \(\d+/\d+\) -> \d\.\d{3} \[", out)
    assert "KL divergence on" in out and "layers edited (0-based):" in out
    assert f"try it: python -m pipeline.chat {tmp_path / 'model'}" in out
    assert f"report: {tmp_path / 'report.html'}" in out


def test_the_run_folder_links_into_the_cache_and_cleanup_never_follows(reference, run_dir):
    cache, _ = reference
    for name in ("model", "metrics.json", "ablation.yaml", "quality.png", "selection.png", "completions.jsonl"):
        place = run_dir / name
        assert place.is_symlink(), name
        assert place.resolve().is_relative_to(cache.resolve()), name
    assert set(path.name for path in run_dir.iterdir() if path.is_symlink()) <= set(RUN_LINKS)
    model = (run_dir / "model").resolve()
    remove_tree(run_dir / "model")
    assert model.is_dir() and (model / "config.json").is_file()


def test_a_partial_run_says_what_it_did(reference, model_store, tmp_path, capsys):
    cache, _ = reference
    run_in_process([f"cache.dir={cache}", f"cache.models={model_store}", "run.stages=[collect]"], tmp_path)
    out = capsys.readouterr().out
    assert "collected residual activations of" in out and "not run: select, evaluate" in out
    assert not (tmp_path / "model").exists()


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_escapes_text(run_dir, tmp_path):
    run = json.loads((run_dir / "run.json").read_text())
    evaluate = tmp_path / "evaluate"
    evaluate.mkdir()
    (evaluate / "metrics.json").write_bytes((Path(run["stages"]["evaluate"]["dir"]) / "metrics.json").read_bytes())
    hostile = "<script>alert(1)</script><img src=http://evil.example/x.png>"
    (evaluate / "completions.jsonl").write_text(json.dumps(
        {"prompt": hostile, "before": "I can't & won't", "after": hostile, "refused_before": True, "refused_after": False}) + "\n")
    run["stages"]["evaluate"]["dir"] = str(evaluate)
    page = report.run_report(run, tmp_path).read_text()
    parsed = _Page()
    parsed.feed(page)
    assert "script" not in parsed.tags
    assert all(url.startswith("data:image/png;base64,") for url in parsed.urls)
    assert sum(url.startswith("data:image/png;base64,") for url in parsed.urls) >= 2  # quality + selection plots
    assert hostile in "".join(parsed.text) and "&lt;script&gt;" in page
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page).replace(html.escape(hostile), "")
    assert not re.search(r"(?:https?:)?//[a-z]", rest)  # no URL outside the escaped model text


def test_layer_ranges():
    assert layer_ranges([5, 3, 4, 9]) == "3-5, 9" and layer_ranges([]) == "none"


def test_chat_answers_piped_prompts_and_exits_on_eof(run_dir):
    out = io.StringIO()
    status = chat.main([str(run_dir), "--max-new-tokens", "3", "--compare"], stdin=io.StringIO("hello\n/reset\nhi <b>\n"), stdout=out)
    text = out.getvalue()
    assert status == 0 and text.count("[original]") == 2 and text.count("[ablated]") == 2 and "(conversation reset)" in text


def test_chat_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert chat.main([str(tmp_path)], stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_lora_adapter_merged_into_the_base_gives_the_exported_model(model, tmp_path, model_store):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    summary = run_in_process([f"cache.dir={tmp_path}", f"cache.models={model_store}", f"model={model}",
                              "select.method=orthogonal", "export.format=lora", "run.stages=[ablate]"])
    ablate = Path(summary["stages"]["ablate"]["dir"])
    source = json.loads((ablate / "manifest.json").read_text())["source"]["dir"]
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 7]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(str(ablate / "model"))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(source)
        original = base(ids).logits
        merged = peft.PeftModel.from_pretrained(base, str(ablate / "lora")).merge_and_unload()(ids).logits
    assert (original - exported).abs().max() > 1e-3  # the edit changes the model...
    torch.testing.assert_close(merged, exported, atol=1e-5, rtol=1e-5)  # ...and the adapter reproduces it


def test_lora_refuses_norm_preserving(reference, model_store):
    cache, _ = reference  # the reference plan is norm_preserving (mode=band): refused before ablate writes anything
    with pytest.raises(PipelineError, match="norm_preserving .* not a low-rank change"):
        run_in_process([f"cache.dir={cache}", f"cache.models={model_store}",
                        "export.format=lora", "run.stages=[ablate]"])


def test_reproduce_rebuilds_the_reference_model_bit_for_bit(run_dir, tmp_path, capsys):
    from pipeline import reproduce

    assert reproduce.main([str(run_dir), "--work-dir", str(tmp_path / "fresh")]) == 0
    out = capsys.readouterr().out
    assert "reproduced: every sha256 matches" in out and "model/model.safetensors: sha256 matches" in out
    assert "sha256 differs" not in out and "cache key" not in out.replace("same cache key", "")
