"""Load the harmful/harmless prompt sets and split them into train, eval and validation.

The refusal direction is the difference of mean activations over two prompt
sets, and the evaluate stage judges the ablated model on prompts it never saw.
So this module has two jobs: turn a `prompts.<side>` spec (shipped file, local
file or Hugging Face dataset) into a hashed tuple of texts, and split it into
disjoint train/eval/validation lists that depend only on (content hash, seed,
sizes), so a cached `collect` artifact and a later `evaluate` run agree on the
split. A choice made by looking at scores (a plan search, a preset) is made on
the validation slice and reported on the eval slice, which it never saw.
Rows may carry a category (`category_field`), so results can be broken down by
the kind of prompt (code, translation, ...).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import PipelineError
from pipeline.prompt_sources import clean, column, hf_column, hf_dataset, read_source_bytes

HF_PREFIX = "hf:"
DEFAULT_FIELD = "text"
DEFAULT_HF_SPLIT = "train"


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one class, plus the hash that keys caches and splits."""

    texts: tuple[str, ...]
    sha256: str
    """sha256 of the file bytes; for a Hugging Face dataset, of the texts joined by newlines."""
    source: str
    """Where the texts came from, as shown in error messages (resolved path, pkg: or hf: spec)."""


@dataclass(frozen=True)
class PromptSplits:
    """Train prompts feed collect/measure; eval and validation prompts are held out (`eval.split` picks one)."""

    harmful_train: list[str]
    harmful_eval: list[str]
    harmful_val: list[str]
    harmless_train: list[str]
    harmless_eval: list[str]
    harmless_val: list[str]
    hashes: dict[str, str]
    """{"harmful": sha256, "harmless": sha256}: recorded in manifests and cache keys."""
    categories: dict[str, dict[str, str]]
    """{"harmful": {prompt: category}, "harmless": {...}}, each {} for a set whose spec has no category_field."""


def normalize_prompt(text: str) -> str:
    """Lowercase, turn every run of non-alphanumerics into one space, trim.

    Two prompts that differ only in case, punctuation or spacing count as the
    same prompt, both for deduplication and for the train/eval leak check.
    """
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def load_prompt_set(spec: Mapping[str, Any]) -> PromptSet:
    """Load one prompt set from a `prompts.<side>` spec.

    Keys: `source` (`pkg:<path in the pipeline package>`, `hf:<dataset>`, or an
    absolute or relative file path), `field` (column of jsonl/json/csv/parquet/hf
    rows; null means "text"; ignored for .txt and for JSON lists of strings),
    `split` (hf split, null means "train") and optional `subset` (hf config name); `prompt_categories`
    reads `category_field`.
    Repeated prompts (after `normalize_prompt`) are dropped, keeping the first,
    so a duplicated row can never land in both train and eval.
    """
    source = spec.get("source")
    if not isinstance(source, str) or not source.strip():
        raise PipelineError(f"prompt spec {dict(spec)!r} has no source; set source to a file path, pkg:... or hf:...")
    field = spec.get("field") or DEFAULT_FIELD
    if source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX):]
        dataset, label = hf_dataset(name, spec.get("subset"), spec.get("split") or DEFAULT_HF_SPLIT)
        texts = clean(hf_column(dataset, label, field), label)
        if not texts:
            raise PipelineError(f"dataset {label} column {field!r} holds no prompts; pick another column or dataset")
        texts = _deduplicate(texts)
        digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        return PromptSet(texts=texts, sha256=digest, source=source)
    label, data = read_source_bytes(source)
    texts = _deduplicate(clean(column(label, data, field, bare=True), label))
    if not texts:
        raise PipelineError(f"prompt file {label} contains no prompts; add one prompt per line/row or pick another file")
    return PromptSet(texts=texts, sha256=hashlib.sha256(data).hexdigest(), source=label)


