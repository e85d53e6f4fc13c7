"""Shipped prompt data, loaders for every source form, and the train/eval split (validation: test_prompt_splits.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.prompt_sets import (
    PromptSet,
    check_disjoint,
    load_prompt_set,
    normalize_prompt,
    prompt_splits,
    split_prompts,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "prompts"
SHIPPED = {
    "harmful": {"source": "pkg:prompts/harmful.txt", "field": None, "split": None, "category_field": None},
    "harmless": {"source": "pkg:prompts/harmless.jsonl", "field": "prompt", "split": None, "category_field": "category"},
}
PACKAGE = Path(__file__).resolve().parents[1] / "prompts"
PROMPTS = ["Write a poem about rain", "How do I bake bread?", "Explain how tides work"]


def _mean_words(texts: tuple[str, ...]) -> float:
    return sum(len(text.split()) for text in texts) / len(texts)


def _file_set(n: int) -> PromptSet:
    texts = tuple(f"prompt number {i}" for i in range(n))
    return PromptSet(texts=texts, sha256=hashlib.sha256(b"x").hexdigest(), source="toy.txt")


@pytest.fixture(scope="module")
def shipped() -> dict[str, PromptSet]:
    return {side: load_prompt_set(spec) for side, spec in SHIPPED.items()}


# --- shipped data ---------------------------------------------------------------------------


def test_shipped_sets_are_large_enough(shipped):
    assert len(shipped["harmful"].texts) >= 520
    assert len(shipped["harmless"].texts) >= 520


def _shipped_rows() -> dict[str, list[dict]]:
    """Each file's rows as written: harmful.txt one prompt a line, harmless.jsonl {"category", "prompt"} objects."""
    harmful = (PACKAGE / "harmful.txt").read_text(encoding="utf-8").splitlines()
    harmless = (PACKAGE / "harmless.jsonl").read_text(encoding="utf-8").splitlines()
    return {"harmful": [{"prompt": line} for line in harmful], "harmless": [json.loads(line) for line in harmless]}


def test_shipped_files_have_no_duplicates_within_or_across(shipped):
    normalized = {}
    for side, rows in _shipped_rows().items():
        prompts = [row["prompt"] for row in rows]
        assert all(text.strip() == text and text for text in prompts), f"{side} has blank or padded prompts"
        keys = [normalize_prompt(text) for text in prompts]
        assert len(keys) == len(set(keys)), f"{side} has duplicate prompts"
        assert len(shipped[side].texts) == len(prompts)  # nothing dropped by the loader's dedup
        normalized[side] = set(keys)
    assert normalized["harmful"].isdisjoint(normalized["harmless"])
    assert all(set(row) == {"category", "prompt"} for row in _shipped_rows()["harmless"])


def test_shipped_short_requests_match_the_harmful_set_in_length(shipped):
    """The short requests are the harmful set's counterpart in form (prompts/README.md); the other kinds are not."""
    short = tuple(row["prompt"] for row in _shipped_rows()["harmless"] if row["category"] == "short_request")
    harmful, harmless = _mean_words(shipped["harmful"].texts), _mean_words(short)
    assert len(short) == 601
    assert abs(harmful - harmless) / max(harmful, harmless) < 0.20


def test_shipped_hash_is_the_file_hash(shipped):
    for side, name in (("harmful", "harmful.txt"), ("harmless", "harmless.jsonl")):
        assert shipped[side].sha256 == hashlib.sha256((PACKAGE / name).read_bytes()).hexdigest()


def test_default_preset_splits_disjoint_sizes():
    cfg = OmegaConf.load(CONF_DIR / "default.yaml")
    splits = prompt_splits(cfg)
    sizes = [cfg.n_train, cfg.n_eval, cfg.n_val]
    assert [len(splits.harmful_train), len(splits.harmful_eval), len(splits.harmful_val)] == sizes
    assert [len(splits.harmless_train), len(splits.harmless_eval), len(splits.harmless_val)] == sizes
    check_disjoint(splits.harmful_train, splits.harmful_eval, "harmful")
    check_disjoint(splits.harmless_train, splits.harmless_eval, "harmless")
    assert set(splits.hashes) == {"harmful", "harmless"} and splits.hashes["harmful"] != splits.hashes["harmless"]


