"""How failures reach a person: every verb goes through `cli_verb`, so an expected failure is one line.

Expected failures are the ones a user can fix: bad input (ValueError, which deepsail raises with the explanation
already in it), a file or folder that is missing, unreadable, full or in the way (OSError), a device without the
memory for the job. Each becomes `error: <what, which file, what to do>` and exit code 1. Anything else is a bug
and keeps its traceback; `DEEPSAIL_DEBUG=1` shows the traceback of expected failures too.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from deepsail.files import DiskFull


def explain(e: BaseException) -> str | None:
    """One line for an expected failure; None for a bug (which deserves its traceback)."""
    import torch

    if isinstance(e, DiskFull):
        return str(e)
    if isinstance(e, ValueError):
        return str(e)
    if isinstance(e, torch.OutOfMemoryError):
        return (
            "out of memory on the device: lower --batch-size or --seq-len, use --activation-checkpointing, "
            f"or a smaller model ({str(e).splitlines()[0]})"
        )
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        where = f": {e.filename}" if e.filename else ""
        hint = {
            errno.ENOSPC: " (free some space and run again; a training run continues with --resume)",
            errno.EACCES: " (check the file's permissions, or choose another path)",
            errno.ENOENT: " (check the path)",
            errno.EEXIST: " (choose another path, or remove it)",
            errno.ENOTDIR: " (a file stands where a folder is needed: choose another path)",
            errno.EISDIR: " (a folder stands where a file is needed)",
        }.get(e.errno, "")
        return f"{what}{where}{hint}"
    return None


def cli_verb(fn: Callable[..., Any]) -> Callable[..., None]:
    """Wrap a verb for the CLI: an expected failure -> `error: <message>` on stderr and exit code 1, no traceback;
    Ctrl-C -> exit 130; a bug -> its traceback."""

    @functools.wraps(fn)
    def verb(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            message = explain(e)
            if message is None or os.environ.get("DEEPSAIL_DEBUG"):
                raise
            typer.echo(f"error: {message}", err=True)
            sys.stderr.flush()
            raise typer.Exit(1) from None

    return verb
