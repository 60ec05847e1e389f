"""How failures reach a person: a ValueError is already explained, so the CLI prints it on one line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer


def cli_verb(fn: Callable[..., Any]) -> Callable[..., None]:
    """Wrap a verb for the CLI: ValueError -> `error: <message>` on stderr and exit code 1, no traceback."""

    @functools.wraps(fn)
    def verb(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None

    return verb
