"""The one exception type users see.

A `PipelineError` carries a single line that names the problem and the fix.
`python -m pipeline` prints it to stderr and exits with status 2, without a
traceback: a typo in an override should not produce a wall of stack frames.
"""

import errno

WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR})
"""An OSError with one of these, raised while writing where the user chose, means that place cannot be written."""


class PipelineError(Exception):
    """A problem with the user's input or environment, stated in one line."""
