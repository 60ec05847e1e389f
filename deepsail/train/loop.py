"""The one training loop. Every training verb (pretrain today; fine-tuning, SFT, DPO, GRPO, distillation and
contrastive training as they land) builds a model, a resumable batch iterator and a loss function, and hands them
to `train_loop`; none of them writes a second loop.

One optimizer step, top to bottom:
    grad_accum micro-batches: loss_fn under autocast -> loss / grad_accum -> (scaled) backward
    unscale grads (fp16) -> clip to grad_clip (the pre-clip norm is logged) -> AdamW step at the scheduled lr
    MoE balancing-bias update (outside autograd) -> log / eval / checkpoint on their cadences

What the loop owns: precision and loss scaling, the warmup + cosine schedule, the step and time budgets,
activation checkpointing and compilation (through `deepsail.parallel.parallelize`), metrics, the progress bar,
atomic checkpoints and exact resume. What the caller owns: the model, the data and what "loss" means.

A run directory after training:
    run_config.json    resolved TrainConfig + device/precision/torch version + whatever the caller adds
    metrics.jsonl      one row per log/eval step; tensorboard/ holds the same scalars
    loss.png           train and val loss curves
    checkpoints/       step_XXXXXX/ (HF-format model + tokenizer + optimizer/RNG/loader state), latest
    summary.json       what `train_loop` returns
"""

from __future__ import annotations

import dataclasses
import errno
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
from deepsail.precision import resolve_device, resolve_precision
from deepsail.train.allocator import keep_freed_memory
from deepsail.train.amp import autocast, make_scaler
from deepsail.train.checkpoint import (
    discard_newer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    pointed_to,
    resumable_checkpoint,
    save_checkpoint,
)
from deepsail.train.config import TrainConfig
from deepsail.train.metrics import MetricsLogger, peak_flops
from deepsail.train.optim import build_optimizer, decay_progress, lr_at

# loss_fn(model, micro_batch) -> {"loss": the tensor to minimise, its parts...}, each a mean over the micro-batch
LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]

