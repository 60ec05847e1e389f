"""Distillation: `deepsail distill`, a small student trained to match a big teacher.

    deepsail distill --teacher runs/default --student-preset llama-3-8b-debug --student-layers 4 --out runs/small
    deepsail distill --teacher runs/default --student runs/other/model --kd reverse --gamma 0 --out runs/rkd

Why: a teacher's next-token distribution says far more per token than the one correct id does (which wrong tokens
are nearly right), and its hidden states say how it got there. Measured (benchmarks/distill_bench.py, embedded
corpus, 2 shared CPU cores): a dense Llama-style student (1.12M params, 4 layers x 128) trained for 130 steps of
8x128 tokens from an 8.8M-parameter DeepSeek-V3-style MoE teacher (6 layers x 256, val 2.428 bits/byte) reaches
val bits/byte 2.506 with logit KD and 2.474 with KD + feature matching, against 2.565 for the same student trained
alone for the same steps (seed 1: 2.507 and 2.475 against 2.610): KD 2.3-3.9% lower, features another 1.2-1.3%.
Progressive feature matching lands between (2.496, 2.490), so it is an option, not the default. A distilled step
costs the teacher's forward too: ~2x the student's own step at these sizes (1.8-2.4x measured).

The objective, per token (the mean over tokens with a target):

    loss = alpha * T^2 * KD_T(teacher, student) + (1 - alpha) * CE(labels) + gamma * mean over matched layers of F

- KD_T compares the temperature-softened distributions softmax(z/T). `--kd forward` is KL(teacher || student)
  (Hinton et al.: mass-covering, the student spreads over what the teacher finds plausible), `--kd reverse` is
  KL(student || teacher) (MiniLLM: mode-seeking, the student commits to the teacher's main modes), `--kd mix` is
  `kd_mix` * forward + (1 - kd_mix) * reverse. T^2 keeps the gradient's size independent of T.
- The head, the KL and the cross-entropy run together in chunks of rows (`distill_head_loss`): each chunk's student
  and teacher logits exist only while its gradient is computed, in fp32, as `model/loss.py` does for the plain
  loss, so neither [N, V] logits tensor is ever whole (129k-token vocabularies at 16k tokens would be 8 GB each).
- F is intermediate feature matching: student layer s's output (the residual stream after block s), projected to
  the teacher's width by a trainable linear map, against teacher layer t's. `--feature-loss mse` compares the
  two after a layer norm without gain (the teacher's residual stream grows with depth and differs in scale from the
  student's; normalised, each element is a unit-variance quantity); `cosine` is 1 - cosine similarity per token.
- Which layers: `--layer-map 0:1,1:3` (student:teacher), by default uniform, student layer i <-> teacher layer
  floor((i + 1) * T / S + 0.5) - 1, so the last layers meet and the rest are spread evenly in between.
- `--progressive`: the run's steps are cut into K equal phases for K mapped pairs; phase k matches pairs 1..k from
  the bottom (the lower layers stay matched, so what they learnt is held while the next ones settle), logit KD on
  throughout. Phase of optimizer step s: floor(s * K / steps) + 1.

Teacher and student may differ in depth, width and architecture (a DeepSeek-V3 MoE with MLA into a dense GQA
student, say) but must share the tokenizer: the KL compares the two distributions id by id. A fresh student
(`--student-preset`) takes the teacher's vocabulary; an existing one (`--student`) must bring the same vocabulary,
or the run stops with one line saying where they differ.

What trains is `Distiller`: the student and the projections in one module, so the loop's optimizer, clipping,
checkpoints and exact resume cover both. The teacher is frozen in eval mode, held in the training precision, and
runs under no_grad; its intermediate states and the student's are read with forward hooks on the decoder blocks, so
the model code is untouched. Run folder (a loop run folder, `train/loop.py`) plus:

    RUN/data/          the tokenized data, unless --data names a `deepsail data prepare` folder
    RUN/checkpoints/   each a loadable student (HF folder) + projections.safetensors + the loop's state
    RUN/model/         the plain student: HF folder, tokenizer, model card; no projection weights
    RUN/report.md      settings, schedule, teacher and student validation, the loss curves and their parts
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from deepsail.files import atomic_dir, atomic_write_text
from deepsail.flags import Options, knob, options
from deepsail.model import IGNORE_INDEX, ModelConfig, Transformer
from deepsail.model.moe import MoE
from deepsail.precision import DTYPES, resolve_device, resolve_precision
from deepsail.train.config import TrainConfig
from deepsail.train.loop import TrainResult, check_resumable, seed_everything, train_loop

KD_KINDS = ("forward", "reverse", "mix")
FEATURE_LOSSES = ("mse", "cosine")
PROJECTIONS = "projections.safetensors"  # a checkpoint's projection weights, beside the student's HF files
# fp32 elements per [rows, V] buffer of the chunked KD: ~6 such buffers are alive per chunk (student and teacher
# logits, both log-softmaxes, the softmaxes, the gradient), so 2^22 keeps a chunk near 100 MB at any vocabulary.
KD_CHUNK_ELEMENTS = 1 << 22
# Settings that shape what is trained or saved: a resume must use the same ones (the rest may change).
STRUCTURAL = ("teacher", "student_preset", "student", "student_layers", "student_width", "gamma", "layer_map")


@dataclass
class DistillConfig:
    """What distillation adds to TrainConfig's knobs."""

    teacher: str = knob("", "The teacher: a run folder or a model folder (HF layout with tokenizer.json).")
    student_preset: str = knob(
        "", "A fresh student from this preset (e.g. llama-3-8b-debug), with the teacher's vocabulary; or --student."
    )
    student: str = knob(
        "", "An existing student (run or model folder) with the teacher's tokenizer; or --student-preset."
    )
    student_layers: int = knob(0, "Fresh student: decoder layers (0 = the preset's).")
    student_width: int = knob(
        0, "Fresh student: hidden size (0 = the preset's); heads, kv heads and MLP widths follow in proportion."
    )
    temperature: float = knob(1.0, "KD temperature T: both distributions are softmax(logits / T); the term is * T^2.")
    alpha: float = knob(0.9, "Weight of the KD term, in [0, 1]; the next-token cross-entropy gets 1 - alpha.")
    kd: str = knob("forward", "forward: KL(teacher||student); reverse: KL(student||teacher); mix: both (--kd-mix).")
    kd_mix: float = knob(0.5, "--kd mix: the forward KL's share, in [0, 1] (the reverse KL gets the rest).")
    gamma: float = knob(1.0, "Weight of intermediate feature matching; 0 = logit KD only (no projections).")
    feature_loss: str = knob("mse", "mse: on layer-normalised states; cosine: 1 - cosine similarity per token.")
    layer_map: str = knob(
        "", "student:teacher layer pairs, e.g. 0:1,1:3 (default: student i <-> teacher round((i+1)*T/S)-1)."
    )
    progressive: bool = knob(
        False, "Layer-wise: K equal phases for K mapped pairs; phase k matches pairs 1..k from the bottom."
    )
    text_field: str = knob("text", "JSONL field holding the text (--data as files).")
    val_fraction: float = knob(0.02, "Share of --data files' documents held out for validation (by text hash).")

    def __post_init__(self) -> None:
        if self.kd not in KD_KINDS:
            raise ValueError(f"--kd {self.kd!r}: choose one of {list(KD_KINDS)}.")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"--feature-loss {self.feature_loss!r}: choose one of {list(FEATURE_LOSSES)}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1] (the KD term's share), got {self.alpha}.")
        if not 0.0 <= self.kd_mix <= 1.0:
            raise ValueError(f"--kd-mix must be in [0, 1] (the forward KL's share), got {self.kd_mix}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be > 0, got {self.temperature} (1 = the plain distributions).")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"--gamma must be >= 0 (0 = no feature matching), got {self.gamma}.")
        if self.student_layers < 0 or self.student_width < 0:
            raise ValueError("--student-layers and --student-width must be >= 0 (0 = the preset's).")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}.")
        if self.progressive and self.gamma == 0:
            raise ValueError("--progressive schedules feature matching layer by layer; it needs --gamma > 0.")

    def check_student(self) -> None:
        """Exactly one student source; the width and depth overrides only for a fresh one."""
        if not self.teacher:
            raise ValueError("--teacher is required: a run folder (e.g. runs/default) or a model folder.")
        if bool(self.student_preset) == bool(self.student):
            raise ValueError(
                "name the student once: --student-preset P (a fresh model, e.g. llama-3-8b-debug) or --student S "
                "(an existing model folder)."
            )
        if self.student and (self.student_layers or self.student_width):
            raise ValueError("--student-layers/--student-width shape a fresh --student-preset; --student is built.")


