"""The `deepsail` command line: one verb per stage of a model's life, in pipeline order.

Every verb goes through `errors.cli_verb`: an expected failure (bad input, a damaged file, a missing device)
becomes one `error: ...` line and exit code 1; a bug keeps its traceback."""

import typer

from deepsail.compress.cli import quantize_command
from deepsail.data.prepare import data_prepare
from deepsail.data.tokenizer import tokenizer_train
from deepsail.errors import cli_verb
from deepsail.eval.cli import eval_command
from deepsail.export.cli import register as register_export
from deepsail.infer.cli import chat_command, generate_command
from deepsail.multimodal.cli import register as register_mm
from deepsail.parallel.plan import plan_command
from deepsail.run import run
from deepsail.serve.cli import serve_command
from deepsail.train.hpo import hpo_command
from deepsail.train.pretrain import pretrain_command
from deepsail.train.upcycle import upcycle_command
from deepsail.tune.distill import distill_command
from deepsail.tune.dpo import dpo_command
from deepsail.tune.finetune import finetune_command, sft_command
from deepsail.tune.grpo import grpo_command

app = typer.Typer(
    name="deepsail",
    help="Build, train, adapt, compress and serve DeepSeek-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _threads() -> None:
    # Intra-op threads start from the free cores (threads.py); a verb's own --threads still wins.
    from deepsail.threads import use_free_cores

    note = use_free_cores()
    if note:
        typer.echo(note, err=True)


app.command("run")(cli_verb(run))

tokenizer_app = typer.Typer(
    help="Train a byte-level BPE tokenizer (HF tokenizer.json + chat template).", no_args_is_help=True
)
tokenizer_app.command("train")(cli_verb(tokenizer_train))
app.add_typer(tokenizer_app, name="tokenizer")

data_app = typer.Typer(help="Tokenize text into memory-mapped token shards.", no_args_is_help=True)
data_app.command("prepare")(cli_verb(data_prepare))
app.add_typer(data_app, name="data")

app.command("pretrain")(cli_verb(pretrain_command))
app.command("hpo")(cli_verb(hpo_command))
app.command("plan")(cli_verb(plan_command))
app.command("finetune")(cli_verb(finetune_command))
app.command("sft")(cli_verb(sft_command))
app.command("dpo")(cli_verb(dpo_command))
app.command("grpo")(cli_verb(grpo_command))
app.command("distill")(cli_verb(distill_command))
app.command("upcycle")(cli_verb(upcycle_command))
app.command("quantize")(cli_verb(quantize_command))
app.command("generate")(cli_verb(generate_command))
app.command("chat")(cli_verb(chat_command))
app.command("serve")(cli_verb(serve_command))
app.command("eval")(cli_verb(eval_command))
register_export(app, cli_verb)
register_mm(app, cli_verb)
