"""YAML from users (plans, regen settings) read with limits, so a small hostile file cannot cost minutes or memory.

PyYAML's safe loader builds no objects, but it still expands aliases: a 1 KB "billion laughs" file
becomes gigabytes, and an error message that shows the value prints all of it. Files we read are
written by this project or by hand and never need aliases, so an alias is refused, as is a file
over MAX_BYTES or nested deeper than MAX_DEPTH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32


class _LimitedLoader(yaml.SafeLoader):
    """A safe loader that refuses aliases and deep nesting while it composes, before anything is expanded."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*name) are not allowed, line {self.peek_event().start_mark.line + 1}")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in `path`; a PipelineError of one line names the file, `what` it should be, and why not."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise PipelineError(f"{path} is not {what}: {size:,} bytes, more than {MAX_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PipelineError(f"cannot read {path}: {error.strerror}; check the path") from None
    except UnicodeDecodeError as error:
        raise PipelineError(f"{path} is not {what}: not UTF-8 (byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_LimitedLoader)
    except yaml.YAMLError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(f"{path} is not {what}: invalid YAML ({first_line[:200]})") from None
