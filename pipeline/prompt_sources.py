"""Reading prompt sources: shipped files (`pkg:`), local files and Hugging Face datasets, bounded and typed.

Every source is untrusted input: a file is read only if it is a regular file of bounded size, rows are
parsed without executing anything (JSON, CSV, parquet columns, never pickles), and a prompt must be text
of bounded length. `pipeline.prompt_sets` turns what this returns into hashed, split prompt sets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path

from pipeline.errors import PipelineError
from pipeline.paths import package_file

PKG_PREFIX = "pkg:"
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_FALLBACK_HINT = "use prompts=default (the shipped sets) or a local file"
MAX_SOURCE_BYTES = 256 * 2**20
"""A prompt file larger than this is not a prompt set (or is `/dev/zero`): refused before it is read."""
MAX_PROMPT_CHARS = 8000
"""Longer prompts are refused: a forward pass's memory grows with the square of the longest prompt in a batch,
and a 100k-character line would allocate gigabytes. Every shipped and public refusal set stays far below."""


def read_source_bytes(source: str) -> tuple[str, bytes]:
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


def column(label: str, data: bytes, field: str, bare: bool) -> list[Any]:
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


def hf_dataset(name: str, subset: str | None, split: str) -> tuple[Any, str]:
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


def hf_column(dataset: Any, label: str, field: str) -> list[Any]:
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


def clean(values: Sequence[Any], label: str) -> list[str]:
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