@dataclass
class DistillResult:
    out_dir: str
    model_dir: str
    report: str
    pairs: list[tuple[int, int]]  # (student layer, teacher layer), bottom first; empty with --gamma 0
    val: dict[str, float]  # the student's last validation (loss, ppl, bpb)
    teacher_val: dict[str, float]  # the teacher's on the same windows
    train: dict[str, Any]  # TrainResult.to_dict()


# --- the student ---------------------------------------------------------------------------------------------------
def _multiple(x: float, of: int = 16) -> int:
    return max(of, of * round(x / of))


def student_config(preset: str, vocab_size: int, layers: int = 0, width: int = 0) -> ModelConfig:
    """A fresh student's config: `preset` with the teacher's vocabulary and, optionally, another depth or width.

    A new width keeps the preset's head size (GQA) and scales the head count, the kv heads (keeping the preset's
    query-per-kv group where it divides) and the MLP widths with it; MLA head sizes are their own numbers, so there
    only the head count follows. Distillation trains the main head only, so a fresh student has no MTP modules
    (they would stay random)."""
    c = ModelConfig.preset(preset).replace(vocab_size=vocab_size, num_nextn_predict_layers=0)
    if layers:
        c = c.replace(num_hidden_layers=layers)
    if width and width != c.hidden_size:
        r = width / c.hidden_size
        changes: dict[str, Any] = dict(
            hidden_size=width,
            intermediate_size=_multiple(c.intermediate_size * r),
            moe_intermediate_size=_multiple(c.moe_intermediate_size * r),
        )
        if c.attention_type == "gqa":
            if width % c.head_dim:
                raise ValueError(
                    f"--student-width {width}: {preset} has {c.head_dim}-wide heads; pick a multiple of {c.head_dim}."
                )
            heads = width // c.head_dim
            kv = max(1, heads // (c.num_attention_heads // c.num_key_value_heads))
            while heads % kv:
                kv -= 1
            changes |= dict(num_attention_heads=heads, num_key_value_heads=kv)
        else:
            changes |= dict(num_attention_heads=max(1, round(c.num_attention_heads * r)))
        c = c.replace(**changes)
    return c


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """None when two tokenizers give every id the same token (same fingerprint, or the same vocabulary); else
    where they first differ."""
    if a.sha256 == b.sha256:
        return None
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size:,} vs {b.vocab_size:,} tokens"
    for i in range(a.vocab_size):
        if a.id_to_token(i) != b.id_to_token(i):
            return f"id {i} is {a.id_to_token(i)!r} vs {b.id_to_token(i)!r}"
    return None


