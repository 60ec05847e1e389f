"""`deepsail run`: the main job. Tokenizer -> data -> pretraining -> evaluation -> samples -> report, on the
embedded corpus (the Python standard library's own source and help text), in about ten minutes on two CPU cores.

The run folder is a normal training run (`checkpoints/`, `metrics.jsonl`, `loss.png`, `tensorboard/`), so
`deepsail generate RUN`, `deepsail serve RUN` and `deepsail pretrain --out RUN --resume` all work on it, plus:

    RUN/tokenizer/     the BPE tokenizer trained on the corpus's train split
    RUN/data/          the token shards (train/val split by file)
    RUN/dense/         with --compare-dense: the dense model of equal active parameters, trained as long
    RUN/report.md      what to open: config, metrics against a unigram baseline, loss curves, samples, speed

and a model card (README.md, `deepsail.card`) in the final checkpoint, the folder that loads as the model.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from deepsail.files import ensure_folder
from deepsail.flags import Options, options
from deepsail.train.config import TrainConfig

SAMPLE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(",
]


def unigram_bits_per_byte(data_dir: Path, tokenizer, batch_size: int, seq_len: int, max_batches: int) -> float:
    """Bits per byte of the best context-free model: train-split token frequencies (add-one smoothed), scored on
    exactly the validation windows the trainer evaluates, with the same per-token byte counts."""
    from deepsail.data.loader import TokenStream, eval_batches
    from deepsail.data.tokenizer import token_byte_lengths
    from deepsail.eval.metrics import bits_per_byte

    train = TokenStream(data_dir, "train")
    counts = np.bincount(train.read(0, train.n_tokens).astype(np.int64), minlength=tokenizer.vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    byte_lengths = token_byte_lengths(tokenizer).numpy()
    nats = nbytes = 0.0
    for _, y in eval_batches(data_dir, batch_size, seq_len, "val", max_batches=max_batches):
        y = y.numpy().ravel()
        nats -= log_p[y].sum()
        nbytes += byte_lengths[y].sum()
    return bits_per_byte(float(nats), int(nbytes))


@options(
    template=Options(
        TrainConfig,
        only=("out", "minutes", "model_preset", "batch_size", "seq_len", "lr", "precision", "device", "seed"),
        defaults=dict(out="runs/default", minutes=8.0, model_preset="deepseek-v3-mini", batch_size=16, lr=2e-3),
        fixed=dict(min_lr=0.0, steps=None),
    )
)  # min_lr is lr / 10, set below
def run(
    template: TrainConfig,
    compare_dense: Annotated[
        bool,
        typer.Option(
            help="Also train a dense model of equal active parameters for "
            "as long, and plot both curves (doubles the run time)."
        ),
    ] = False,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 4096,
    max_bytes: Annotated[
        int | None, typer.Option(help="Use only this many bytes of the corpus (quick runs).", show_default=False)
    ] = None,
) -> Path:
    """Train a DeepSeek-style model from scratch on the embedded corpus and write RUN/report.md.

    \b
    Examples:
      deepsail run                              # ~10 minutes on 2 CPU cores
      deepsail run --minutes 2 --out runs/quick
      deepsail run --compare-dense              # MoE vs dense of equal active parameters
    """
    from deepsail.card import invocation
    from deepsail.data.corpus import default_corpus
    from deepsail.data.prepare import prepare
    from deepsail.data.tokenizer import Tokenizer
    from deepsail.model import ModelConfig
    from deepsail.report import write_report
    from deepsail.train.pretrain import pretrain, write_card

    console = Console()
    run_dir, minutes, preset, batch_size, seq_len = (
        Path(template.out),
        template.minutes,
        template.model_preset,
        template.batch_size,
        template.seq_len,
    )
    if (run_dir / "checkpoints").exists():
        raise ValueError(f"{run_dir} already holds a run; choose a new --out or delete it")
    if minutes is None:
        raise ValueError("--minutes is the run's length; pass a positive number")
    model_config = ModelConfig.preset(preset)
    ensure_folder(run_dir)
    started = time.time()

    console.rule("[bold]1/5 tokenizer")
    t0 = time.time()
    texts = [doc.text for doc in default_corpus("train", max_bytes=max_bytes)]
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size)
    tokenizer.save(run_dir / "tokenizer")
    tokenizer_s = time.time() - t0
    console.print(f"{tokenizer.vocab_size} tokens from {sum(map(len, texts)) / 1e6:.1f} MB in {tokenizer_s:.1f}s")

    console.rule("[bold]2/5 data")
    manifest = prepare(None, run_dir / "tokenizer", run_dir / "data", max_bytes=max_bytes)

    console.rule(f"[bold]3/5 pretrain {preset} for {minutes:g} min")
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    # Cover the whole validation split at every evaluation (it is small), so the numbers are the split's.
    val_windows = manifest["splits"]["val"]["tokens"] // (seq_len + 1)
    eval_batches = max(1, -(-val_windows // batch_size))

    def train_config(out_dir: Path) -> TrainConfig:
        return template.replace(
            data=str(run_dir / "data"),
            out=str(out_dir),
            tokenizer=str(run_dir / "tokenizer"),
            steps=None,
            min_lr=template.lr / 10,
            warmup_steps=30,
            eval_every=100,
            eval_batches=eval_batches,
            log_every=10,
            ckpt_every=200,
            keep_last=2,
            bias_update_rate=1e-3,
        )

    configs = {"moe": train_config(run_dir)}
    results = {"moe": pretrain(configs["moe"], model_config=model_config, console=console)}
    if compare_dense:
        console.rule(f"[bold]3b/5 pretrain the dense twin for {minutes:g} min")
        # Equal active parameters: every MLP as wide as the experts a token activates (routed top-k + shared).
        active_width = model_config.moe_intermediate_size * (
            model_config.num_experts_per_tok + model_config.n_shared_experts
        )
        dense = model_config.replace(n_routed_experts=0, n_shared_experts=0, intermediate_size=active_width)
        configs["dense"] = train_config(run_dir / "dense")
        results["dense"] = pretrain(configs["dense"], model_config=dense, console=console)

    console.rule("[bold]4/5 evaluate")
    baseline = unigram_bits_per_byte(run_dir / "data", tokenizer, batch_size, seq_len, eval_batches)
    console.print(f"validation bits/byte: model {results['moe'].val_bpb:.3f}, unigram baseline {baseline:.3f}")

    console.rule("[bold]5/5 samples and report")
    samples = _samples(results["moe"].checkpoint, tokenizer, template.seed)
    report = write_report(
        run_dir,
        results,
        baseline,
        samples,
        model_config,
        manifest,
        timings={"tokenizer_s": tokenizer_s, "total_s": time.time() - started},
    )
    command = ["deepsail", "run", "--out", str(run_dir), "--minutes", f"{minutes:g}", "--model-preset", preset]
    command += ["--batch-size", str(batch_size), "--seq-len", str(seq_len), "--lr", f"{template.lr:g}"]
    command += ["--vocab-size", str(vocab_size), "--seed", str(template.seed)]
    command += (["--max-bytes", str(max_bytes)] if max_bytes else []) + (["--compare-dense"] if compare_dense else [])
    for name, result in results.items():  # in the final checkpoint: the folder `deepsail generate RUN` loads
        write_card(
            result,
            configs[name],
            title=f"{run_dir.name} ({name})" if name != "moe" else run_dir.name,
            how_made=invocation(shlex.join(command)),
            data=[
                "The embedded corpus: the Python standard library's own source and its bundled help text "
                "(pydoc_data), split into train/validation by file."
            ],
            metrics={"unigram_baseline_bpb": baseline},
        )
    console.print(f"[bold green]done in {(time.time() - started) / 60:.1f} min[/] — open {report}")
    return report


def _samples(checkpoint: str, tokenizer, seed: int) -> list[tuple[str, str]]:
    from deepsail.infer.generate import generate
    from deepsail.model import from_pretrained

    model = from_pretrained(checkpoint)
    outs = generate(model, tokenizer, SAMPLE_PROMPTS, max_tokens=80, temperature=0.7, top_k=40, seed=seed)
    return [(p, g.text) for p, g in zip(SAMPLE_PROMPTS, outs)]
