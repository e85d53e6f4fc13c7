"""The three-way split (train, eval, validation), `eval.split`, and the shipped harmless set's categories.

A plan or preset chosen on the validation slice is reported on the eval slice; both are held out from
train. These tests hold the slices disjoint, keep train and eval what the two-way split gave (for the
same prompt file, adding validation moved no train or eval prompt), and check that the harder harmless
set reaches every held-out slice with every kind of prompt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.prompt_sets import (
    PromptSet,
    load_prompt_set,
    normalize_prompt,
    prompt_categories,
    prompt_splits,
    split_prompts,
)
from pipeline.runner import config_slice, hashed_slice
from pipeline.scoring import eval_prompts
from pipeline.stages import registry
from tiny_pipeline import CONF, compose_config, one_line_error, run_cli

CATEGORIES = {"short_request", "long_request", "code", "maths", "structured_output", "roleplay", "translation", "advice"}


def _two_way(prompt_set: PromptSet, seed: int, n_train: int, n_eval: int) -> tuple[list[str], list[str], list[str]]:
    """The split as it was before validation existed (train head, eval next), and the rest of the same order."""
    order = list(range(len(prompt_set.texts)))
    random.Random(f"{prompt_set.sha256}:{seed}").shuffle(order)
    texts = [prompt_set.texts[i] for i in order]
    return texts[:n_train], texts[n_train:n_train + n_eval], texts[n_train + n_eval:]


def _assert_pairwise_disjoint(slices: dict[str, list[str]]) -> None:
    for (first, a), (second, b) in itertools.combinations(slices.items(), 2):
        shared = {normalize_prompt(t) for t in a} & {normalize_prompt(t) for t in b}
        assert not shared, f"{first} and {second} share {len(shared)} prompt(s)"


@pytest.fixture(scope="module")
def default_prompts() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "prompts" / "default.yaml"))


@pytest.fixture(scope="module")
def splits(default_prompts):
    return prompt_splits(default_prompts)


# --- the split --------------------------------------------------------------------------------------


def test_the_shipped_slices_are_pairwise_disjoint_and_sized(splits, default_prompts):
    sizes = [default_prompts[key] for key in ("n_train", "n_eval", "n_val")]
    assert sizes == [128, 64, 64]
    for side in ("harmful", "harmless"):
        slices = {name: getattr(splits, f"{side}_{name}") for name in ("train", "eval", "val")}
        assert [len(texts) for texts in slices.values()] == sizes
        _assert_pairwise_disjoint(slices)


def test_slices_are_disjoint_for_random_seeds_and_sizes():
    texts = tuple(f"prompt number {i}" for i in range(60))
    prompt_set = PromptSet(texts=texts, sha256=hashlib.sha256(b"toy").hexdigest(), source="toy.txt")
    draw = random.Random(19)
    for _ in range(50):
        seed, n_train, n_eval = draw.randrange(10**6), draw.randint(1, 40), draw.randint(1, 10)
        n_val = draw.randint(1, 60 - n_train - n_eval)
        train, held_out, val = split_prompts(prompt_set, seed, n_train, n_eval, n_val)
        assert (len(train), len(held_out), len(val)) == (n_train, n_eval, n_val)
        _assert_pairwise_disjoint({"train": train, "eval": held_out, "val": val})


def test_train_and_eval_are_the_two_way_split_and_validation_is_next(default_prompts):
    """Exact lists: adding n_val (of any size) leaves train and eval where the two-way split put them."""
    for side in ("harmful", "harmless"):
        prompt_set = load_prompt_set(default_prompts[side])
        for seed, n_val in itertools.product((0, 1, 7), (1, 64, 300)):
            train, held_out, rest = _two_way(prompt_set, seed, 128, 64)
            assert split_prompts(prompt_set, seed, 128, 64, n_val) == (train, held_out, rest[:n_val])


def test_eval_split_validation_scores_the_validation_slice(splits):
    """What baseline and evaluate (and a plan search through them) score: `eval_prompts` under each `eval.split`."""
    scored = {}
    for split in ("eval", "validation"):
        composed = compose_config(["model=tiny", f"eval.split={split}"])
        cfg = OmegaConf.to_container(composed, resolve=True)
        assert cfg["eval"]["split"] == split and cfg["eval"]["kl_prompts"] == 64
        scored[split] = eval_prompts(cfg["prompts"], cfg["eval"])
        for stage in ("baseline", "evaluate"):  # the split is in their keys: the two never share an artifact
            assert config_slice(composed, registry()[stage].config_keys)["eval"]["split"] == split
    assert scored["eval"] == (splits.harmful_eval, splits.harmless_eval[:64])
    assert scored["validation"] == (splits.harmful_val, splits.harmless_val[:64])
    _assert_pairwise_disjoint({"train": splits.harmful_train, "eval": scored["eval"][0], "val": scored["validation"][0]})
    _assert_pairwise_disjoint({"train": splits.harmless_train, "eval": scored["eval"][1], "val": scored["validation"][1]})


def test_too_few_prompts_for_three_slices_is_one_line_and_status_2_before_any_work(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    common = ["model=tiny", "run.progress=false", f"cache.dir={cache}", f"cache.models={tmp_path / 'models'}",
              f"hydra.run.dir={tmp_path / 'run'}"]
    for override, says in (
        ("prompts.n_val=409", "pkg:prompts/harmful.txt has 600 distinct prompts but n_train + n_eval + n_val = 601; "
                              "lower prompts.n_train/prompts.n_eval/prompts.n_val or use a larger prompt set"),
        ("prompts.n_val=0", "prompts.n_val must be >= 1, got 0"),
    ):
        started = time.perf_counter()
        status, err = run_cli([*common, override], capsys, monkeypatch)
        assert time.perf_counter() - started < 10
        assert (status, err.strip().splitlines()) == (2, [f"error: {says}"]), override
    assert not [path for path in tmp_path.rglob("*") if cache in path.parents or path == tmp_path / "models"]


# --- the shipped harmless set's categories ------------------------------------------------------------


def test_the_shipped_harmless_set_has_every_category(splits):
    categories = splits.categories["harmless"]
    texts = load_prompt_set({"source": "pkg:prompts/harmless.jsonl", "field": "prompt"}).texts
    assert set(categories) == set(texts) and len(texts) == 947  # every prompt has one
    counts = Counter(categories.values())
    assert set(counts) == CATEGORIES and counts["short_request"] == 601
    assert sum(counts.values()) - counts["short_request"] >= 300
    assert min(counts.values()) >= 40, counts
    assert splits.categories["harmful"] == {}  # category_field: null


def test_every_held_out_slice_holds_every_category(splits):
    """The KL prompts (seed 0, default n_train/n_eval/kl_prompts) and the validation slice reach every kind."""
    kl_prompts = OmegaConf.load(CONF / "eval" / "default.yaml").kl_prompts
    categories = splits.categories["harmless"]
    for held_out in (splits.harmless_eval[:kl_prompts], splits.harmless_val[:kl_prompts]):
        assert {categories[text] for text in held_out} == CATEGORIES


# --- prompt_categories on every source form -------------------------------------------------------------


ROWS = [
    {"text": "Write a poem about rain", "kind": "short"},
    {"text": "  ", "kind": "blank prompt: skipped, as the loader skips it"},
    {"text": "Explain this: x = [i * i for i in range(3)]", "kind": "code"},
    {"text": "write a POEM about rain!", "kind": "a duplicate keeps the first row's category"},
]
EXPECTED = {"Write a poem about rain": "short", "Explain this: x = [i * i for i in range(3)]": "code"}


def _spec(path: Path, category_field: str | None = "kind") -> dict:
    return {"source": str(path), "field": "text", "split": None, "category_field": category_field}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_categories_from_every_format(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif fmt == "csv":
        path.write_text("text,kind\n" + "".join(f'"{r["text"]}","{r["kind"]}"\n' for r in ROWS), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({key: [row[key] for row in ROWS] for key in ("text", "kind")}), path)
    assert prompt_categories(_spec(path)) == EXPECTED
    assert prompt_categories(_spec(path, None)) == {}


def test_a_text_file_has_no_categories_whatever_the_category_field(tmp_path):
    """One prompt per line has no columns: category_field is ignored, as field is, so a default preset with
    `prompts.harmless.source=<file>.txt` still runs (without a per-category breakdown)."""
    path = tmp_path / "p.txt"
    path.write_text("Write a poem\nExplain tides\n", encoding="utf-8")
    assert prompt_categories(_spec(path)) == {}


def test_categories_from_a_hugging_face_dataset(monkeypatch):
    import datasets

    def fake_load(name, *args, split):
        return datasets.Dataset.from_dict({"Goal": [row["text"] for row in ROWS], "Category": [row["kind"] for row in ROWS]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = {"source": "hf:some/dataset", "field": "Goal", "split": "train", "category_field": "Category"}
    assert prompt_categories(spec) == EXPECTED


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("p.json", json.dumps(["Write a poem"]), r"p\.json: row 1 is str, expected an object holding 'kind'"),
        ("p.jsonl", json.dumps({"text": "Write a poem"}) + "\n", r"no column 'kind' \(row 1 has: text\)"),
        ("p.csv", "text,kind\nWrite a poem,\n", r"p\.csv: row 1 has no 'kind' text; give every prompt a category or set "
                                                  r"prompts\.\*\.category_field to null"),
        ("q.jsonl", json.dumps({"text": "Write a poem", "kind": 3}) + "\n", r"q\.jsonl: row 1 has no 'kind' text"),
    ],
)
def test_a_set_without_usable_categories_is_refused_naming_the_file(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PipelineError, match=says) as caught:
        prompt_categories(_spec(path))
    assert "\n" not in str(caught.value)


# --- prompts.*.train_categories: a form-matched contrast set for the direction ---------------------------------------


def _train_on(prompts: dict, side: str, categories: list[str] | None) -> dict:
    return {**prompts, side: {**prompts[side], "train_categories": categories}}


def test_train_categories_restrict_train_and_leave_the_held_out_slices(default_prompts):
    everything = prompt_splits(_train_on(default_prompts, "harmless", None))
    narrowed = prompt_splits(_train_on(default_prompts, "harmless", ["short_request"]))
    categories = everything.categories["harmless"]
    assert len(narrowed.harmless_train) == default_prompts["n_train"]
    assert {categories[text] for text in narrowed.harmless_train} == {"short_request"}
    assert {categories[text] for text in everything.harmless_train} > {"short_request"}
    assert (narrowed.harmless_eval, narrowed.harmless_val) == (everything.harmless_eval, everything.harmless_val)
    assert narrowed.harmful_train == everything.harmful_train
    _assert_pairwise_disjoint({"train": narrowed.harmless_train, "eval": narrowed.harmless_eval,
                               "validation": narrowed.harmless_val})
    kept = [text for text in everything.harmless_train if categories[text] == "short_request"]
    assert narrowed.harmless_train[:len(kept)] == kept  # the head's matching prompts first, in shuffled order


def test_train_categories_change_collect_not_baseline():
    stages = registry()
    keys = {}
    for categories in ("null", "[short_request]", "[short_request,code]"):
        cfg = compose_config([f"prompts.harmless.train_categories={categories}"])
        keys[categories] = {name: hashed_slice(config_slice(cfg, stages[name].config_keys), stages[name].unkeyed)
                            for name in ("collect", "baseline")}
    assert keys["null"]["baseline"] == keys["[short_request]"]["baseline"] == keys["[short_request,code]"]["baseline"]
    assert len({str(entry["collect"]) for entry in keys.values()}) == 3


@pytest.mark.parametrize("override, message", [
    ("prompts.harmless.train_categories=[shrt_request]",
     "prompts.harmless.train_categories: ['shrt_request'] not among the set's categories"),
    ("prompts.harmless.train_categories=[]", "prompts.harmless.train_categories: [] not among"),
    ("prompts.harmless.train_categories=[translation]",  # 50 translations, some of them held out
     "only 4"),
    ("prompts.harmful.train_categories=[short_request]", "prompts.harmful.train_categories needs a set with categories"),
])
def test_bad_train_categories_are_one_line_before_work(override, message, capsys, monkeypatch):
    status, err = run_cli([override, "prompts.n_train=48"], capsys, monkeypatch)
    assert message in one_line_error(status, err)