def test_every_preset_names_both_sides_and_a_command():
    for path in sorted(CONF_DIR.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith(f"# python -m pipeline prompts={path.stem}"), path.name
        cfg = OmegaConf.to_container(OmegaConf.create(text))
        assert cfg["name"] == path.stem
        assert cfg["harmful"]["source"] and cfg["harmless"]["source"]


# --- normalization and the leak check ------------------------------------------------------


def test_normalize_prompt_ignores_case_punctuation_and_spacing():
    assert normalize_prompt("  How do I   BAKE bread?! ") == "how do i bake bread"
    assert normalize_prompt("step-by-step_guide") == "step by step guide"


def test_check_disjoint_catches_a_normalized_leak():
    check_disjoint(["Write a poem"], ["Write a story"], "harmful")
    with pytest.raises(PipelineError, match="harmful: 1 eval prompt"):
        check_disjoint(["Write a poem.", "Other"], ["write a  POEM", "Fine"], "harmful")


# --- split ----------------------------------------------------------------------------------


def test_split_is_disjoint_and_sized():
    train, held_out, val = split_prompts(_file_set(10), seed=0, n_train=6, n_eval=3, n_val=1)
    assert len(train) == 6 and len(held_out) == 3 and len(val) == 1
    assert set(train).isdisjoint(held_out)
    assert len(set(train) | set(held_out) | set(val)) == 10


def test_split_is_deterministic_and_depends_on_seed_and_hash():
    base = _file_set(50)
    first = split_prompts(base, seed=0, n_train=10, n_eval=5, n_val=5)
    assert split_prompts(base, seed=0, n_train=10, n_eval=5, n_val=5) == first
    assert split_prompts(base, seed=1, n_train=10, n_eval=5, n_val=5) != first
    rehashed = PromptSet(texts=base.texts, sha256=hashlib.sha256(b"y").hexdigest(), source="toy.txt")
    assert split_prompts(rehashed, seed=0, n_train=10, n_eval=5, n_val=5) != first


def test_split_train_is_a_prefix_of_a_larger_train():
    """Same shuffle for every size: growing n_train only adds prompts."""
    small = split_prompts(_file_set(50), seed=3, n_train=5, n_eval=5, n_val=5)[0]
    large = split_prompts(_file_set(50), seed=3, n_train=20, n_eval=5, n_val=5)[0]
    assert large[:5] == small


def test_split_needs_enough_prompts_and_positive_sizes():
    with pytest.raises(PipelineError, match=r"toy\.txt has 5 distinct prompts but n_train \+ n_eval \+ n_val = 6"):
        split_prompts(_file_set(5), seed=0, n_train=3, n_eval=2, n_val=1)
    for sizes in ((0, 2, 1), (2, 0, 1), (2, 1, 0)):
        with pytest.raises(PipelineError, match=r"toy\.txt must all be >= 1"):
            split_prompts(_file_set(5), 0, *sizes)


# --- loaders --------------------------------------------------------------------------------


def _write(path: Path, fmt: str, rows: list[str], field: str = "text") -> None:
    if fmt == "txt":
        path.write_text("\n".join(rows) + "\n\n   \n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{field: r} for r in rows]), encoding="utf-8")
    elif fmt == "csv":
        body = "id," + field + "\n" + "".join(f'{i},"{r}"\n' for i, r in enumerate(rows))
        path.write_text(body, encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(rows))), field: rows}), path)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "csv", "parquet"])
def test_every_format_round_trips(tmp_path, fmt):
    path = tmp_path / f"prompts.{fmt}"
    _write(path, fmt, PROMPTS, field="goal")
    loaded = load_prompt_set({"source": str(path), "field": "goal", "split": None})
    assert loaded.texts == tuple(PROMPTS)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source == str(path)


def test_json_list_of_strings_and_default_field(tmp_path):
    strings, objects = tmp_path / "a.json", tmp_path / "b.jsonl"
    strings.write_text(json.dumps(PROMPTS), encoding="utf-8")
    objects.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    assert load_prompt_set({"source": str(strings)}).texts == tuple(PROMPTS)
    assert load_prompt_set({"source": str(objects), "field": None}).texts == tuple(PROMPTS)


