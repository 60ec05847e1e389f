"""Pretraining: `train(cfg)` is the loop, `pretrain(...)` is the `deepsail pretrain` verb around it.

One optimizer step, top to bottom:
    grad_accum micro-batches: forward under autocast -> loss / grad_accum -> (scaled) backward
    unscale grads (fp16) -> clip to grad_clip (the pre-clip norm is logged) -> AdamW step
    MoE balancing-bias update (outside autograd) -> log / eval / checkpoint on their schedules

A run directory after training:
    run_config.json    resolved TrainConfig + ModelConfig + device/precision/torch version
    metrics.jsonl      one row per log/eval step; tensorboard/ holds the same scalars
    loss.png           train and val loss curves
    checkpoints/       step_XXXXXX/ (HF-format model + tokenizer + optimizer/RNG/loader state), latest
    summary.json       what `train` returns
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deepsail.errors import exit_on_user_error
from deepsail.train.allocator import keep_freed_memory
from deepsail.train.checkpoint import discard_newer, latest_checkpoint, load_checkpoint, save_checkpoint
from deepsail.train.config import TrainConfig
from deepsail.train.metrics import MetricsLogger, peak_flops
from deepsail.train.optim import build_optimizer, decay_progress, lr_at
from deepsail.train.precision import autocast, make_scaler, resolve_precision

# Fields that change where things go or how often we look, never the weights: a resume may change them freely.
BOOKKEEPING_FIELDS = {"data", "out", "tokenizer", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last"}


@dataclass
class TrainResult:
    """What a finished run reports (also written to `<out>/summary.json`)."""

    step: int
    tokens: int  # training tokens seen, over all resumes
    elapsed_s: float  # wall clock over all resumes (evals and checkpoints included)
    train_loss: float  # mean optimized loss (next-token + MTP + aux) over the last log window
    val_loss: float
    val_ppl: float
    val_bpb: float
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA device; use --device cpu or auto.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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
        nll_BT = torch.stack([F.cross_entropy(logits_BTV[b].float(), y_BT[b], ignore_index=-100, reduction="none")
                              for b in range(len(y_BT))])
        valid_BT = y_BT != -100
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


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler,
) -> dict[str, torch.Tensor]:
    """Accumulate into .grad the gradient of the mean loss over `micro_batches`; return the mean losses.

    Each micro-batch loss is a mean over its tokens, so dividing it by the number of micro-batches
    makes the summed gradient that of one batch that many times larger (tested). The returned
    losses stay on the device (no host sync): total `loss`, and its parts `lm_loss`, `mtp_loss`, `aux_loss`.
    """
    n = len(micro_batches)
    sums = {}
    for x_BT, y_BT in micro_batches:
        x_BT, y_BT = x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x_BT, labels=y_BT)
        scaler.scale(out.loss / n).backward()
        for k in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            if getattr(out, k) is not None:
                sums[k] = sums.get(k, 0) + getattr(out, k).detach() / n
    return sums


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float
) -> torch.Tensor:
    """Unscale, clip, step, zero the grads; return the global grad norm before clipping.

    fp16: if any gradient is inf/nan the scaler skips the step (weights and AdamW moments untouched)
    and halves the loss scale. Without fp16 the scaler calls are pass-throughs.
    """
    scaler.unscale_(optimizer)  # true-scale grads before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE writes byte b as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_byte_lengths(tokenizer: Any) -> torch.Tensor | None:
    """[vocab] int64: how many UTF-8 bytes each token id stands for (0 for special tokens).

    Exact for byte-level BPE (deepsail's tokenizers, and DeepSeek's, Qwen2's, Llama-3's): each
    token's string is its bytes written one character per byte. Returns None for other tokenizers
    (e.g. sentencepiece-style), for which bits per byte is then reported as nan.
    """
    decoder = _byte_decoder()
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for i in range(tokenizer.vocab_size):
        if tokenizer.decode([i], skip_special_tokens=True) == "":  # a special token (or an empty one)
            continue
        piece = tokenizer.id_to_token(i)
        if piece is None or any(c not in decoder for c in piece):
            return None
        lengths[i] = len(piece)
    return lengths


def load_tokenizer(data_dir: Path, manifest: dict[str, Any], path: str = "") -> Any:
    """The tokenizer the data was made with: `path` if given, else the data folder, else the folder the manifest names.

    The manifest's sha256 fingerprint must match, so a checkpoint can never ship the wrong tokenizer.
    """
    from deepsail.data.tokenizer import Tokenizer

    recorded = manifest["tokenizer"].get("path")
    candidates = [Path(path)] if path else [data_dir, *([Path(recorded), data_dir / recorded] if recorded else [])]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(folder)
            if tokenizer.sha256 != manifest["tokenizer"]["sha256"]:
                raise ValueError(f"the tokenizer in {folder} is not the one {data_dir} was tokenized with (sha256 "
                                 f"differs); pass the right one with --tokenizer DIR, or re-run `deepsail data prepare`.")
            return tokenizer
    raise ValueError(f"cannot find the tokenizer {data_dir} was made with (looked in {[str(c) for c in candidates]}); "
                     f"pass it with --tokenizer DIR.")


def _open_data(cfg: TrainConfig, device: torch.device):
    """(train loader, a function returning the fixed val batches, tokenizer)."""
    from deepsail.data.loader import PackedLoader, eval_batches, read_manifest

    if not cfg.data:
        raise ValueError("no training data: pass --data DIR, a folder made by `deepsail data prepare`.")
    manifest = read_manifest(cfg.data)
    tokenizer = load_tokenizer(Path(cfg.data), manifest, cfg.tokenizer)
    loader = PackedLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)

    def val_batches():  # the same batches, in the same order, at every evaluation
        return eval_batches(cfg.data, cfg.batch_size, cfg.seq_len, "val", max_batches=cfg.eval_batches, device=device)

    return loader, val_batches, tokenizer


def train(cfg: TrainConfig, *, resume: bool = False, model_config: Any = None, console: Console | None = None) -> TrainResult:
    """Train a model as `cfg` says; with `resume`, continue exactly from `<cfg.out>/checkpoints/latest`.

    `model_config` (a ModelConfig) overrides `cfg.model_preset` for a fresh run; a resumed run always
    takes the model from its checkpoint.
    """
    from deepsail.model import ModelConfig, Transformer, from_pretrained

    console = console or Console()
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on the per-step logits and gradients (see allocator.py)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"

    # --- where we start: a fresh model, or the latest checkpoint ---
    start_ckpt = latest_checkpoint(ckpt_root) if resume else None
    if resume and start_ckpt is None:
        raise ValueError(f"--resume: no checkpoint under {ckpt_root}; run without --resume to start training.")
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise ValueError(f"{out} already holds a run with checkpoints; pass --resume to continue it, "
                         f"or choose a new --out.")
    loader, val_batches, tokenizer = _open_data(cfg, device)
    token_bytes = token_byte_lengths(tokenizer)

    seed_everything(cfg.seed)  # before init: same seed, same initial weights
    if start_ckpt is not None:
        model = from_pretrained(start_ckpt)
        saved_cfg = json.loads((start_ckpt / "trainer_state.json").read_text())["train_config"]
        changed = {k: (v, getattr(cfg, k)) for k, v in saved_cfg.items()
                   if getattr(cfg, k) != v and k not in BOOKKEEPING_FIELDS}
        if changed:
            console.print(f"[yellow]resuming with changed settings (saved -> now): {changed}; the run is no longer "
                          f"bitwise identical to an uninterrupted one.[/]")
    else:
        mcfg = model_config or ModelConfig.preset(cfg.model_preset)
        if mcfg.vocab_size != tokenizer.vocab_size:
            # The embedding must cover every id the tokenizer emits; a preset's vocab is only a default.
            console.print(f"model vocab_size {mcfg.vocab_size} -> {tokenizer.vocab_size} to match the tokenizer in {cfg.data}")
            mcfg = dataclasses.replace(mcfg, vocab_size=tokenizer.vocab_size)
        model = Transformer(mcfg)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}; lower --seq-len.")
    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()

    optimizer = build_optimizer(model, cfg)
    scaler = make_scaler(device, precision)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if start_ckpt is not None:
        saved = load_checkpoint(start_ckpt, optimizer=optimizer, scaler=scaler, loader=loader)
        state = {k: saved[k] for k in state}
        console.print(f"resumed from {start_ckpt} (step {state['step']})")
    if ckpt_root.exists():  # debris of interrupted writes, and checkpoints `latest` never reached
        discard_newer(ckpt_root, state["step"] if start_ckpt else -1)

    # --- the resolved config, written before the first step so a crashed run still documents itself ---
    out.mkdir(parents=True, exist_ok=True)
    resolved = {
        "train": cfg.to_dict(),
        "model": model.config.to_dict(),
        "device": str(device),
        "precision": precision,
        "torch": torch.__version__,
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
    }
    (out / "run_config.json").write_text(json.dumps(resolved, indent=2) + "\n")

    step_model = torch.compile(model) if cfg.compile else model
    metrics = MetricsLogger(out, resume_step=state["step"] if start_ckpt else None)
    peak, peak_source = peak_flops(device, precision)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    console.print(
        f"model {model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active) | "
        f"{device} {precision} | {cfg.tokens_per_step:,} tokens/step | peak {peak / 1e12:.1f} TFLOP/s ({peak_source})"
    )

    def save() -> Path:  # the checkpoint of state["step"]
        return save_checkpoint(
            ckpt_root, model=model, optimizer=optimizer, scaler=scaler, loader=loader, tokenizer=tokenizer,
            trainer_state={**state, "train_config": cfg.to_dict()}, keep_last=cfg.keep_last,
        )

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(model, val_batches(), token_bytes, device, precision)
        metrics.log(step, "val", {k: result[k] for k in ("loss", "ppl", "bpb")})
        metrics.plot()
        console.print(f"step {step} | val loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | bpb {result['bpb']:.4f}")
        return result

    def done(step: int, elapsed_s: float) -> bool:
        return (cfg.steps is not None and step >= cfg.steps) or (
            cfg.max_minutes is not None and elapsed_s >= 60 * cfg.max_minutes
        )

    def clock() -> float:  # wall-clock seconds over all resumes
        return elapsed0 + time.perf_counter() - t_start

    # --- the loop ---
    loader_it = iter(loader)
    t_start, elapsed0, start_step = time.perf_counter(), state["elapsed_s"], state["step"]
    sums = {k: torch.zeros((), device=device) for k in ("loss", "lm_loss", "mtp_loss", "aux_loss")}
    window = {"steps": 0, "tokens": 0, "t0": time.perf_counter()}
    windows: list[tuple[int, float]] = []  # (tokens, seconds) per log window, for the run's tok/s
    step_s, reserve_s = 0.0, 0.0
    train_loss, grad_norm, lr = float("nan"), torch.zeros(()), 0.0
    last_eval, eval_step, saved_step = None, -1, state["step"] if start_ckpt else -1

    def log_window(step: int, load: dict[str, torch.Tensor]) -> str:
        nonlocal train_loss
        n, dt = window["steps"], time.perf_counter() - window["t0"]
        train_loss = (sums["loss"] / n).item()  # the one host sync per log window
        if not math.isfinite(train_loss):
            raise RuntimeError(f"loss is {train_loss} at step {step}; lower --lr or use --precision fp32. "
                               f"The last good checkpoint is {latest_checkpoint(ckpt_root)}.")
        tok_s = window["tokens"] / dt
        windows.append((window["tokens"], dt))
        row = {"loss": train_loss, "lm_loss": (sums["lm_loss"] / n).item()}
        if model.config.num_nextn_predict_layers:
            row["mtp_loss"] = (sums["mtp_loss"] / n).item()
        if model.config.is_moe and model.config.aux_loss_alpha:
            row["aux_loss"] = (sums["aux_loss"] / n).item()
        if load:
            # max / mean tokens per expert, averaged over MoE layers: 1.0 is perfectly balanced
            row["moe_max_load"] = float(np.mean([(l.max() / l.mean()).item() for l in load.values()]))
        row |= {"lr": lr, "grad_norm": grad_norm.item(), "tok_per_s": tok_s,
                "mfu": tok_s * flops_per_token / peak, "step_time_s": dt / n, "tokens": state["tokens"]}
        if precision == "fp16":
            row["loss_scale"] = scaler.get_scale()
        metrics.log(step, "train", row)
        for v in sums.values():
            v.zero_()
        window.update(steps=0, tokens=0, t0=time.perf_counter())
        parts = f" (next-token {row['lm_loss']:.4f})" if row["lm_loss"] != train_loss else ""
        return (f"step {step}{'/' + str(cfg.steps) if cfg.steps else ''} | loss {train_loss:.4f}{parts} | lr {lr:.2e} | "
                f"gnorm {row['grad_norm']:.2f} | {tok_s:,.0f} tok/s | MFU {row['mfu']:.1%}")

    bar = Progress(
        TextColumn("[bold blue]pretrain"), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
    )
    task = bar.add_task("pretrain", total=1.0, status="")
    with bar:
        # A time budget stops before a step that would overrun it, keeping back what the last eval + save took.
        while not done(state["step"], clock() + step_s + reserve_s):
            step, t_step = state["step"], time.perf_counter()
            lr = lr_at(step, decay_progress(step, clock(), cfg), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            losses = forward_backward(step_model, [next(loader_it) for _ in range(cfg.grad_accum)], device, precision, scaler)
            for k, v in losses.items():
                sums[k] += v
            grad_norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            with torch.no_grad():
                load = model.expert_load() if (step + 1) % cfg.log_every == 0 else {}
                model.update_balance_bias(cfg.bias_update_rate)

            state["step"] = step = step + 1
            state["tokens"] += cfg.tokens_per_step
            window["steps"] += 1
            window["tokens"] += cfg.tokens_per_step
            if step - start_step > 1:  # this process's first step (kernel JIT, allocator warm-up) is no estimate
                step_s = time.perf_counter() - t_step
            state["elapsed_s"] = clock()

            if step % cfg.log_every == 0:
                status = log_window(step, load)
                bar.console.print(status)
                bar.update(task, completed=run_progress(step, state["elapsed_s"], cfg), status=status)

            paused = time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0:
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
    if eval_step != step:
        last_eval = run_eval(step)
    if saved_step != step:
        save()
    plot_path = metrics.plot()
    metrics.close()

    # This process's throughput; the first window (allocator warm-up, compilation) is left out when there are more.
    measured = windows[1:] or windows
    tok_per_s = sum(t for t, _ in measured) / sum(s for _, s in measured) if measured else 0.0
    result = TrainResult(
        step=step, tokens=state["tokens"], elapsed_s=round(clock(), 2),
        train_loss=train_loss, val_loss=last_eval["loss"], val_ppl=last_eval["ppl"], val_bpb=last_eval["bpb"],
        tok_per_s=tok_per_s, step_time_s=cfg.tokens_per_step / tok_per_s if tok_per_s else 0.0,
        mfu=tok_per_s * flops_per_token / peak, peak_flops=peak, peak_flops_source=peak_source,
        device=str(device), precision=precision, out_dir=str(out), checkpoint=str(latest_checkpoint(ckpt_root)),
        metrics_path=str(metrics.path), plot_path=str(plot_path), tensorboard_dir=str(out / "tensorboard"),
    )
    (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    console.print(
        f"done: step {result.step} | val loss {result.val_loss:.4f} | bpb {result.val_bpb:.4f} | "
        f"{result.tok_per_s:,.0f} tok/s | MFU {result.mfu:.1%} | {result.checkpoint}"
    )
    return result


def run_progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Fraction of the whole run done (for the progress bar): by steps or by time, whichever is further."""
    fractions = []
    if cfg.steps is not None:
        fractions.append(step / cfg.steps)
    if cfg.max_minutes is not None:
        fractions.append(elapsed_s / (60 * cfg.max_minutes))
    return min(1.0, max(fractions))