# Fields that change where things go or how often we look, never the weights: a resume may change them freely.
BOOKKEEPING_FIELDS = {"data", "out", "tokenizer", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last"}


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
) -> dict[str, torch.Tensor]:
    """Accumulate into .grad the gradient of the mean loss over `micro_batches`; return the mean losses.

    Each micro-batch loss is a mean over its tokens, so dividing it by the number of micro-batches
    makes the summed gradient that of one batch that many times larger (tested). The returned
    losses stay on the device (no host sync): `loss` and whatever parts `loss_fn` reports.
    """
    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        with autocast(device, precision):
            losses = loss_fn(model, batch)
        scaler.scale(losses["loss"] / n).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.detach() / n
    return sums


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float
) -> torch.Tensor:
    """Unscale, clip, step, zero the grads; return the global grad norm before clipping.

    fp16: if any gradient is inf/nan the scaler skips the step (weights and AdamW moments untouched)
    and halves the loss scale. Without fp16 the scaler calls are pass-throughs.
    """
    scaler.unscale_(optimizer)  # true-scale grads before clipping
    params = [p for p in model.parameters() if p.requires_grad]
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
) -> TrainResult:
    """`evaluate(model)` -> val metrics; `tokens_per_batch(micro_batch)` -> tokens for tok/s and MFU; `tokenizer`
    is saved into every checkpoint; `run_info` joins run_config.json; `name` labels the progress bar;
    `save_model(model, folder)` writes a checkpoint's weights (default: `model.save_pretrained`)."""
    console = console or Console()
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on the per-step logits and gradients (see allocator.py)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"

    model.to(device)
    step_model = parallelize(model, cfg)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scaler = make_scaler(device, precision)
    peak, peak_source = peak_flops(device, precision)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, optimizer=optimizer, scaler=scaler, loader=batches)
        state = {k: saved[k] for k in state}
        before = TrainConfig.from_dict(saved["train_config"]).to_dict() if "train_config" in saved else {}
        changed = {
            k: (v, getattr(cfg, k)) for k, v in before.items() if getattr(cfg, k) != v and k not in BOOKKEEPING_FIELDS
        }
        if changed:
            console.print(
                f"[yellow]resuming with changed settings (saved -> now): {changed}; the run is no longer "
                f"bitwise identical to an uninterrupted one.[/]"
            )
        console.print(f"resumed from {resume_from} (step {state['step']})")
    if ckpt_root.exists():  # debris of interrupted writes, and checkpoints `latest` never reached
        discard_newer(ckpt_root, state["step"] if resume_from else -1)

    # --- the resolved config, written before the first step so a crashed run still documents itself ---
    atomic_write_json(
        out / "run_config.json",
        {
            "train": cfg.to_dict(),
            **(run_info or {}),
            "device": str(device),
            "precision": precision,
            "torch": torch.__version__,
        },
    )
    metrics = MetricsLogger(out, resume_step=state["step"] if resume_from else None)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(
        f"{name}: {params / 1e6:.2f}M trainable params | {device} {precision} | "
        f"peak {peak / 1e12:.1f} TFLOP/s ({peak_source})"
    )

    def save() -> Path:  # the checkpoint of state["step"]
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
        return result

    def done(step: int, elapsed_s: float) -> bool:
        return (cfg.steps is not None and step >= cfg.steps) or (
            cfg.minutes is not None and elapsed_s >= 60 * cfg.minutes
        )

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
        train_loss = (sums["loss"] / n).item()  # the one host sync per log window
        if not math.isfinite(train_loss):
            raise RuntimeError(
                f"loss is {train_loss} at step {step}; lower --lr or use --precision fp32. "
                f"The last good checkpoint is {latest_checkpoint(ckpt_root)}."
            )
        tok_s = window["tokens"] / dt
        windows.append((window["tokens"], dt))
        row = {k: (v / n).item() for k, v in sums.items()}
        if load:
            # max / mean tokens per expert, averaged over MoE layers: 1.0 is perfectly balanced
            row["moe_max_load"] = float(np.mean([(l.max() / l.mean()).item() for l in load.values()]))
        row |= {
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tok_per_s": tok_s,
            "mfu": tok_s * flops_per_token / peak,
            "step_time_s": dt / n,
            "tokens": state["tokens"],
        }
        if precision == "fp16":
            row["loss_scale"] = scaler.get_scale()
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

            micro = [next(loader_it) for _ in range(cfg.grad_accum)]
            for k, v in forward_backward(step_model, micro, loss_fn, device, precision, scaler).items():
                sums[k] = sums[k] + v if k in sums else v
            grad_norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            with torch.no_grad():
                load = expert_load() if expert_load and (step + 1) % cfg.log_every == 0 else {}
                if balance:
                    balance(cfg.bias_update_rate)

            tokens = sum(tokens_per_batch(b) for b in micro)
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

    # This process's throughput; the first window (allocator warm-up, compilation) is left out when there are more.
    measured = windows[1:] or windows
    tok_per_s = sum(t for t, _ in measured) / sum(s for _, s in measured) if measured else 0.0
    tokens_per_step = state["tokens"] / max(step, 1)
    result = TrainResult(
        step=step,
        tokens=state["tokens"],
        elapsed_s=round(clock(), 2),
        train_loss=train_loss,
        val=last_eval,
        tok_per_s=tok_per_s,
        step_time_s=tokens_per_step / tok_per_s if tok_per_s else 0.0,
        mfu=tok_per_s * flops_per_token / peak,
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
    atomic_write_json(out / "summary.json", result.to_dict())
    console.print(
        f"done: step {result.step} | "
        + "".join(f"val {k} {v:.4f} | " for k, v in last_eval.items())
        + f"{result.tok_per_s:,.0f} tok/s | MFU {result.mfu:.1%} | {result.checkpoint}"
    )
    return result
