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

import csv
import hashlib
import io
import json
import os
import random
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path

from pipeline.errors import PipelineError
from pipeline.paths import package_file

PKG_PREFIX = "pkg:"
HF_PREFIX = "hf:"
DEFAULT_FIELD = "text"
DEFAULT_HF_SPLIT = "train"
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_FALLBACK_HINT = "use prompts=default (the shipped sets) or a local file"
MAX_SOURCE_BYTES = 256 * 2**20
"""A prompt file larger than this is not a prompt set (or is `/dev/zero`): refused before it is read."""
MAX_PROMPT_CHARS = 8000
"""Longer prompts are refused: a forward pass's memory grows with the square of the longest prompt in a batch,
and a 100k-character line would allocate gigabytes. Every shipped and public refusal set stays far below."""


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
        dataset, label = _hf_dataset(name, spec.get("subset"), spec.get("split") or DEFAULT_HF_SPLIT)
        texts = _clean(_hf_column(dataset, label, field), label)
        if not texts:
            raise PipelineError(f"dataset {label} column {field!r} holds no prompts; pick another column or dataset")
        texts = _deduplicate(texts)
        digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        return PromptSet(texts=texts, sha256=digest, source=source)
    label, data = _read_source_bytes(source)
    texts = _deduplicate(_clean(_column(label, data, field, bare=True), label))
    if not texts:
        raise PipelineError(f"prompt file {label} contains no prompts; add one prompt per line/row or pick another file")
    return PromptSet(texts=texts, sha256=hashlib.sha256(data).hexdigest(), source=label)


