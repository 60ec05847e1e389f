"""Pretraining: next-token prediction (plus MTP and MoE aux terms) on packed token shards, `deepsail pretrain`.

    from deepsail.train import TrainConfig, pretrain
    result = pretrain(TrainConfig(data="data", out="runs/base", model_preset="deepseek-v3-mini", minutes=10))

A user of the one loop (`loop.py`): it opens the data and its tokenizer, builds (or, on resume, loads) the model,
and hands `train_loop` the packed batches, `next_token_loss` and `evaluate` (loss, perplexity, bits per byte: it is
`deepsail.eval.metrics.evaluate_lm`, the one definition every verb reports).

Under torchrun every process runs this same function: it joins the process group and builds the mesh the flags
name (`deepsail.parallel.init_parallel`), reads its data-parallel rank's slice of each global batch, and trains
the model `parallelize` shards (README: "Scale-out").

    torchrun --nproc_per_node 4 -m deepsail pretrain --data data --dp-shard 2 --tp 2 --out runs/big
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from deepsail.eval.metrics import evaluate_lm as evaluate  # validation: loss, perplexity, bits per byte
from deepsail.flags import Options, options
from deepsail.model import ModelConfig, Transformer, from_pretrained
from deepsail.model.hf import read_config
from deepsail.precision import resolve_device, resolve_precision
from deepsail.train.checkpoint import is_sharded, read_trainer_state, resumable_checkpoint
from deepsail.train.config import TrainConfig
from deepsail.train.loop import MESH_FIELDS, TrainResult, check_resumable, seed_everything, train_loop


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pretraining objective: the model's own loss (next-token + weighted MTP + aux), with its parts."""
    x_BT, y_BT = batch
    out = model(x_BT, labels=y_BT)
    parts = {"loss": out.loss, "lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}
    return {k: v for k, v in parts.items() if v is not None}


def memory_loss(memory: Any) -> Any:
    """next_token_loss with segment memory: each batch is the next segment of the same streams (SegmentLoader)."""

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x_BT, y_BT = batch
        out = memory.forward(model, x_BT, labels=y_BT)
        parts = {"loss": out.loss, "lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}
        return {k: v for k, v in parts.items() if v is not None}

    return loss_fn


def pretrain(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    model_config: ModelConfig | None = None,
    console: Console | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Pretrain as `cfg` says; with `resume`, continue exactly from `<cfg.out>/checkpoints/latest`.

    `model_config` overrides `cfg.model_preset` for a fresh run; a resumed run always takes the model from its
    checkpoint. `on_eval(step, val_metrics)` is called after each validation pass (`deepsail hpo` prunes there).
    """
    from deepsail.parallel.mesh import close_parallel, init_parallel

    cfg.validate()
    mesh = init_parallel(cfg, resolve_device(cfg.device))
    try:
        return _pretrain(cfg, resume, model_config, console, mesh, on_eval)
    finally:
        close_parallel(mesh)


def _pretrain(
    cfg: TrainConfig,
    resume: bool,
    model_config: ModelConfig | None,
    console: Console | None,
    mesh: Any,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    from deepsail.data.loader import PackedLoader, eval_batches
    from deepsail.data.tokenizer import data_tokenizer, token_byte_lengths

    console = (console or Console()) if mesh is None or mesh.is_main else Console(quiet=True)
    device = mesh.device if mesh is not None else resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    start = check_resumable(cfg, resume, console)
    if not cfg.data:
        raise ValueError("no training data: pass --data DIR, a folder made by `deepsail data prepare`.")
    tokenizer = data_tokenizer(cfg.data, cfg.tokenizer)
    rank, ranks = (mesh.dp_rank, mesh.shape.dp) if mesh is not None else (0, 1)
    loader = PackedLoader(
        cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=ranks, device=device
    )
    token_bytes = token_byte_lengths(tokenizer)

    seed_everything(cfg.seed)  # before init: same seed, same initial weights (on every rank, before sharding)
    if start is not None and is_sharded(start):
        model = Transformer(read_config(start))  # its weights come from the shards, once the mesh lays it out
    elif start is not None:
        model = from_pretrained(start)
    elif cfg.init:  # another model's weights, e.g. an upcycled one: step 0, a fresh optimizer
        from deepsail.train.checkpoint import resolve_checkpoint

        model = from_pretrained(resolve_checkpoint(cfg.init), dtype="fp32")
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"--init {cfg.init} has vocab_size {model.config.vocab_size} but the tokenizer of {cfg.data} has "
                f"{tokenizer.vocab_size}; start from a model trained with this data's tokenizer."
            )
    else:
        mcfg = (model_config or ModelConfig.preset(cfg.model_preset)).with_overrides(cfg.arch)
        if mcfg.vocab_size != tokenizer.vocab_size:
            # The embedding must cover every id the tokenizer emits; a preset's vocab is only a default.
            console.print(
                f"model vocab_size {mcfg.vocab_size} -> {tokenizer.vocab_size} to match the tokenizer in {cfg.data}"
            )
            mcfg = mcfg.replace(vocab_size=tokenizer.vocab_size)
        model = Transformer(mcfg)
    loss_fn = next_token_loss
    if model.config.segment_memory:  # Transformer-XL: documents in order, each segment attending to the last ones
        from deepsail.data.loader import SegmentLoader
        from deepsail.model.memory import SegmentMemory

        if mesh is not None:
            raise ValueError("segment_memory under torchrun is not supported yet; train it in one process.")
        loader = SegmentLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, device=device)
        loader.memory = SegmentMemory(model.config.segment_memory)
        loss_fn = memory_loss(loader.memory)
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
        # Global-batch-sized validation batches, read whole by every rank (a sharded model needs all ranks in each
        # forward): the same validation set at any world size.
        batches = eval_batches(
            cfg.data, cfg.batch_size * ranks, cfg.seq_len, "val", max_batches=cfg.eval_batches, device=device
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
        loss_fn,
        cfg,
        evaluate=validation,
        flops_per_token=model.flops_per_token(cfg.seq_len),
        tokenizer=tokenizer,
        resume_from=start,
        run_info=run_info,
        console=console,
        name="pretrain",
        mesh=mesh,
        on_eval=on_eval,
    )


def write_card(
    result: TrainResult,
    cfg: TrainConfig,
    *,
    title: str,
    how_made: str,
    data: Sequence[str] = (),
    metrics: dict[str, float] | None = None,
) -> Path:
    """The model card of a pretraining run, in the checkpoint `latest` names: the folder `deepsail generate RUN`,
    `ds.from_pretrained` and `deepsail export hf RUN` load (the run root is a training folder, not a model)."""
    from deepsail.card import write_model_card
    from deepsail.data.loader import read_manifest
    from deepsail.model.hf import read_config

    folder = Path(result.checkpoint)
    manifest = read_manifest(cfg.data)
    splits = manifest["splits"]
    shards = (
        f"{manifest['bytes'] / 1e6:.1f} MB of text in {cfg.data}: {splits['train']['tokens']:,} train tokens, "
        f"{splits['val']['tokens']:,} validation tokens; {result.tokens:,} tokens trained on"
    )
    return write_model_card(
        folder,
        config=read_config(folder),
        title=title,
        summary=f"Pretrained from scratch with deepsail: {result.step:,} steps in {result.elapsed_s / 60:.1f} minutes "
        f"({result.precision} on {result.device}).",
        data=[*data, shards],
        training=cfg.to_dict(),
        metrics={f"val_{k}": v for k, v in result.val.items()} | (metrics or {}),
        how_made=how_made,
    )


# -----------------------------------------------------------------------------
# The CLI verb: `deepsail pretrain`. Its flags are TrainConfig's knobs.


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _same_global_batch(cfg: TrainConfig, state: dict[str, Any], given: frozenset[str]) -> TrainConfig:
    """Resuming on another number of data-parallel ranks: keep the saved global batch (so the run reads the same
    windows in the same order) by rescaling the per-rank --batch-size, unless the user set one."""
    from deepsail.parallel.mesh import launched_world, mesh_shape

    saved_dp = (state.get("mesh") or {}).get("dp_replicate", 1) * (state.get("mesh") or {}).get("dp_shard", 1)
    saved_dp *= (state.get("mesh") or {}).get("ep", 1)
    dp = mesh_shape(launched_world(), cfg.dp_replicate, cfg.dp_shard, cfg.ep, cfg.tp).dp
    total = cfg.batch_size * saved_dp
    if dp == saved_dp or "batch_size" in given or total % dp:
        return cfg  # unchanged, the user's choice, or impossible (the loader then says what would fit)
    return cfg.replace(batch_size=total // dp)


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
      deepsail pretrain --data data --arch attn_gate=headwise --arch segment_memory=256 --out runs/opt
      deepsail pretrain --data data --init runs/upcycled --minutes 5 --out runs/moe   # from another model's weights
      torchrun --nproc_per_node 8 -m deepsail pretrain --data data --dp-shard 2 --tp 2 --ep 2 --out runs/big
    """
    from deepsail.card import invocation

    if not resume:
        if "minutes" in given and "steps" not in given:
            cfg = cfg.replace(steps=None)  # a time budget alone: no step limit
    else:
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
        # The mesh is this launch's (its flags or their defaults), never the saved run's.
        changed |= {k: getattr(cfg, k) for k in MESH_FIELDS}
        cfg = saved.replace(**changed)
        cfg = _same_global_batch(cfg, state, given)
    result = pretrain(cfg, resume=resume)
    if not _is_main():
        return result
    budget = " ".join(f"--{k} {v:g}" for k, v in (("steps", cfg.steps), ("minutes", cfg.minutes)) if v is not None)
    write_card(
        result,
        cfg,
        title=Path(cfg.out).name,
        how_made=invocation(
            f"deepsail pretrain --data {shlex.quote(cfg.data)} --model-preset {cfg.model_preset} {budget} "
            f"--out {shlex.quote(cfg.out)}"
        ),
    )
    return result