# -----------------------------------------------------------------------------
# The CLI verb: `deepsail pretrain`. Its flags are TrainConfig's fields, with the same defaults.

D = TrainConfig  # field defaults below are read off the dataclass, so they are written once


def pretrain(
    data: Annotated[str, typer.Option(help="Tokenized data folder, made by `deepsail data prepare`.")] = D.data,
    out: Annotated[str, typer.Option(help="Run folder: run_config.json, metrics.jsonl, loss.png, tensorboard/, checkpoints/.")] = D.out,
    model_preset: Annotated[str, typer.Option(help="Model preset, e.g. deepseek-v3-debug, deepseek-v3-small.")] = D.model_preset,
    resume: Annotated[bool, typer.Option(help="Continue exactly from <out>/checkpoints/latest; flags you set override the saved config.")] = False,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: 1000, or none when --minutes is given).", show_default=False)] = None,
    minutes: Annotated[float | None, typer.Option(help="Wall-clock budget; with --steps too, whichever comes first ends the run.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = D.batch_size,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = D.seq_len,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = D.grad_accum,
    lr: Annotated[float, typer.Option(help="Peak learning rate (after warmup).")] = D.lr,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the end of the cosine decay.")] = D.min_lr,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = D.warmup_steps,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = D.weight_decay,
    beta1: Annotated[float, typer.Option(help="AdamW beta1.")] = D.beta1,
    beta2: Annotated[float, typer.Option(help="AdamW beta2.")] = D.beta2,
    eps: Annotated[float, typer.Option(help="AdamW epsilon.")] = D.eps,
    grad_clip: Annotated[float, typer.Option(help="Max global gradient norm; 0 disables clipping.")] = D.grad_clip,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling).")] = D.precision,
    activation_checkpointing: Annotated[bool, typer.Option(help="Recompute block activations in backward to save memory.")] = D.activation_checkpointing,
    compile: Annotated[bool, typer.Option(help="torch.compile the training forward/backward.")] = D.compile,
    bias_update_rate: Annotated[float, typer.Option(help="MoE aux-loss-free balancing bias step (gamma).")] = D.bias_update_rate,
    eval_every: Annotated[int, typer.Option(help="Steps between validation passes (0: only at the end).")] = D.eval_every,
    eval_batches: Annotated[int, typer.Option(help="Validation batches per pass.")] = D.eval_batches,
    log_every: Annotated[int, typer.Option(help="Steps between metric rows / status lines.")] = D.log_every,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = D.ckpt_every,
    keep_last: Annotated[int, typer.Option(help="Checkpoints kept on disk.")] = D.keep_last,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and every RNG.")] = D.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = D.device,
    tokenizer: Annotated[str, typer.Option(help="The data's tokenizer folder (default: the data folder, else the path its manifest records).", show_default=False)] = D.tokenizer,
) -> TrainResult:
    """Pretrain a model on tokenized data: AdamW + warmup/cosine, bf16/fp16 autocast, MoE balancing,
    evaluation (loss, perplexity, bits per byte), atomic checkpoints and exact --resume."""
    given = dict(locals())
    resume = given.pop("resume")
    given["max_minutes"] = given.pop("minutes")
    if not resume:
        if given["steps"] is None and given["max_minutes"] is None:
            given["steps"] = D.steps
        return train(TrainConfig(**given))
    # Resume: the saved config is the base; a flag counts as set when it differs from its default.
    ckpt = latest_checkpoint(Path(out) / "checkpoints")
    if ckpt is None:
        raise ValueError(f"--resume: no checkpoint under {Path(out) / 'checkpoints'}; run without --resume to start.")
    saved = TrainConfig.from_dict(json.loads((ckpt / "trainer_state.json").read_text())["train_config"])
    defaults = {name: p.default for name, p in inspect.signature(pretrain).parameters.items()}
    defaults["max_minutes"] = defaults.pop("minutes")
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    return train(dataclasses.replace(saved, **changed), resume=True)


pretrain_command = exit_on_user_error(pretrain)
