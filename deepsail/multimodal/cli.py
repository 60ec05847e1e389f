"""`deepsail mm train|eval|caption`: the multimodal verbs (train.py, evaluate.py)."""

from __future__ import annotations

from collections.abc import Callable

import typer

from deepsail.multimodal.evaluate import mm_caption_command, mm_eval_command
from deepsail.multimodal.train import mm_train_command


def register(app: typer.Typer, cli_verb: Callable) -> None:
    mm = typer.Typer(
        help="Multimodal: a ViT aligned with text (retrieval), VQA, and image-conditioned generation.",
        no_args_is_help=True,
    )
    mm.command("train")(cli_verb(mm_train_command))
    mm.command("eval")(cli_verb(mm_eval_command))
    mm.command("caption")(cli_verb(mm_caption_command))
    app.add_typer(mm, name="mm")