def split_prompts(
    prompt_set: PromptSet, seed: int, n_train: int, n_eval: int, n_val: int,
    train_pool: Callable[[str], bool] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Shuffle with a generator seeded by (content hash, seed); train is the head, then eval, then validation.

    A pure function of its inputs: editing the file or changing the seed gives a
    new split, rerunning gives the same one. Disjoint because the slices do not overlap.
    Validation comes last, so adding it (or resizing it) leaves train and eval as they were.
    `train_pool` (a category filter) restricts train to the prompts it accepts, drawn in shuffled order from
    the head and then from after validation: eval and validation stay the slices they are without it.
    """
    if min(n_train, n_eval, n_val) < 1:
        raise PipelineError(
            f"n_train={n_train}, n_eval={n_eval} and n_val={n_val} for {prompt_set.source} must all be >= 1; "
            "set prompts.n_train, prompts.n_eval and prompts.n_val to positive numbers"
        )
    needed = n_train + n_eval + n_val
    if len(prompt_set.texts) < needed:
        raise PipelineError(
            f"{prompt_set.source} has {len(prompt_set.texts)} distinct prompts but n_train + n_eval + n_val = {needed}; "
            "lower prompts.n_train/prompts.n_eval/prompts.n_val or use a larger prompt set"
        )
    order = list(range(len(prompt_set.texts)))
    random.Random(f"{prompt_set.sha256}:{seed}").shuffle(order)
    shuffled = [prompt_set.texts[i] for i in order]
    held_out = shuffled[n_train:n_train + n_eval], shuffled[n_train + n_eval:needed]
    if train_pool is None:
        return shuffled[:n_train], *held_out
    train = [text for text in shuffled[:n_train] + shuffled[needed:] if train_pool(text)][:n_train]
    if len(train) < n_train:
        raise PipelineError(
            f"{prompt_set.source}: only {len(train)} prompts outside the held-out slices are in train_categories, "
            f"but n_train = {n_train}; lower prompts.n_train or allow more categories"
        )
    return train, *held_out


def prompt_splits(prompts_cfg: Mapping[str, Any]) -> PromptSplits:
    """Load and split both classes of the resolved `prompts` config group.

    The runner calls this while it computes cache keys, so a set too small for the three slices, or a
    category column that is missing, stops the run with one line before any stage works.
    """
    sizes = int(prompts_cfg["n_train"]), int(prompts_cfg["n_eval"]), int(prompts_cfg["n_val"])
    seed = int(prompts_cfg["seed"])
    harmful = load_prompt_set(prompts_cfg["harmful"])
    harmless = load_prompt_set(prompts_cfg["harmless"])
    check_classes_disjoint(harmful, harmless)
    categories = {"harmful": _categories(prompts_cfg["harmful"], harmful),
                  "harmless": _categories(prompts_cfg["harmless"], harmless)}
    harmful_train, harmful_eval, harmful_val = split_prompts(
        harmful, seed, *sizes, _train_pool("harmful", prompts_cfg["harmful"]["train_categories"], categories["harmful"]))
    harmless_train, harmless_eval, harmless_val = split_prompts(
        harmless, seed, *sizes, _train_pool("harmless", prompts_cfg["harmless"]["train_categories"], categories["harmless"]))
    return PromptSplits(
        harmful_train=harmful_train,
        harmful_eval=harmful_eval,
        harmful_val=harmful_val,
        harmless_train=harmless_train,
        harmless_eval=harmless_eval,
        harmless_val=harmless_val,
        hashes={"harmful": harmful.sha256, "harmless": harmless.sha256},
        categories=categories,
    )


def prompt_categories(spec: Mapping[str, Any]) -> dict[str, str]:
    """{prompt: category} for every prompt `load_prompt_set(spec)` returns, from the `category_field` column.

    {} when `category_field` is null (a set without categories). Evaluate breaks KL and over-refusal down
    by it: a plan can look harmless on short requests and still damage code or translation.
    """
    return _categories(spec, load_prompt_set(spec))


def shared_prompts(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """The prompts of `second` that also appear in `first`, compared after `normalize_prompt`."""
    seen = {normalize_prompt(text) for text in first}
    return [text for text in second if normalize_prompt(text) in seen]


def check_disjoint(train: Sequence[str], eval: Sequence[str], what: str) -> None:
    """Refuse to evaluate on prompts the direction was measured on."""
    leaked = shared_prompts(train, eval)
    if leaked:
        raise PipelineError(
            f"{what}: {len(leaked)} eval prompt(s) also appear in train, e.g. {leaked[0][:80]!r}; "
            "the cached artifacts disagree with the prompt sets: rerun with run.force=[collect,baseline]"
        )


def check_classes_disjoint(harmful: PromptSet, harmless: PromptSet) -> None:
    """Refuse a harmful and a harmless set that share a prompt: it would be both, and blur the direction."""
    shared = shared_prompts(harmful.texts, harmless.texts)
    if shared:
        raise PipelineError(
            f"{len(shared)} prompt(s) are in both the harmful set {harmful.source} and the harmless set "
            f"{harmless.source}, e.g. {shared[0][:80]!r}; remove them from one of the sets"
        )


def _train_pool(side: str, wanted: Sequence[str] | None, categories: Mapping[str, str]) -> Callable[[str], bool] | None:
    """The filter `prompts.<side>.train_categories` asks for. The default harmless set trains on its short requests:
    a direction measured against harmless prompts of the harmful set's own form does not also encode "long",
    "code" or "translation", and removing it damages those less (bench/RESULTS.md "frontier")."""
    if wanted is None:
        return None
    where = f"prompts.{side}.train_categories"
    if not categories:
        raise PipelineError(f"{where} needs a set with categories: set prompts.{side}.category_field, or {where}=null")
    known = sorted(set(categories.values()))
    unknown = [category for category in wanted if category not in known]
    if unknown or not wanted:
        raise PipelineError(f"{where}: {unknown or '[]'} not among the set's categories {', '.join(known)}")
    allowed = set(wanted)
    return lambda text: categories[text] in allowed


def _categories(spec: Mapping[str, Any], prompt_set: PromptSet) -> dict[str, str]:
    """Pair each row's prompt with its category; a duplicated prompt keeps its first row's, as the loader does."""
    category_field = spec["category_field"]
    if category_field is None:
        return {}
    field, source = spec.get("field") or DEFAULT_FIELD, spec["source"]
    if source.startswith(HF_PREFIX):
        dataset, label = hf_dataset(source[len(HF_PREFIX):], spec.get("subset"), spec.get("split") or DEFAULT_HF_SPLIT)
        prompts, categories = hf_column(dataset, label, field), hf_column(dataset, label, category_field)
    else:
        label, data = read_source_bytes(source)
        if Path(label).suffix.lower() == ".txt":
            return {}  # one prompt per line, no columns: category_field is ignored here, as field is
        prompts, categories = column(label, data, field, bare=True), column(label, data, category_field, bare=False)
    first: dict[str, str] = {}
    for number, (prompt, category) in enumerate(zip(prompts, categories), start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            continue  # the loader skips blank rows (and refused non-text ones already)
        if not isinstance(category, str) or not category.strip():
            raise PipelineError(
                f"prompt source {label}: row {number} has no {category_field!r} text; "
                "give every prompt a category or set prompts.*.category_field to null"
            )
        first.setdefault(normalize_prompt(prompt), category.strip())
    return {text: first[normalize_prompt(text)] for text in prompt_set.texts}


def _deduplicate(texts: Sequence[str]) -> tuple[str, ...]:
    """Keep the first occurrence of each normalized prompt."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        key = normalize_prompt(text)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return tuple(kept)