def test_txt_strips_whitespace_crlf_and_drops_normalized_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbf  Write a poem  \r\nHow do I bake bread?\r\n\r\nwrite a POEM.\r\n")
    assert load_prompt_set({"source": str(path)}).texts == ("Write a poem", "How do I bake bread?")


def test_relative_path_resolves_against_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_text("One\nTwo\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    loaded = load_prompt_set({"source": "data/p.txt"})
    assert loaded.texts == ("One", "Two") and loaded.source == str(tmp_path / "data" / "p.txt")


def test_hf_source_passes_subset_split_and_field(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, *args, split):
        calls.append((name, args, split))
        return datasets.Dataset.from_dict({"Goal": PROMPTS + ["  "], "Behavior": ["a", "b", "c", "d"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = {"source": "hf:JailbreakBench/JBB-Behaviors", "field": "Goal", "split": "harmful", "subset": "behaviors"}
    loaded = load_prompt_set(spec)
    assert calls == [("JailbreakBench/JBB-Behaviors", ("behaviors",), "harmful")]
    assert loaded.texts == tuple(PROMPTS)
    assert loaded.sha256 == hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()
    load_prompt_set({"source": "hf:walledai/AdvBench", "field": "Goal", "split": None})
    assert calls[-1] == ("walledai/AdvBench", (), "train")
    with pytest.raises(PipelineError, match=r"hf:walledai/AdvBench.*no column 'prompt'.*Goal, Behavior"):
        load_prompt_set({"source": "hf:walledai/AdvBench", "field": "prompt"})


@pytest.mark.parametrize("error", [ConnectionError("no network"), FileNotFoundError("not cached")])
def test_hf_source_offline_gives_a_fix(monkeypatch, error):
    import datasets

    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PipelineError, match=r"dataset walledai/AdvBench could not be reached offline.*prompts=default"):
        load_prompt_set({"source": "hf:walledai/AdvBench", "field": "prompt", "split": "train"})


# --- bad input: every message names the file ---------------------------------------------------


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.txt", b"", "contains no prompts"),
        ("blank.txt", b"\n   \n\t\n", "contains no prompts"),
        ("empty.csv", b"", "contains no prompts"),
        ("cols.csv", b"id,goal\n1,x\n", r"no column 'prompt' \(header has: id, goal\)"),
        ("cols.jsonl", b'{"goal": "x"}\n', r"no column 'prompt' \(row 1 has: goal\)"),
        ("bad.jsonl", b'{"prompt": "x"}\n{oops\n', "invalid JSON at line 2"),
        ("dict.json", b'{"prompt": "x"}', "must hold a JSON list"),
        ("nulls.json", b'[{"prompt": null}]', "entry 1 is NoneType"),
        ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "is not UTF-8"),
        ("prompts.yaml", b"- x\n", "unsupported extension '.yaml'"),
    ],
)
def test_bad_files_raise_pipeline_error_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=expected) as caught:
        load_prompt_set({"source": str(path), "field": "prompt"})
    assert name in str(caught.value) and "\n" not in str(caught.value)


def test_missing_parquet_column_lists_the_schema(tmp_path):
    path = tmp_path / "p.parquet"
    _write(path, "parquet", PROMPTS, field="goal")
    with pytest.raises(PipelineError, match=r"p\.parquet has no column 'prompt' \(schema has: id, goal\)"):
        load_prompt_set({"source": str(path), "field": "prompt"})


def test_missing_file_and_missing_package_file(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.txt does not exist"):
        load_prompt_set({"source": str(tmp_path / "nope.txt")})
    with pytest.raises(PipelineError, match=r"pkg:prompts/nope\.txt does not exist"):
        load_prompt_set({"source": "pkg:prompts/nope.txt"})


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("Write a poem\n", encoding="utf-8")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user (e.g. root) who can read a mode-000 file")
        with pytest.raises(PipelineError, match=r"locked\.txt is not readable"):
            load_prompt_set({"source": str(path)})
    finally:
        path.chmod(0o644)


def test_too_few_prompts_for_the_split_names_the_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"small\.txt has 3 distinct prompts but n_train \+ n_eval \+ n_val = 4"):
        split_prompts(load_prompt_set({"source": str(path)}), seed=0, n_train=2, n_eval=1, n_val=1)


def test_spec_without_source():
    with pytest.raises(PipelineError, match="has no source"):
        load_prompt_set({"field": None})
