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
from deepsail.data.prepare import data_prepare  # noqa: E402
from deepsail.data.tokenizer import tokenizer_train  # noqa: E402
tokenizer_app = typer.Typer(help="Train a byte-level BPE tokenizer (HF tokenizer.json + chat template).", no_args_is_help=True)
tokenizer_app.command("train")(tokenizer_train)
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(help="Tokenize text into memory-mapped token shards.", no_args_is_help=True)
data_app.command("prepare")(data_prepare)
app.add_typer(data_app, name="data")
from deepsail.train.trainer import pretrain_command  # noqa: E402
app.command("pretrain")(pretrain_command)
from deepsail.infer.cli import chat_command, generate_command  # noqa: E402
app.command("generate")(generate_command)
app.command("chat")(chat_command)
from deepsail.serve.cli import serve_command  # noqa: E402
app.command("serve")(serve_command)
from deepsail.run import run_command  # noqa: E402
app.command("run")(run_command)
