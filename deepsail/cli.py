"""The `deepsail` command line: one verb per stage of a model's life, in pipeline order."""

import typer

from deepsail.data.prepare import data_prepare
from deepsail.data.tokenizer import tokenizer_train
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
tokenizer_app.command("train")(tokenizer_train)
app.add_typer(tokenizer_app, name="tokenizer")

data_app = typer.Typer(help="Tokenize text into memory-mapped token shards.", no_args_is_help=True)
data_app.command("prepare")(data_prepare)
app.add_typer(data_app, name="data")

app.command("pretrain")(pretrain_command)
app.command("generate")(generate_command)
app.command("chat")(chat_command)
app.command("serve")(serve_command)