# --- layers --------------------------------------------------------------------------------------------------------
def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i <-> teacher layer floor((i + 1) * T / S + 0.5) - 1: the last layers meet, the rest spread
    evenly (12 teacher layers into 4: 0:2, 1:5, 2:8, 3:11)."""
    return [(i, math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1) for i in range(student_layers)]


def parse_layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`--layer-map` ("0:1,1:3") -> [(student, teacher), ...] bottom first, or the uniform map for "".

    Each student layer at most once, and the teacher layers rising with the student's: a crossed map would make
    "from the bottom up" (progressive) meaningless and is almost always a typo."""
    if not spec.strip():
        return uniform_layer_map(student_layers, teacher_layers)
    pairs: list[tuple[int, int]] = []
    for item in spec.split(","):
        s, sep, t = item.strip().partition(":")
        try:
            pair = (int(s), int(t))
        except ValueError:
            pair = None
        if not sep or pair is None:
            raise ValueError(
                f"--layer-map {spec!r}: {item.strip()!r} is not STUDENT:TEACHER (two layer indices, e.g. 0:1,1:3)."
            )
        if not (0 <= pair[0] < student_layers and 0 <= pair[1] < teacher_layers):
            raise ValueError(
                f"--layer-map {spec!r}: {pair[0]}:{pair[1]} is out of range; the student has layers "
                f"0..{student_layers - 1}, the teacher 0..{teacher_layers - 1}."
            )
        pairs.append(pair)
    pairs.sort()
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f"--layer-map {spec!r}: a student layer is mapped twice; give each one teacher layer.")
    if any(b[1] < a[1] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(
            f"--layer-map {spec!r}: the teacher layers must rise with the student's (a higher student layer "
            "matches a teacher layer at least as high)."
        )
    return pairs


def active_pairs(step: int, n_pairs: int, steps: int | None, progressive: bool) -> int:
    """How many mapped pairs (from the bottom) optimizer step `step` (0-based) matches: all of them, or, with
    progressive, phase floor(step * K / steps) + 1 of K equal phases."""
    if not progressive or not n_pairs:
        return n_pairs
    assert steps is not None, "progressive needs a step budget (checked in distill)"
    return min(n_pairs, step * n_pairs // steps + 1)


@contextlib.contextmanager
def capture_outputs(layers: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """{i: output of layers[i]} for the forward passes run inside the block: forward hooks, removed on exit, so the
    model code stays as it is and an activation-checkpointing recompute in backward finds no hook."""
    captured: dict[int, torch.Tensor] = {}

    def keeper(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            captured[i] = output

        return hook

    handles = [layers[i].register_forward_hook(keeper(i)) for i in sorted(set(indices))]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


# --- the losses ----------------------------------------------------------------------------------------------------
class _DistillHeadLoss(torch.autograd.Function):
    """alpha * T^2 * KD + (1 - alpha) * CE from the student's normed hidden states and head, chunk by chunk.

    Per chunk of rows: the student's logits z (fp32 from the autocast matmul), the teacher's (its own head, no
    grad), then the loss and at once its gradient w.r.t. z, which goes straight into grad_hidden and grad_weight;
    backward only scales what forward stored (the scheme of `model/loss.py`). With u = z/T, q = softmax(u) the
    student's and p the teacher's softened distributions:
        d KL(p||q) / du = q - p,        d KL(q||p) / du = q * (log q - log p - KL(q||p)),
        d CE / dz = softmax(z) - onehot(label),         d/dz = (d/du) / T.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, teacher_ND, labels_N, teacher_logits, spec):  # noqa: ANN001, ANN205
        temperature, alpha, forward_share = spec
        N, V = hidden_ND.shape[0], weight_VD.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype)
        device = hidden_ND.device
        compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight_VD.dtype
        valid = labels_N != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        grad_h = torch.empty(hidden_ND.shape, dtype=compute, device=device) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=device) if need_w else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        chunk = max(64, KD_CHUNK_ELEMENTS // V)
        w = weight_VD.to(compute)
        for s in range(0, N, chunk):
            with torch.no_grad():  # the teacher's head under the ambient autocast, as its forward ran
                log_p = teacher_logits(teacher_ND[s : s + chunk]).float().div_(temperature).log_softmax(-1)
            with torch.autocast(device.type, enabled=False):
                h_c = hidden_ND[s : s + chunk].to(compute)
                y_c, v_c = labels_N[s : s + chunk].clamp(min=0), valid[s : s + chunk]
                z = (h_c @ w.T).float()  # [c, V]
                lse = z.logsumexp(-1)
                ce_sum += ((lse - z.gather(1, y_c[:, None]).squeeze(1)) * v_c).sum()
                log_q = (z / temperature).log_softmax(-1)
                q = log_q.exp()
                g = torch.zeros_like(z)
                if forward_share > 0:  # KL(p || q) = sum p (log p - log q)
                    p = log_p.exp()
                    kd_sum += forward_share * ((p * (log_p - log_q)).sum(-1) * v_c).sum()
                    g += (q - p).mul_(forward_share)
                    del p
                if forward_share < 1:  # KL(q || p) = sum q (log q - log p)
                    d = log_q.sub_(log_p)  # log q is not needed after this
                    rkl = (q * d).sum(-1)
                    kd_sum += (1 - forward_share) * (rkl * v_c).sum()
                    g += d.sub_(rkl[:, None]).mul_(q).mul_(1 - forward_share)
                # alpha * T^2 * dKD/dz = alpha * T * dKD/du; then the cross-entropy's softmax - onehot
                g.mul_(alpha * temperature)
                if alpha < 1:
                    soft = z.sub_(lse[:, None]).exp_()
                    soft[torch.arange(len(y_c), device=device), y_c] -= 1.0
                    g += soft.mul_(1 - alpha)
                g = g.mul_((v_c / n_valid)[:, None]).to(compute)
                if need_h:
                    grad_h[s : s + chunk] = g @ w
                if need_w:
                    grad_w += (g.T @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w)
        kd, ce = kd_sum / n_valid, ce_sum / n_valid
        loss = alpha * temperature**2 * kd + (1 - alpha) * ce
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _kd, _ce):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (
            (grad_h * grad_loss).to(h_dtype) if grad_h is not None else None,
            (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


def distill_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_logits: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.9,
    kd: str = "forward",
    kd_mix: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KD, CE): loss = alpha * T^2 * KD + (1 - alpha) * CE, means over the tokens whose label is not
    IGNORE_INDEX. `hidden` [..., D] are the student's final-normed states and `weight` [V, D] its head (gradients
    flow to both); `teacher_logits(teacher_hidden rows)` gives the teacher's logits, a chunk of rows at a time.
    KD and CE come back detached, for logging."""
    if kd not in KD_KINDS:
        raise ValueError(f"kd {kd!r}: choose one of {list(KD_KINDS)}.")
    forward_share = {"forward": 1.0, "reverse": 0.0, "mix": kd_mix}[kd]
    return _DistillHeadLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        labels.reshape(-1),
        teacher_logits,
        (float(temperature), float(alpha), forward_share),
    )


def feature_loss(student_BTD: torch.Tensor, teacher_BTD: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """How far the (projected) student states are from the teacher's, in fp32: MSE after a layer norm without gain,
    or the mean of 1 - cosine similarity per token. 0 when they are equal."""
    s, t = student_BTD.float(), teacher_BTD.float()
    if kind == "mse":
        return F.mse_loss(F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:]))
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"feature loss {kind!r}: choose one of {list(FEATURE_LOSSES)}.")


class Distiller(nn.Module):
    """What trains: the student and one projection per mapped layer pair (student width -> teacher width).

    One module, so the loop's optimizer, clipping, checkpoints and resume cover the projections too. `layers` and
    `mtp` are the student's (activation checkpointing wraps its blocks); MoE balancing goes to the student."""

    def __init__(self, student: Transformer, teacher_width: int, pairs: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.student = student
        self.pairs = list(pairs)
        width = student.config.hidden_size
        self.projections = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in self.pairs)
        with torch.no_grad():
            for proj in self.projections:
                if width == teacher_width:  # start as the identity: equal states already match
                    proj.weight.copy_(torch.eye(width))
                else:  # an orthogonal map keeps the state's norm; normal init would scale it by sqrt(Dt/Ds)
                    nn.init.orthogonal_(proj.weight)

    @property
    def config(self) -> ModelConfig:
        return self.student.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.student.layers

    @property
    def mtp(self) -> nn.ModuleList:
        return self.student.mtp

    def update_balance_bias(self, rate: float) -> None:
        self.student.update_balance_bias(rate)

    def expert_load(self) -> dict[str, torch.Tensor]:
        return self.student.expert_load()

    def forward(self, input_ids: torch.Tensor, n_pairs: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the student's final-normed hidden states [B, T, D], the first `n_pairs` pairs' projected features)."""
        wanted = [s for s, _ in self.pairs[:n_pairs]]
        with capture_outputs(self.student.layers, wanted) as states:
            hidden = self.student(input_ids, last_logits_only=True, return_hidden=True).hidden
        features = [proj(states[s]) for proj, s in zip(self.projections, wanted)]
        return self.student.norm(hidden), features


class DistillLoss:
    """loss_fn for the one loop: the teacher's forward (frozen, no grad), the student's, and the three terms.

    It counts the micro-batches it has seen, which is what tells it the optimizer step for the progressive
    schedule; a resume sets the count from the checkpoint's step."""

    def __init__(self, teacher: Transformer, dcfg: DistillConfig, steps: int | None, grad_accum: int) -> None:
        self.teacher, self.dcfg, self.steps, self.grad_accum = teacher, dcfg, steps, grad_accum
        self.micro_steps = 0

    def active(self, model: Distiller, step: int) -> int:
        return active_pairs(step, len(model.pairs), self.steps, self.dcfg.progressive)

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x_BT, y_BT = batch
        distiller: Distiller = getattr(model, "_orig_mod", model)  # the eager module behind a compiled one
        n = self.active(distiller, self.micro_steps // self.grad_accum) if self.dcfg.gamma else 0
        self.micro_steps += 1
        teacher_layers = [t for _, t in distiller.pairs[:n]]
        with torch.no_grad(), capture_outputs(self.teacher.layers, teacher_layers) as teacher_states:
            teacher_hidden = self.teacher(x_BT, last_logits_only=True, return_hidden=True).hidden
        normed, features = model(x_BT, n)
        d = self.dcfg
        loss, kd, ce = distill_head_loss(
            normed,
            distiller.student.lm_head.weight,
            teacher_hidden,
            self.teacher.logits_of,
            y_BT,
            temperature=d.temperature,
            alpha=d.alpha,
            kd=d.kd,
            kd_mix=d.kd_mix,
        )
        out = {"kd": kd, "lm_loss": ce}
        if d.gamma:
            pairs = zip(features, distiller.pairs[:n])
            feat = torch.stack([feature_loss(f, teacher_states[t], d.feature_loss) for f, (_, t) in pairs]).mean()
            loss = loss + d.gamma * feat
            out["feature"] = feat.detach()
            out["feature_pairs"] = torch.tensor(float(n), device=feat.device)  # the progressive phase, in metrics
        aux = [m.aux_loss for m in distiller.student.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if aux and distiller.training:  # a MoE student's sequence-wise balance loss, as its own forward adds it
            out["aux_loss"] = torch.stack(aux).sum()
            loss = loss + out["aux_loss"]
        return {"loss": loss, **out}


# --- checkpoints ---------------------------------------------------------------------------------------------------
def save_distiller(model: nn.Module, folder: Path) -> None:
    """A checkpoint's weights: the student as an HF folder (it loads as the student) and the projections beside."""
    model.student.save_pretrained(folder)
    if len(model.projections):
        state = {k: v.detach().contiguous() for k, v in model.projections.state_dict().items()}
        save_file(state, str(folder / PROJECTIONS), metadata={"pairs": json.dumps(model.pairs)})


def load_projections(model: Distiller, checkpoint: Path) -> None:
    if not len(model.projections):
        return
    file = checkpoint / PROJECTIONS
    if not file.is_file():
        raise ValueError(f"{file} is missing: {checkpoint} is not a checkpoint of a distillation run with --gamma > 0.")
    model.projections.load_state_dict(load_file(str(file)))


def check_same_distill(checkpoint: Path, dcfg: DistillConfig) -> None:
    """A resume rebuilds the same student and projections: refuse other structural settings."""
    try:
        saved = json.loads((checkpoint.parent.parent / "run_config.json").read_text()).get("distill") or {}
    except (OSError, ValueError):
        return
    now = dataclasses.asdict(dcfg)
    changed = {k: (saved[k], now[k]) for k in STRUCTURAL if k in saved and saved[k] != now[k]}
    if changed:
        raise ValueError(
            f"--resume: {checkpoint} was distilled with other settings (saved -> now): {changed}; resume with the "
            "same ones, or start a new --out."
        )


# --- the run -------------------------------------------------------------------------------------------------------
def _model_folder(path: str | Path, role: str) -> tuple[Path, Any]:
    """(model folder, its tokenizer) of a run or model folder."""
    from deepsail.data.tokenizer import Tokenizer
    from deepsail.train.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(path)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"the {role} {folder} has no tokenizer.json; distillation compares the two models token by token, so "
            "it needs the tokenizer to check they share it (copy the one the model was trained with beside it)."
        )
    return folder, Tokenizer.load(folder)


def _data(data: str, tokenizer: Any, teacher_dir: Path, out: Path, dcfg: DistillConfig, resume: bool) -> Path:
    """A prepared data folder in the teacher's tokenizer: --data as is, or tokenized into RUN/data."""
    from deepsail.data.loader import read_manifest
    from deepsail.data.prepare import prepare

    if data and (Path(data) / "manifest.json").is_file():
        recorded = read_manifest(data)["tokenizer"]["sha256"]
        if recorded != tokenizer.sha256:
            raise ValueError(
                f"--data {data} was tokenized with another tokenizer than the teacher's ({teacher_dir}); prepare it "
                f"with the teacher's: deepsail data prepare FILES --tokenizer {teacher_dir} --out DIR."
            )
        return Path(data)
    data_dir = out / "data"
    if not (resume and (data_dir / "manifest.json").is_file()):
        inputs = [data] if data else None  # None: the embedded corpus, split by file as `deepsail run` does
        prepare(inputs, tokenizer, data_dir, text_field=dcfg.text_field, val_fraction=dcfg.val_fraction, progress=False)
    return data_dir


def distill(
    cfg: TrainConfig,
    dcfg: DistillConfig,
    *,
    data: str = "",
    resume: bool = False,
    console: Console | None = None,
) -> DistillResult:
    """Distill `dcfg.teacher` into a fresh or given student as the module docstring says; `cfg.out` is the run."""
    from deepsail.data.loader import PackedLoader, eval_batches
    from deepsail.data.tokenizer import token_byte_lengths
    from deepsail.eval.metrics import evaluate_lm
    from deepsail.tune.finetune import load_base
    from deepsail.tune.load import from_pretrained

    console = console or Console()
    cfg.validate()
    dcfg.check_student()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out = Path(cfg.out)
    start = check_resumable(cfg, resume, console)
    if start is not None:
        check_same_distill(start, dcfg)

    # --- teacher and student, one tokenizer ---
    teacher_dir, tokenizer = _model_folder(dcfg.teacher, "teacher")
    teacher = from_pretrained(teacher_dir, dtype=DTYPES[precision], device=device).requires_grad_(False)
    teacher.eval()  # stays so: it is not part of the module the loop trains (no MoE load counting, no aux loss)
    seed_everything(cfg.seed)  # before the student's and the projections' init: same seed, same start
    if dcfg.student:
        student_dir, student_tok = _model_folder(dcfg.student, "student")
        diff = tokenizer_difference(student_tok, tokenizer)
        if diff:
            raise ValueError(
                f"the student {student_dir} and the teacher {teacher_dir} use different tokenizers ({diff}); "
                "distillation compares their next-token distributions id by id, so they must share one. Distill "
                "into a fresh --student-preset instead (it takes the teacher's tokenizer)."
            )
        student = load_base(start or student_dir, device)
    else:
        mcfg = student_config(dcfg.student_preset, teacher.config.vocab_size, dcfg.student_layers, dcfg.student_width)
        student = load_base(start, device) if start else Transformer(mcfg).to(device)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"the student's vocabulary has {student.config.vocab_size:,} ids and the teacher's "
            f"{teacher.config.vocab_size:,}; distillation needs the same ids on both sides."
        )
    for name, m in (("teacher", teacher), ("student", student)):
        if cfg.seq_len > m.config.max_position_embeddings:
            raise ValueError(
                f"--seq-len {cfg.seq_len} exceeds the {name}'s max_position_embeddings "
                f"{m.config.max_position_embeddings}; lower --seq-len."
            )
    for p in student.mtp.parameters():  # the objective trains the main head; MTP modules keep what they have
        p.requires_grad_(False)
    if dcfg.gamma:
        pairs = parse_layer_map(dcfg.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    else:
        pairs = []
    if dcfg.progressive:
        if cfg.steps is None:
            raise ValueError("--progressive cuts the run's steps into phases; give it --steps (not only --minutes).")
        if cfg.steps < len(pairs):
            raise ValueError(f"--progressive with {len(pairs)} layer pairs needs --steps >= {len(pairs)}.")
    model = Distiller(student, teacher.config.hidden_size, pairs).to(device)
    loss_fn = DistillLoss(teacher, dcfg, cfg.steps, cfg.grad_accum)
    if start is not None:
        from deepsail.train.checkpoint import read_trainer_state

        load_projections(model, start)
        loss_fn.micro_steps = int(read_trainer_state(start)["step"]) * cfg.grad_accum

    # --- data and evaluation ---
    data_dir = _data(data, tokenizer, teacher_dir, out, dcfg, resume)
    batches = PackedLoader(data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)
    token_bytes = token_byte_lengths(tokenizer)

    def validate(m: nn.Module) -> dict[str, float]:  # the same windows, in the same order, every time
        val = eval_batches(data_dir, cfg.batch_size, cfg.seq_len, "val", max_batches=cfg.eval_batches, device=device)
        r = evaluate_lm(getattr(m, "student", m), val, token_bytes, device, precision)
        return {k: r[k] for k in ("loss", "ppl", "bpb")}

    cfg = cfg.replace(data=str(data_dir), model_preset=dcfg.student_preset)  # what run_config.json records
    schedule = phases(len(pairs), cfg.steps, dcfg.progressive)
    console.print(
        f"teacher {teacher_dir} ({teacher.num_params() / 1e6:.2f}M params, {teacher.config.num_hidden_layers} "
        f"layers, width {teacher.config.hidden_size}) -> student ({student.num_params() / 1e6:.2f}M, "
        f"{student.config.num_hidden_layers} layers, width {student.config.hidden_size}) | "
        f"{dcfg.kd} KD T={dcfg.temperature:g} alpha={dcfg.alpha:g}"
        + (f" | {dcfg.feature_loss} features x{dcfg.gamma:g} at {_pairs_text(pairs)}" if pairs else "")
        + (f" | phases {schedule}" if dcfg.progressive else "")
    )
    # MFU counts the student's training FLOPs and the teacher's forward (a third of its 6N training count)
    flops = student.flops_per_token(cfg.seq_len) + teacher.flops_per_token(cfg.seq_len) / 3
    result: TrainResult = train_loop(
        model,
        batches,
        loss_fn,
        cfg,
        evaluate=validate,
        flops_per_token=flops,
        tokenizer=tokenizer,
        resume_from=start,
        run_info={
            "teacher": str(teacher_dir.resolve()),
            "data": str(data_dir),
            "distill": dataclasses.asdict(dcfg),
            "pairs": pairs,
            "phases": schedule,
            "student_model": student.config.to_dict(),
        },
        console=console,
        name="distill",
        save_model=save_distiller,
    )

    # --- outputs: the plain student, its card, the report ---
    model_dir = out / "model"
    with atomic_dir(model_dir) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save(tmp)
    teacher_val = validate(teacher)
    write_card(out, cfg, dcfg, student.config, teacher_dir, data, data_dir, result, teacher_val, pairs)
    report = write_report(out, cfg, dcfg, teacher_dir, teacher, student, data_dir, result, teacher_val, pairs)
    console.print(
        f"student val bpb {result.val_bpb:.4f} (teacher {teacher_val['bpb']:.4f}) | model: {model_dir} | "
        f"report: {report}"
    )
    return DistillResult(str(out), str(model_dir), str(report), pairs, result.val, teacher_val, result.to_dict())


def phases(n_pairs: int, steps: int | None, progressive: bool) -> list[dict[str, int]]:
    """The feature-matching schedule: [{"from_step", "to_step", "pairs"}, ...] (to_step exclusive)."""
    if not n_pairs:
        return []
    if not progressive or steps is None:
        return [{"from_step": 0, "to_step": steps or 0, "pairs": n_pairs}]
    out: list[dict[str, int]] = []
    for step in range(steps):
        n = active_pairs(step, n_pairs, steps, True)
        if out and out[-1]["pairs"] == n:
            out[-1]["to_step"] = step + 1
        else:
            out.append({"from_step": step, "to_step": step + 1, "pairs": n})
    return out


def _pairs_text(pairs: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{s}:{t}" for s, t in pairs)


def _command(cfg: TrainConfig, dcfg: DistillConfig, data: str) -> str:
    """The CLI equivalent of this run, for its card."""
    defaults = DistillConfig()
    command = ["deepsail", "distill", "--teacher", dcfg.teacher]
    for f in dataclasses.fields(DistillConfig):
        value = getattr(dcfg, f.name)
        if f.name == "teacher" or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        command += [flag] if value is True else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    command += ["--data", data] if data else []
    command += ["--steps", str(cfg.steps)] if cfg.steps else []
    return shlex.join([*command, "--out", cfg.out])


def write_card(
    out: Path,
    cfg: TrainConfig,
    dcfg: DistillConfig,
    config: ModelConfig,
    teacher_dir: Path,
    data: str,
    data_dir: Path,
    result: TrainResult,
    teacher_val: dict[str, float],
    pairs: Sequence[tuple[int, int]],
) -> Path:
    from deepsail.card import invocation, write_model_card

    made_from = dcfg.student or str(teacher_dir)
    return write_model_card(
        out / "model",
        config=config,
        title=out.name,
        summary=f"A student distilled from {teacher_dir} with deepsail: {dcfg.kd} KL at temperature "
        f"{dcfg.temperature:g} (alpha {dcfg.alpha:g})"
        + (f", {dcfg.feature_loss} feature matching at layers {_pairs_text(pairs)}" if pairs else "")
        + (", progressive" if dcfg.progressive else "")
        + f"; {result.step:,} steps.",
        base_model=made_from,
        data=[
            data or "The embedded corpus (the Python standard library's source and help text), split by file.",
            f"token shards in {data_dir} (the teacher's tokenizer); {result.tokens:,} tokens trained on",
        ],
        training={"train": cfg.to_dict(), "distill": dataclasses.asdict(dcfg), "pairs": list(pairs)},
        metrics={f"val_{k}": v for k, v in result.val.items()}
        | {f"teacher_val_{k}": v for k, v in teacher_val.items()},
        how_made=invocation(_command(cfg, dcfg, data)),
        tags=["distilled"],
    )


def plot_parts(out: Path) -> Path | None:
    """The loss and its parts (KD, next-token CE, features, aux) over steps, from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepsail.train.metrics import read_metrics, save_plot

    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (
        ("loss", "total"),
        ("kd", "KD (KL)"),
        ("lm_loss", "next-token CE"),
        ("feature", "feature"),
        ("aux_loss", "MoE aux"),
    ):
        have = [r for r in rows if key in r]
        if have:
            ax.plot([r["step"] for r in have], [r[key] for r in have], "-", label=label)
    return save_plot(fig, ax, "step", "loss part (nats/token; feature: its own unit)", out / "loss_parts.png")


def write_report(
    out: Path,
    cfg: TrainConfig,
    dcfg: DistillConfig,
    teacher_dir: Path,
    teacher: Transformer,
    student: Transformer,
    data_dir: Path,
    result: TrainResult,
    teacher_val: dict[str, float],
    pairs: Sequence[tuple[int, int]],
) -> Path:
    parts = plot_parts(out)
    schedule = phases(len(pairs), cfg.steps, dcfg.progressive)
    loss = f"{dcfg.alpha:g} * {dcfg.temperature:g}^2 * KL_{dcfg.kd} + {1 - dcfg.alpha:g} * CE"
    if pairs:
        loss += f" + {dcfg.gamma:g} * {dcfg.feature_loss}(features)"
    lines = [
        f"# Distillation report: {out.name}",
        "",
        f"- teacher: `{teacher_dir}` ({teacher.num_params() / 1e6:.2f}M params, {teacher.config.model_type}, "
        f"{teacher.config.num_hidden_layers} layers, width {teacher.config.hidden_size})",
        f"- student: {f'`{dcfg.student}`' if dcfg.student else f'fresh `{dcfg.student_preset}`'} "
        f"({student.num_params() / 1e6:.2f}M params, {student.config.model_type}, "
        f"{student.config.num_hidden_layers} layers, width {student.config.hidden_size}) -> `{out / 'model'}`",
        f"- data: `{data_dir}`; {result.step:,} steps, {result.tokens:,} tokens, {result.elapsed_s / 60:.1f} min",
        f"- loss: {loss}" + (f" (KL mix: {dcfg.kd_mix:g} forward)" if dcfg.kd == "mix" else ""),
        f"- layer pairs (student:teacher): {_pairs_text(pairs) or 'none (--gamma 0)'}",
    ]
    if dcfg.progressive:
        lines.append(
            "- progressive phases: "
            + "; ".join(f"steps {p['from_step']}-{p['to_step'] - 1}: pairs 1..{p['pairs']}" for p in schedule)
        )
    lines += [
        "",
        "| model | val loss | val ppl | val bits/byte |",
        "|---|---|---|---|",
        f"| teacher | {teacher_val['loss']:.4f} | {teacher_val['ppl']:.2f} | {teacher_val['bpb']:.4f} |",
        f"| student | {result.val_loss:.4f} | {result.val_ppl:.2f} | {result.val_bpb:.4f} |",
        "",
        f"Training: {result.tok_per_s:,.0f} tok/s, MFU {result.mfu:.1%} (the student's training and the teacher's "
        f"forward), {result.precision} on {result.device}.",
        "",
        "![loss](loss.png)",
        *([f"![loss parts]({parts.name})"] if parts else []),
        "",
    ]
    return atomic_write_text(out / "report.md", "\n".join(lines))


# -----------------------------------------------------------------------------
# The CLI verb

_TRAIN = Options(
    TrainConfig,
    skip=("data", "model_preset", "tokenizer"),
    defaults={"out": "runs/distill", "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "eval_every": 100},
)


@options(cfg=_TRAIN, dcfg=Options(DistillConfig))
def distill_command(
    cfg: TrainConfig,
    dcfg: DistillConfig,
    data: Annotated[
        str,
        typer.Option(
            help="Training text: a `deepsail data prepare` folder (the teacher's tokenizer), or .txt/.jsonl/.parquet "
            "files or folders (default: the embedded corpus, tokenized into RUN/data)."
        ),
    ] = "",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")] = False,
    given: frozenset[str] = frozenset(),
) -> DistillResult:
    """Distill a teacher into a smaller student: logit KD (forward/reverse KL with temperature), intermediate
    feature matching through trained projections, optionally progressive (layer by layer from the bottom).
    Teacher and student may differ in depth, width and architecture but share the tokenizer. Writes RUN/model
    (the student, an HF folder with its card) and RUN/report.md.

    \b
    Examples:
      deepsail distill --teacher runs/default --student-preset llama-3-8b-debug --student-layers 4 \\
        --student-width 128 --steps 600 --out runs/student
      deepsail distill --teacher runs/default --student-preset llama-3-8b-debug --progressive --out runs/prog
      deepsail distill --teacher runs/default --student runs/small/model --kd reverse --gamma 0 --out runs/rkd
      deepsail distill --teacher runs/default --student-preset llama-3-8b-debug --layer-map 0:2,1:5 --out runs/m
    """
    if not resume and "minutes" in given and "steps" not in given:
        cfg = cfg.replace(steps=None)  # a time budget alone: no step limit
    return distill(cfg, dcfg, data=data, resume=resume)
