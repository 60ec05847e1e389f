"""Pretraining: next-token prediction (plus MTP and MoE aux terms) on packed token shards, `deepsail pretrain`.

    from deepsail.train import TrainConfig, pretrain
    result = pretrain(TrainConfig(data="data", out="runs/base", model_preset="deepseek-v3-mini", minutes=10))

A user of the one loop (`loop.py`): it opens the data and its tokenizer, builds (or, on resume, loads) the model,
and hands `train_loop` the packed batches, `next_token_loss` and `evaluate` (loss, perplexity, bits per byte).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from rich.console import Console

from deepsail.flags import Options, options
from deepsail.model import IGNORE_INDEX, ModelConfig, Transformer, from_pretrained
from deepsail.precision import resolve_device, resolve_precision
from deepsail.train.amp import autocast
from deepsail.train.checkpoint import read_trainer_state, resumable_checkpoint
from deepsail.train.config import TrainConfig
from deepsail.train.loop import TrainResult, check_resumable, seed_everything, train_loop


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pretraining objective: the model's own loss (next-token + weighted MTP + aux), with its parts."""
    x_BT, y_BT = batch
    out = model(x_BT, labels=y_BT)
    parts = {"loss": out.loss, "lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}
    return {k: v for k, v in parts.items() if v is not None}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor | None,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Validation loss (nats/token), perplexity, and bits per byte.

    Bits per byte makes models with different tokenizers comparable: it is the total code length of
    the text under the model, in bits, divided by the text's size in UTF-8 bytes. Exactly:
        bpb = sum_t nll_t / ln 2  /  sum_t bytes(y_t)
    over every target token y_t with bytes(y_t) > 0, where `token_bytes[id]` is the length of the
    byte string token `id` stands for. With a byte-level BPE every token is a fixed byte string, so
    the byte counts of consecutive tokens add up to exactly the UTF-8 length of the text they spell
    (decoding single tokens with `.decode` would not: a token ending mid-character decodes to U+FFFD).
    Special tokens (document separators) are 0 bytes; their loss is left out of the numerator too,
    so bpb measures the text alone, as in nanochat. Loss and perplexity count every target token.
    `token_bytes` None (a tokenizer that is not byte-level) gives bpb = nan.
    """
    was_training = model.training
    model.eval()
    if token_bytes is None:
        token_bytes = torch.zeros(model.config.vocab_size, dtype=torch.int64)
    token_bytes = token_bytes.to(device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    nll_text = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x_BT, y_BT in batches:
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with autocast(device, precision):
            logits_BTV = model(x_BT).logits
        # Row by row, so the fp32 copy of the logits is T x V, not B x T x V (8 GB at B=8, T=2k, V=129k).
        nll_BT = torch.stack(
            [
                F.cross_entropy(logits_BTV[b].float(), y_BT[b], ignore_index=IGNORE_INDEX, reduction="none")
                for b in range(len(y_BT))
            ]
        )
        valid_BT = y_BT != IGNORE_INDEX
        bytes_BT = torch.where(valid_BT, token_bytes[y_BT.clamp(min=0)], 0)
        nll_sum += nll_BT[valid_BT].sum(dtype=torch.float64)
        nll_text += nll_BT[bytes_BT > 0].sum(dtype=torch.float64)
        n_tokens += valid_BT.sum()
        n_bytes += bytes_BT.sum()
    model.train(was_training)
    if n_tokens.item() == 0:
        raise ValueError("evaluation saw no tokens: the val split is empty; re-prepare the data with a val split.")
    loss = (nll_sum / n_tokens).item()
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": (nll_text / (math.log(2) * n_bytes)).item() if n_bytes.item() else float("nan"),
        "tokens": int(n_tokens.item()),
        "bytes": int(n_bytes.item()),
    }


def pretrain(
    cfg: TrainConfig, *, resume: bool = False, model_config: ModelConfig | None = None, console: Console | None = None
) -> TrainResult:
    """Pretrain as `cfg` says; with `resume`, continue exactly from `<cfg.out>/checkpoints/latest`.

    `model_config` overrides `cfg.model_preset` for a fresh run; a resumed run always takes the model from its
    checkpoint.
    """
    from deepsail.data.loader import PackedLoader, eval_batches
    from deepsail.data.tokenizer import data_tokenizer, token_byte_lengths

    console = console or Console()
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    start = check_resumable(cfg, resume, console)
    if not cfg.data:
        raise ValueError("no training data: pass --data DIR, a folder made by `deepsail data prepare`.")
    tokenizer = data_tokenizer(cfg.data, cfg.tokenizer)
    loader = PackedLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)
    token_bytes = token_byte_lengths(tokenizer)

    seed_everything(cfg.seed)  # before init: same seed, same initial weights
    if start is not None:
        model = from_pretrained(start)
    else:
        mcfg = model_config or ModelConfig.preset(cfg.model_preset)
        if mcfg.vocab_size != tokenizer.vocab_size:
            # The embedding must cover every id the tokenizer emits; a preset's vocab is only a default.
            console.print(
                f"model vocab_size {mcfg.vocab_size} -> {tokenizer.vocab_size} to match the tokenizer in {cfg.data}"
            )
            mcfg = mcfg.replace(vocab_size=tokenizer.vocab_size)
        model = Transformer(mcfg)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}; lower --seq-len."
        )
    console.print(
        f"model {model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active) "
        f"| {cfg.tokens_per_step:,} tokens/step"
    )

    def validation(m: torch.nn.Module) -> dict[str, float]:  # the same batches, in the same order, every time
        batches = eval_batches(
            cfg.data, cfg.batch_size, cfg.seq_len, "val", max_batches=cfg.eval_batches, device=device
        )
        result = evaluate(m, batches, token_bytes, device, precision)
        return {k: result[k] for k in ("loss", "ppl", "bpb")}

    run_info = {
        "model": model.config.to_dict(),
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
    }
    return train_loop(
        model,
        loader,
        next_token_loss,
        cfg,
        evaluate=validation,
        flops_per_token=model.flops_per_token(cfg.seq_len),
        tokenizer=tokenizer,
        resume_from=start,
        run_info=run_info,
        console=console,
        name="pretrain",
    )


# -----------------------------------------------------------------------------
# The CLI verb: `deepsail pretrain`. Its flags are TrainConfig's knobs.


@options(cfg=Options(TrainConfig))
def pretrain_command(
    cfg: TrainConfig,
    resume: Annotated[
        bool,
        typer.Option(help="Continue exactly from <out>/checkpoints/latest; flags you set override the saved config."),
    ] = False,
    given: frozenset[str] = frozenset(),
) -> TrainResult:
    """Pretrain a model on tokenized data: AdamW + warmup/cosine, bf16/fp16 autocast, MoE balancing,
    evaluation (loss, perplexity, bits per byte), atomic checkpoints and exact --resume.

    \b
    Examples:
      deepsail pretrain --data data --model-preset deepseek-v3-mini --minutes 10 --out runs/mini
      deepsail pretrain --data data --steps 2000 --batch-size 16 --grad-accum 4 --lr 1e-3 --out runs/a
      deepsail pretrain --out runs/mini --resume              # exact continuation after a crash or kill -9
      deepsail pretrain --out runs/mini --resume --steps 5000 # continue, with one setting changed
    """
    if not resume:
        if "minutes" in given and "steps" not in given:
            cfg = cfg.replace(steps=None)  # a time budget alone: no step limit
        return pretrain(cfg)
    # Resume: the saved config is the base; only the flags given on this command line change it.
    ckpt, _ = resumable_checkpoint(Path(cfg.out) / "checkpoints")
    if ckpt is None:
        return pretrain(cfg, resume=True)  # which explains why there is nothing to resume
    state = read_trainer_state(ckpt)
    if "train_config" not in state:
        raise ValueError(
            f"{ckpt / 'trainer_state.json'} records no train_config to resume with; it was not written "
            "by `deepsail pretrain`."
        )
    saved = TrainConfig.from_dict(state["train_config"])
    changed: dict[str, Any] = {k: getattr(cfg, k) for k in given if k in TrainConfig.__dataclass_fields__}
    return pretrain(saved.replace(**changed), resume=True)
