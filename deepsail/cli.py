"""The `deepsail` command line: one verb per stage of a model's life, in pipeline order.

Every verb raises ValueError for a user error; `exit_on_user_error` turns it into one line and exit code 1."""

import typer

from deepsail.data.prepare import data_prepare
from deepsail.data.tokenizer import tokenizer_train
from deepsail.errors import exit_on_user_error
from deepsail.infer.cli import chat_command, generate_command
from deepsail.run import run_command
from deepsail.serve.cli import serve_command
from deepsail.train.trainer import pretrain_command

app = typer.Typer(
    name="deepsail",
    help="Build, train, adapt, compress and serve DeepSeek-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

app.command("run")(run_command)

tokenizer_app = typer.Typer(help="Train a byte-level BPE tokenizer (HF tokenizer.json + chat template).",
                            no_args_is_help=True)
tokenizer_app.command("train")(exit_on_user_error(tokenizer_train))
app.add_typer(tokenizer_app, name="tokenizer")

data_app = typer.Typer(help="Tokenize text into memory-mapped token shards.", no_args_is_help=True)
data_app.command("prepare")(exit_on_user_error(data_prepare))
app.add_typer(data_app, name="data")

app.command("pretrain")(pretrain_command)
app.command("generate")(exit_on_user_error(generate_command))
app.command("chat")(exit_on_user_error(chat_command))
app.command("serve")(serve_command)