def split_prompts(
    prompt_set: PromptSet, seed: int, n_train: int, n_eval: int, n_val: int
) -> tuple[list[str], list[str], list[str]]:
    """Shuffle with a generator seeded by (content hash, seed); train is the head, then eval, then validation.

    A pure function of its inputs: editing the file or changing the seed gives a
    new split, rerunning gives the same one. Disjoint because the slices do not overlap.
    Validation comes last, so adding it (or resizing it) leaves train and eval as they were.
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
    return shuffled[:n_train], shuffled[n_train:n_train + n_eval], shuffled[n_train + n_eval:needed]


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
    harmful_train, harmful_eval, harmful_val = split_prompts(harmful, seed, *sizes)
    harmless_train, harmless_eval, harmless_val = split_prompts(harmless, seed, *sizes)
    return PromptSplits(
        harmful_train=harmful_train,
        harmful_eval=harmful_eval,
        harmful_val=harmful_val,
        harmless_train=harmless_train,
        harmless_eval=harmless_eval,
        harmless_val=harmless_val,
        hashes={"harmful": harmful.sha256, "harmless": harmless.sha256},
        categories={
            "harmful": _categories(prompts_cfg["harmful"], harmful),
            "harmless": _categories(prompts_cfg["harmless"], harmless),
        },
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


def _categories(spec: Mapping[str, Any], prompt_set: PromptSet) -> dict[str, str]:
    """Pair each row's prompt with its category; a duplicated prompt keeps its first row's, as the loader does."""
    category_field = spec["category_field"]
    if category_field is None:
        return {}
    field, source = spec.get("field") or DEFAULT_FIELD, spec["source"]
    if source.startswith(HF_PREFIX):
        dataset, label = _hf_dataset(source[len(HF_PREFIX):], spec.get("subset"), spec.get("split") or DEFAULT_HF_SPLIT)
        prompts, categories = _hf_column(dataset, label, field), _hf_column(dataset, label, category_field)
    else:
        label, data = _read_source_bytes(source)
        if Path(label).suffix.lower() == ".txt":
            return {}  # one prompt per line, no columns: category_field is ignored here, as field is
        prompts, categories = _column(label, data, field, bare=True), _column(label, data, category_field, bare=False)
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


def _read_source_bytes(source: str) -> tuple[str, bytes]:
    """Resolve a pkg: or path source and read it; returns (label for messages, bytes)."""
    if source.startswith(PKG_PREFIX):
        label, resource = source, package_file(source[len(PKG_PREFIX):])
    else:
        path = Path(source).expanduser()
        if not path.is_absolute():
            # Relative to where the command was started, not Hydra's run directory.
            path = Path(to_absolute_path(source)) if HydraConfig.initialized() else Path(os.getcwd()) / path
        label, resource = str(path), path
    extension = Path(label).suffix.lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise PipelineError(
            f"prompt file {label} has unsupported extension {extension or '(none)'!r}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    try:
        return label, _bounded_read(label, resource)
    except FileNotFoundError:
        raise PipelineError(f"prompt file {label} does not exist; fix the path in prompts.*.source or {_FALLBACK_HINT}") from None
    except PermissionError:
        raise PipelineError(f"prompt file {label} is not readable (permission denied); fix its permissions") from None
    except OSError as error:
        raise PipelineError(f"prompt file {label} could not be read ({error.strerror or error}); point source at a regular file") from None


def _bounded_read(label: str, resource: Any) -> bytes:
    """The bytes of a regular file of at most MAX_SOURCE_BYTES: a FIFO, a device or a huge file is refused unread."""
    if isinstance(resource, Path):
        status = resource.stat()
        if not stat.S_ISREG(status.st_mode):
            raise PipelineError(f"prompt file {label} is not a regular file; point prompts.*.source at a file")
        if status.st_size > MAX_SOURCE_BYTES:
            raise PipelineError(
                f"prompt file {label} has {status.st_size:,} bytes, more than {MAX_SOURCE_BYTES:,}; use a smaller prompt set"
            )
    return resource.read_bytes()


def _column(label: str, data: bytes, field: str, bare: bool) -> list[Any]:
    """The raw value of `field` in every row, dispatching on the extension (a .txt file: its lines, whatever the field).

    A bare JSON string row is a prompt and nothing else: it answers for any field when `bare` (the prompt
    column) and is an error otherwise (a category column).
    """
    extension = Path(label).suffix.lower()
    if extension == ".parquet":
        return _parquet_column(label, data, field)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PipelineError(f"prompt file {label} is not UTF-8 (byte {error.start}); re-save it as UTF-8") from None
    if extension == ".txt":
        return text.split("\n")
    if extension == ".jsonl":
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                rows.append(_json_value(label, line, f"line {number}"))
        return _rows_column(label, rows, field, bare)
    if extension == ".json":
        rows = _json_value(label, text, "document") if text.strip() else []
        if not isinstance(rows, list):
            raise PipelineError(f"prompt file {label} must hold a JSON list of strings or objects, not {type(rows).__name__}")
        return _rows_column(label, rows, field, bare)
    return _csv_column(label, text, field)


def _json_value(label: str, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PipelineError(f"prompt file {label}: invalid JSON at {where} ({error.msg}); fix the file") from None


def _rows_column(label: str, rows: list[Any], field: str, bare: bool) -> list[Any]:
    """Rows are bare strings (prompts only) or objects holding `field`."""
    values = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, str) and bare:
            values.append(row)
        elif isinstance(row, dict):
            if field not in row:
                raise _missing_field(label, field, list(row), f"row {number}")
            values.append(row[field])
        else:
            expected = "a string or an object" if bare else f"an object holding {field!r}"
            raise PipelineError(f"prompt file {label}: row {number} is {type(row).__name__}, expected {expected}")
    return values


def _csv_column(label: str, text: str, field: str) -> list[Any]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if not columns:
        return []
    if field not in columns:
        raise _missing_field(label, field, columns, "header")
    return [row[field] for row in reader]


def _parquet_column(label: str, data: bytes, field: str) -> list[Any]:
    import pyarrow as pa  # deferred: pyarrow is heavy and only parquet/hf sources need it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as error:
        raise PipelineError(f"prompt file {label} is not a readable parquet file ({_first_line(error)}); re-export it") from None
    if field not in table.column_names:
        raise _missing_field(label, field, table.column_names, "schema")
    return table.column(field).to_pylist()


def _hf_dataset(name: str, subset: str | None, split: str) -> tuple[Any, str]:
    """Load a Hugging Face dataset through `datasets`, which uses its local cache when offline; (dataset, label)."""
    import datasets  # deferred: importing datasets takes seconds and most runs use local files

    label = f"hf:{name}" + (f" (subset {subset})" if subset else "") + f" split {split}"
    try:
        dataset = datasets.load_dataset(name, subset, split=split) if subset else datasets.load_dataset(name, split=split)
    except OSError:
        # ConnectionError, DatasetNotFoundError and LocalEntryNotFoundError are all OSErrors.
        raise PipelineError(
            f"dataset {name} could not be reached offline or was not found in the local Hugging Face cache; "
            f"{_FALLBACK_HINT}"
        ) from None
    except ValueError as error:
        raise PipelineError(f"dataset {label} could not be loaded ({_first_line(error)}); fix prompts.*.subset/split") from None
    return dataset, label


def _hf_column(dataset: Any, label: str, field: str) -> list[Any]:
    if field not in dataset.column_names:
        raise _missing_field(label, field, dataset.column_names, "dataset")
    return list(dataset[field])


def _first_line(error: Exception) -> str:
    """PipelineError messages are one line; library errors sometimes are not."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def _missing_field(label: str, field: str, present: Sequence[str], where: str) -> PipelineError:
    return PipelineError(
        f"prompt source {label} has no column {field!r} ({where} has: {', '.join(map(str, present)) or 'nothing'}); "
        "set prompts.*.field or prompts.*.category_field to one of those"
    )


def _clean(values: Sequence[Any], label: str) -> list[str]:
    """Strip each prompt and skip blanks; anything that is not a string is an error, not a silent str()."""
    texts = []
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise PipelineError(f"prompt source {label}: entry {number} is {type(value).__name__}, expected text; fix the data")
        if len(value) > MAX_PROMPT_CHARS:
            raise PipelineError(
                f"prompt source {label}: entry {number} has {len(value):,} characters, more than {MAX_PROMPT_CHARS:,}; "
                "shorten or remove it"
            )
        if value.strip():
            texts.append(value.strip())
    return texts
