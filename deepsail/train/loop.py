"""The one training loop. Every training verb (pretrain today; fine-tuning, SFT, DPO, GRPO, distillation and
contrastive training as they land) builds a model, a resumable batch iterator and a loss function, and hands them
to `train_loop`; none of them writes a second loop.

One optimizer step, top to bottom:
    grad_accum micro-batches: loss_fn under autocast -> loss / grad_accum -> (scaled) backward
    unscale grads (fp16) -> clip to grad_clip (the pre-clip norm is logged) -> AdamW step at the scheduled lr
    MoE balancing-bias update (outside autograd) -> log / eval / checkpoint on their cadences

What the loop owns: precision and loss scaling, the warmup + cosine schedule, the step and time budgets,
activation checkpointing, compilation and scale-out (through `deepsail.parallel.parallelize`), metrics, the
progress bar, atomic checkpoints and exact resume. What the caller owns: the model, the data and what "loss" means.

Under torchrun the caller passes the `mesh` (`deepsail.parallel.init_parallel`) and a loader reading its rank's
slice of each global batch. Every rank runs this same loop; rank 0 alone prints and writes metrics, all ranks
evaluate (the sharded model needs them all) and write their shards of each checkpoint (`save_sharded_checkpoint`).
Losses, load statistics and tok/s are reduced over the ranks, so the log reads as one run's.

A run directory after training:
    run_config.json    resolved TrainConfig + device/precision/torch version + whatever the caller adds
    metrics.jsonl      one row per log/eval step; tensorboard/ holds the same scalars
    loss.png           train and val loss curves
    checkpoints/       step_XXXXXX/ (HF-format model + tokenizer + optimizer/RNG/loader state), latest
    summary.json       what `train_loop` returns
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from deepsail.files import DiskFull, atomic_write_json
from deepsail.parallel import parallelize
from deepsail.parallel.mesh import ParallelMesh
from deepsail.precision import resolve_device, resolve_precision
from deepsail.train.allocator import keep_freed_memory
from deepsail.train.amp import autocast, make_scaler
from deepsail.train.checkpoint import (
    discard_newer,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    pointed_to,
    resumable_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from deepsail.train.config import TrainConfig
from deepsail.train.dropout import ResidualDropout
from deepsail.train.metrics import MetricsLogger, peak_flops
from deepsail.train.optim import build_optimizer, decay_progress, lr_at

# loss_fn(model, micro_batch) -> {"loss": the tensor to minimise, its parts...}, each a mean over the micro-batch
LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]

# Fields that change where things go or how often we look, never the weights: a resume may change them freely.
BOOKKEEPING_FIELDS = {"data", "out", "tokenizer", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last"}
# The mesh is the launch's, not the run's: a run may resume on another world size (the global batch kept).
MESH_FIELDS = {"dp_replicate", "dp_shard", "ep", "tp"}


@dataclass
class TrainResult:
    """What a finished run reports (also written to `<out>/summary.json`, with `val` flattened to val_<name>)."""

    step: int
    tokens: int  # training tokens seen, over all resumes
    elapsed_s: float  # wall clock over all resumes (evals and checkpoints included)
    train_loss: float  # mean optimized loss over the last log window
    val: dict[str, float]  # the last evaluation (e.g. loss, ppl, bpb); empty without one
    tok_per_s: float  # training throughput of this process, evals/checkpoints excluded
    step_time_s: float
    mfu: float
    peak_flops: float
    peak_flops_source: str
    device: str
    precision: str
    out_dir: str
    checkpoint: str
    metrics_path: str
    plot_path: str
    tensorboard_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        return self.val.get("loss", float("nan"))

    @property
    def val_ppl(self) -> float:
        return self.val.get("ppl", float("nan"))

    @property
    def val_bpb(self) -> float:
        return self.val.get("bpb", float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d | {f"val_{k}": v for k, v in d.pop("val").items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def forward_backward(
    model: nn.Module,
    micro_batches: list[Any],
    loss_fn: LossFn,
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler,
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """Accumulate into .grad the gradient of the mean loss over `micro_batches`; return the mean losses.

    Each micro-batch loss is a mean over its tokens, so dividing it by the number of micro-batches
    makes the summed gradient that of one batch that many times larger (tested). The returned
    losses stay on the device (no host sync): `loss` and whatever parts `loss_fn` reports. `loss_context` wraps
    each forward and backward (tensor parallelism's loss-parallel cross-entropy).
    """
    from torch.distributed.tensor import DTensor

    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        with loss_context():
            with autocast(device, precision):
                losses = loss_fn(model, batch)
            scaler.scale(losses["loss"] / n).backward()
        for k, v in losses.items():
            v = v.detach()
            sums[k] = sums.get(k, 0) + (v.to_local() if isinstance(v, DTensor) else v) / n  # replicated: whole
    return sums


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    sharded: bool = False,
) -> torch.Tensor:
    """Unscale, clip, step, zero the grads; return the global grad norm before clipping.

    fp16: if any gradient is inf/nan the scaler skips the step (weights and AdamW moments untouched)
    and halves the loss scale. Without fp16 the scaler calls are pass-throughs. `sharded`: the gradients are
    DTensors on several meshes, whose norm `parallel.clip_grad_norm` reduces mesh by mesh.
    """
    from deepsail.parallel.parallelize import clip_grad_norm

    scaler.unscale_(optimizer)  # true-scale grads before clipping
    params = [p for p in model.parameters() if p.requires_grad]
    if sharded:
        grad_norm = clip_grad_norm(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Fraction of the whole run done (for the progress bar): by steps or by time, whichever is further."""
    fractions = []
    if cfg.steps is not None:
        fractions.append(step / cfg.steps)
    if cfg.minutes is not None:
        fractions.append(elapsed_s / (60 * cfg.minutes))
    return min(1.0, max(fractions))


def check_resumable(cfg: TrainConfig, resume: bool, console: Console | None = None) -> Path | None:
    """The checkpoint a run continues from (None for a fresh run): the newest that verifies, saying which ones were
    passed over and why. Refuses to overwrite a run silently, or to write into a file."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a run folder; choose another --out.")
    ckpt_root = out / "checkpoints"
    found = pointed_to(ckpt_root) is not None or bool(list_checkpoints(ckpt_root))
    if not resume:
        if found:
            raise ValueError(
                f"{out} already holds a run with checkpoints; pass --resume to continue it, or choose a new --out."
            )
        return None
    if not found:
        raise ValueError(f"--resume: no checkpoint under {ckpt_root}; run without --resume to start training.")
    start, notes = resumable_checkpoint(ckpt_root)
    if start is None:
        raise ValueError(f"--resume: no checkpoint under {ckpt_root} is whole: " + "; ".join(notes))
    if notes:
        (console or Console(stderr=True)).print(
            f"[yellow]passing over damaged checkpoints ({'; '.join(notes)}): resuming from {start.name}; training "
            "replaces the damaged ones as it passes them again.[/]"
        )
    return start


class _NoMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics, plot and TensorBoard)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        pass

    def plot(self) -> Path:
        return self.path.with_name("loss.png")

    def close(self) -> None:
        pass


def train_loop(model: nn.Module, batches: Any, loss_fn: LossFn, cfg: TrainConfig, **kwargs: Any) -> TrainResult:
    """Train `model` on `batches` (an endless iterator with `state_dict`/`load_state_dict`, already on the device)
    until `cfg.steps` or `cfg.minutes` runs out; with `resume_from` (a checkpoint whose weights the caller has
    loaded into `model`), continue exactly where it left off. Keyword arguments: see `_train_loop`.

    A full disk, met by any writer of the run, ends it with one line naming the last good checkpoint."""
    try:
        return _train_loop(model, batches, loss_fn, cfg, **kwargs)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        latest = latest_checkpoint(Path(cfg.out) / "checkpoints")
        raise DiskFull(
            f"{e if isinstance(e, DiskFull) else f'no space left on the device ({e.filename or e})'}. The last good "
            f"checkpoint is {latest or 'none yet'}: free some space, then continue with --out {cfg.out} --resume."
        ) from e


def _train_loop(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    tokens_per_batch: Callable[[Any], int] = lambda batch: batch[0].numel(),
    flops_per_token: float = 0.0,
    tokenizer: Any = None,
    resume_from: Path | None = None,
    run_info: dict[str, Any] | None = None,
    console: Console | None = None,
    name: str = "train",
    save_model: Callable[[nn.Module, Path], None] | None = None,
    mesh: ParallelMesh | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """`evaluate(model)` -> val metrics; `tokens_per_batch(micro_batch)` -> tokens for tok/s and MFU; `tokenizer`
    is saved into every checkpoint; `run_info` joins run_config.json; `name` labels the progress bar;
    `save_model(model, folder)` writes a checkpoint's weights (default: `model.save_pretrained`); `mesh`: this
    process's place in a torchrun launch (None: one process); `on_eval(step, val_metrics)` runs after each
    validation pass (a hyperparameter search reports and prunes there)."""
    import torch.distributed as dist

    from deepsail.parallel.ep import reduce_expert_load
    from deepsail.parallel.tp import loss_parallel_context

    main = mesh is None or mesh.is_main
    console = (console or Console()) if main else Console(quiet=True)
    cfg.validate()
    device = mesh.device if mesh is not None else resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    world = mesh.shape.world if mesh is not None else 1
    dp = mesh.shape.dp if mesh is not None else 1  # ranks reading different micro-batches
    sharded = mesh is not None
    if sharded and save_model is not None:
        raise ValueError(
            f"{name} under torchrun: saving only part of the weights is not supported yet; run it in one process."
        )
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on the per-step logits and gradients (see allocator.py)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"

    model.to(device)
    step_model = parallelize(model, mesh, cfg)
    model.train()
    dropout = ResidualDropout(model, cfg.dropout, cfg.dropout_end) if cfg.dropout or cfg.dropout_end else None
    optimizer = build_optimizer(model, cfg)
    scaler = make_scaler(device, precision)
    peak, peak_source = peak_flops(device, precision)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        if is_sharded(resume_from):
            saved = load_sharded_checkpoint(
                resume_from, model=model, optimizer=optimizer, scaler=scaler, loader=batches
            )
        elif sharded:
            raise ValueError(
                f"{resume_from} was written by a one-process run; resume it in one process (without torchrun). "
                "A torchrun run resumes checkpoints written under torchrun, at any world size."
            )
        else:
            saved = load_checkpoint(resume_from, optimizer=optimizer, scaler=scaler, loader=batches)
        state = {k: saved[k] for k in state}
        before = TrainConfig.from_dict(saved["train_config"]).to_dict() if "train_config" in saved else {}
        ignored = BOOKKEEPING_FIELDS | MESH_FIELDS | {"batch_size"}  # batch_size: checked as the global batch
        changed = {k: (v, getattr(cfg, k)) for k, v in before.items() if getattr(cfg, k) != v and k not in ignored}
        if changed:
            console.print(
                f"[yellow]resuming with changed settings (saved -> now): {changed}; the run is no longer "
                f"bitwise identical to an uninterrupted one.[/]"
            )
        console.print(f"resumed from {resume_from} (step {state['step']})")
    if ckpt_root.exists() and main:  # debris of interrupted writes, and checkpoints `latest` never reached
        discard_newer(ckpt_root, state["step"] if resume_from else -1)

    # --- the resolved config, written before the first step so a crashed run still documents itself ---
    if main:
        atomic_write_json(
            out / "run_config.json",
            {
                "train": cfg.to_dict(),
                **(run_info or {}),
                "device": str(device),
                "precision": precision,
                "torch": torch.__version__,
                **({"mesh": dataclasses.asdict(mesh.shape)} if mesh is not None else {}),
            },
        )
    metrics = MetricsLogger(out, resume_step=state["step"] if resume_from else None) if main else _NoMetrics(out)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # global shapes (DTensor numel)
    console.print(
        f"{name}: {params / 1e6:.2f}M trainable params | {device} {precision} | "
        f"peak {peak / 1e12:.1f} TFLOP/s ({peak_source})"
        + (f" | {world} ranks: {mesh.shape.describe()}" if mesh is not None else "")
    )

    def save() -> Path:  # the checkpoint of state["step"]
        if sharded:
            return save_sharded_checkpoint(
                ckpt_root,
                model=model,
                optimizer=optimizer,
                scaler=scaler,
                loader=batches,
                tokenizer=tokenizer,
                trainer_state={**state, "train_config": cfg.to_dict(), "mesh": dataclasses.asdict(mesh.shape)},
                keep_last=cfg.keep_last,
            )
        return save_checkpoint(
            ckpt_root,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            loader=batches,
            tokenizer=tokenizer,
            trainer_state={**state, "train_config": cfg.to_dict()},
            keep_last=cfg.keep_last,
            save_model=save_model,
        )

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(model)
        metrics.log(step, "val", result)
        metrics.plot()
        console.print(f"step {step} | " + " | ".join(f"val {k} {v:.4f}" for k, v in result.items()))
        if on_eval is not None:
            on_eval(step, result)
        return result

    def done(step: int, elapsed_s: float) -> bool:
        stop = (cfg.steps is not None and step >= cfg.steps) or (
            cfg.minutes is not None and elapsed_s >= 60 * cfg.minutes
        )
        if sharded and cfg.minutes is not None:  # clocks differ: rank 0 decides for all, or they would deadlock
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        return stop

    def global_mean(values: list[torch.Tensor]) -> list[torch.Tensor]:
        if not sharded:
            return values
        flat = torch.stack([v.float() for v in values])
        dist.all_reduce(flat)
        return list(flat / world)

    loss_context = functools.partial(loss_parallel_context, sharded and mesh.shape.tp > 1)

    def clock() -> float:  # wall-clock seconds over all resumes
        return elapsed0 + time.perf_counter() - t_start

    # --- the loop ---
    balance = getattr(model, "update_balance_bias", None)
    expert_load = getattr(model, "expert_load", None)
    loader_it = iter(batches)
    t_start, elapsed0, start_step = time.perf_counter(), state["elapsed_s"], state["step"]
    sums: dict[str, torch.Tensor] = {}
    window = {"steps": 0, "tokens": 0, "t0": time.perf_counter()}
    windows: list[tuple[int, float]] = []  # (tokens, seconds) per log window, for the run's tok/s
    step_s, reserve_s = 0.0, 0.0
    train_loss, grad_norm, lr = float("nan"), torch.zeros(()), 0.0
    last_eval: dict[str, float] = {}
    eval_step, saved_step = -1, state["step"] if resume_from else -1

    def log_window(step: int, load: dict[str, torch.Tensor]) -> str:
        nonlocal train_loss
        n, dt = window["steps"], time.perf_counter() - window["t0"]
        means = dict(zip(sums, global_mean(list(sums.values()))))  # over the ranks: one collective
        train_loss = (means["loss"] / n).item()  # the one host sync per log window
        if not math.isfinite(train_loss):
            raise RuntimeError(
                f"loss is {train_loss} at step {step}; lower --lr or use --precision fp32. "
                f"The last good checkpoint is {latest_checkpoint(ckpt_root)}."
            )
        tok_s = window["tokens"] / dt
        windows.append((window["tokens"], dt))
        row = {k: (v / n).item() for k, v in means.items()}
        if load:
            # max / mean tokens per expert, averaged over MoE layers: 1.0 is perfectly balanced
            row["moe_max_load"] = float(np.mean([(l.max() / l.mean()).item() for l in load.values()]))
        row |= {
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tok_per_s": tok_s,
            "mfu": tok_s * flops_per_token / (peak * world),
            "step_time_s": dt / n,
            "tokens": state["tokens"],
        }
        if precision == "fp16":
            row["loss_scale"] = scaler.get_scale()
        if dropout is not None:
            row["dropout"] = dropout.p
        metrics.log(step, "train", row)
        for v in sums.values():
            v.zero_()
        window.update(steps=0, tokens=0, t0=time.perf_counter())
        lm = row.get("lm_loss", train_loss)
        parts = f" (next-token {lm:.4f})" if lm != train_loss else ""
        return (
            f"step {step}{'/' + str(cfg.steps) if cfg.steps else ''} | loss {train_loss:.4f}{parts} | lr {lr:.2e} | "
            f"gnorm {row['grad_norm']:.2f} | {tok_s:,.0f} tok/s | MFU {row['mfu']:.1%}"
        )

    bar = Progress(
        TextColumn(f"[bold blue]{name}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task(name, total=1.0, status="")
    with bar:
        # A time budget stops before a step that would overrun it, keeping back what the last eval + save took.
        while not done(state["step"], clock() + step_s + reserve_s):
            step, t_step = state["step"], time.perf_counter()
            lr = lr_at(step, decay_progress(step, clock(), cfg), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if dropout is not None:
                dropout.at(run_progress(step, clock(), cfg))

            micro = [next(loader_it) for _ in range(cfg.grad_accum)]
            for k, v in forward_backward(step_model, micro, loss_fn, device, precision, scaler, loss_context).items():
                sums[k] = sums[k] + v if k in sums else v
            grad_norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip, sharded=sharded)
            with torch.no_grad():
                if sharded and balance:
                    reduce_expert_load(model)  # every rank's routing, so all move their biases alike
                load = expert_load() if expert_load and (step + 1) % cfg.log_every == 0 else {}
                if balance:
                    balance(cfg.bias_update_rate)

            tokens = sum(tokens_per_batch(b) for b in micro) * dp  # the global batch: every dp rank's alike
            state["step"] = step = step + 1
            state["tokens"] += tokens
            window["steps"] += 1
            window["tokens"] += tokens
            if step - start_step > 1:  # this process's first step (kernel JIT, allocator warm-up) is no estimate
                step_s = time.perf_counter() - t_step
            state["elapsed_s"] = clock()

            if step % cfg.log_every == 0:
                status = log_window(step, load)
                bar.console.print(status)
                bar.update(task, completed=run_progress(step, state["elapsed_s"], cfg), status=status)

            paused = time.perf_counter()
            if evaluate and cfg.eval_every and step % cfg.eval_every == 0:
                last_eval, eval_step = run_eval(step), step
                reserve_s = time.perf_counter() - paused
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                t0 = time.perf_counter()
                save()
                saved_step, reserve_s = step, reserve_s + time.perf_counter() - t0
            window["t0"] += time.perf_counter() - paused  # evals and checkpoints don't count toward tok/s
            state["elapsed_s"] = clock()

    # --- the end: a last log row, eval and checkpoint for the final step (unless the loop just did them) ---
    step = state["step"]
    if window["steps"]:
        console.print(log_window(step, {}))
    if evaluate and eval_step != step:
        last_eval = run_eval(step)
    if saved_step != step:
        save()
    plot_path = metrics.plot()
    metrics.close()
    if sharded:
        dist.barrier()  # rank 0's last files are written before any rank reports the run done

    # This process's throughput; the first window (allocator warm-up, compilation) is left out when there are more.
    measured = windows[1:] or windows
    tok_per_s = sum(t for t, _ in measured) / sum(s for _, s in measured) if measured else 0.0
    tokens_per_step = state["tokens"] / max(step, 1)
    if dropout is not None:
        dropout.remove()  # the model leaves the loop as it came in
    result = TrainResult(
        step=step,
        tokens=state["tokens"],
        elapsed_s=round(clock(), 2),
        train_loss=train_loss,
        val=last_eval,
        tok_per_s=tok_per_s,
        step_time_s=tokens_per_step / tok_per_s if tok_per_s else 0.0,
        mfu=tok_per_s * flops_per_token / (peak * world),
        peak_flops=peak,
        peak_flops_source=peak_source,
        device=str(device),
        precision=precision,
        out_dir=str(out),
        checkpoint=str(latest_checkpoint(ckpt_root)),
        metrics_path=str(metrics.path),
        plot_path=str(plot_path),
        tensorboard_dir=str(out / "tensorboard"),
    )
    if main:
        atomic_write_json(out / "summary.json", result.to_dict())
    console.print(
        f"done: step {result.step} | "
        + "".join(f"val {k} {v:.4f} | " for k, v in last_eval.items())
        + f"{result.tok_per_s:,.0f} tok/s | MFU {result.mfu:.1%} | {result.checkpoint}"
    )
    return result
