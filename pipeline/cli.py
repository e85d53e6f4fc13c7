"""The command lines' shared error handling: Hydra's and the OS's errors a user can cause, as one line and status 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import check_overrides, schema_error_line
from pipeline.errors import WRITE_ERRNOS, PipelineError


def hydra_error_line(error: Exception) -> str:
    """Hydra's multi-line composition report as one line: what is wrong, and the choices or the fix."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such {group} preset; choose one of {', '.join(error.options)}"
    if (described := schema_error_line(error)) is not None:
        return described
    parts = [part.strip() for part in str(error).split("Config search path:")[0].splitlines() if part.strip()]
    line = parts[0] if parts else type(error).__name__
    for part in parts[1:]:
        line += (" " if line[-1] in ".:;" else "; ") + part
    if isinstance(error, OverrideParseException):
        return f"cannot parse override {error.override!r}: {line}"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        line = f"{line} ({str(cause).strip().splitlines()[0]})"
    return line


def run_entry_point(main: Callable[[], None]) -> None:
    """Run a `@hydra.main` function with every error a user can cause reported as one stderr line, status 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise its errors instead of printing a multi-line report; they are
    caught here. A user who sets HYDRA_FULL_ERROR=1 themselves gets Hydra's full traceback, as documented.
    """
    if any(arg in ("--cfg", "-c") for arg in sys.argv) and "--resolve" not in sys.argv:
        # Show effective values (model.kind, the mode thresholds for that kind), not interpolations.
        sys.argv.append("--resolve")
    previous = os.environ.get("HYDRA_FULL_ERROR")
    wants_traceback = previous == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        check_overrides(get_args_parser().parse_known_args(sys.argv[1:])[0].overrides)
        main()
    except PipelineError as error:  # a command line value of the wrong type, refused before Hydra converts it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as error:
        if wants_traceback:
            raise
        print(f"error: {hydra_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if wants_traceback or error.errno not in WRITE_ERRNOS:
            raise
        print(
            f"error: cannot write {error.filename}: {error.strerror}; choose writable hydra.run.dir and cache.dir",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are cached, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
