"""The `deepsail` command line: one verb per stage of a model's life."""

import typer

app = typer.Typer(
    name="deepsail",
    help="Build, train, adapt, compress and serve DeepSeek-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# --- verbs are registered below, one line each (keep this block sorted by pipeline order) ---
