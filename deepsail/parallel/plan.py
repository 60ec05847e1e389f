"""`deepsail plan`: what a mesh costs each GPU before the GPUs exist, and a dry run that proves the sharding.

Memory per GPU, for FSDP2 with bf16 compute and fp32 master weights (fsdp.py), AdamW:

    weights      4 B x this rank's shard of every parameter (fp32 master)
    gradients    4 B x the same shard (reduced in fp32)
    optimizer    8 B x the same shard (AdamW's two fp32 moments)
    gathered     bf16 copies FSDP all-gathers: the root unit (embedding + head, kept), and two blocks at a time
                 (the one computing and the one prefetched), each as big as its TP/EP-local weights, plus one
                 block's unsharded fp32 gradients before their reduce-scatter
    activations  per micro-batch row: what backward keeps, per layer (`activation_bytes`), times the layers; with
                 activation checkpointing only each block's input, plus one block's full set while it recomputes

A shard is counted exactly: each parameter's global shape split as the plans split it (tp.py: heads, MLP columns,
vocabulary; ep.py: experts; then FSDP's dim-0 chunks of ceil(n / degree) rows). The dry run builds the real model
at full size on the meta device (no memory), `parallelize`s it over a fake process group of the whole world
(torch's FakeStore / "fake" backend: collectives are no-ops) and reads every DTensor's local shape on rank 0: the
planner's count must be the dry run's, parameter by parameter.

FLOPs per step are the model's own count (`Transformer.flops_per_token`: 6 x active parameters + attention) times
the tokens of one global batch; the time per step assumes the MFU you give against the chip's peak.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from deepsail.flags import Options, knob, options
from deepsail.model import ModelConfig, Transformer
from deepsail.parallel.mesh import MeshShape, mesh_shape

GIB = 2**30
RESERVE = 0.10  # of GPU memory left free: the CUDA context, NCCL buffers and the caching allocator's fragmentation

# Parameter names (native, as `Transformer.named_parameters` spells them) that tensor parallelism splits on dim 0:
# ColwiseParallel weights (and biases), RowwiseParallel weights (split on dim 1, the same count), the embedding rows
# and the head's columns. Everything else is whole on every tp rank.
_TP_SPLIT = re.compile(
    r"(self_attn\.(q_proj|q_b_proj|kv_b_proj|k_proj|v_proj|gate\.proj)\.(weight|bias)"
    r"|self_attn\.o_proj\.weight"
    r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight"
    r"|^embed_tokens\.weight|^lm_head\.weight)$"
)
_EXPERTS = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)$")
_ROWWISE = re.compile(r"(o_proj|down_proj)\.weight$")  # split on dim 1 by TP: FSDP's dim-0 chunks see all rows


@dataclass
class PlanConfig:
    preset: str = knob("deepseek-v3", "Model preset to plan for (deepseek-v3, deepseek-v2-lite, llama-3-8b, ...).")
    gpus: int = knob(256, "GPUs in the job (the world size).")
    gpu_memory: str = knob("80GB", "Memory of one GPU: 80GB, 141GB, 96GiB.")
    dp_replicate: int = knob(1, "Whole model copies (HSDP's replicate dimension).")
    dp_shard: int = knob(-1, "FSDP2 shards; -1 = the GPUs the other dimensions leave.")
    ep: int = knob(1, "Expert parallel degree (divides n_routed_experts).")
    tp: int = knob(1, "Tensor parallel degree (divides heads, MLP widths, vocabulary); 8 = one NVLink node.")
    seq_len: int = knob(4096, "Tokens per sequence.")
    peak_tflops: float = knob(989.0, "The chip's dense bf16 peak, TFLOP/s (H100 SXM: 989).")
    mfu: float = knob(0.35, "Model FLOPs utilisation assumed for the time per step.")
    dry_run: bool = knob(True, "Build the parallelized full-size model on the meta device under a fake process group.")


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '96GiB' -> 96·2^30 (what the flag says; GPU makers' 80GB cards report ~79.6 GiB)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 80GB or 96GiB.")
    unit = m.group(2).upper()
    scale = (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


def local_numel(name: str, shape: tuple[int, ...], mesh: MeshShape, tied: bool = False) -> int:
    """Elements of parameter `name` (global `shape`) that rank 0 holds under `mesh`: split by TP or EP, then
    chunked on dim 0 by FSDP (dense weights over dp_shard x ep, experts over dp_shard)."""
    rows, rest = shape[0], math.prod(shape[1:])
    fsdp = mesh.dp_shard * mesh.ep
    if _EXPERTS.search(name):
        rows, fsdp = rows // mesh.ep, mesh.dp_shard
    elif (
        mesh.tp > 1
        and _TP_SPLIT.search(name)
        and not (tied and name.endswith(("embed_tokens.weight", "lm_head.weight")))
    ):
        if _ROWWISE.search(name):
            rest //= mesh.tp
        else:
            rows //= mesh.tp
    if not (mesh.fsdp or (mesh.dp_replicate > 1 and mesh.tp > 1)):
        fsdp = 1
    return math.ceil(rows / fsdp) * rest


def activation_bytes(config: ModelConfig, tp: int, moe: bool) -> float:
    """Bytes per token that one block keeps for backward in bf16 (fp32 where the code computes in fp32), without
    sequence parallelism: norms and residuals are whole on each tp rank, head-wise and column-wise tensors 1/tp.

    Counted from the code: two RMSNorm inputs (fp32 upcasts) and outputs; MLA's q_a and kv_a outputs and their
    norms, q and the expanded k, v per head, the attention output (SDPA also keeps its [heads] log-sum-exp), o_proj's
    input; a dense MLP's gate, up and their product; an MoE layer's fp32 router scores, the k dispatched copies of
    each token, each expert's gate|up output and activation, their outputs, plus the shared experts like an MLP."""
    c, b2, b4 = config, 2, 4
    h = c.hidden_size
    norms = 2 * (h * b4 + h * b2)
    if c.attention_type == "mla":
        H = c.num_attention_heads // tp
        attn = (c.q_lora_rank + c.q_lora_rank) * b2 if c.q_lora_rank else 0
        attn += (c.kv_lora_rank + c.qk_rope_head_dim + c.kv_lora_rank) * b2
        attn += H * (c.qk_head_dim * 3 + c.v_head_dim * 2) * b2 + H * b4  # q, k, v (padded), out, lse
    else:
        H, kv = c.num_attention_heads // tp, c.num_key_value_heads // tp
        attn = (H * c.head_dim * 2 + 2 * kv * c.head_dim) * b2 + H * b4
    if moe:
        k, f = c.num_experts_per_tok, c.moe_intermediate_size
        mlp = c.n_routed_experts * b4 + k * (h + 3 * f + h) * b2
        if c.n_shared_experts:
            mlp += 3 * f * c.n_shared_experts // tp * b2
    else:
        mlp = 3 * c.intermediate_size // tp * b2
    return norms + attn + mlp + 2 * h * b2  # + the block's input and the residual after attention


@dataclass
class Plan:
    mesh: MeshShape
    params: int  # the whole model
    local_params: int  # rank 0's shard
    gathered_bytes: int
    activation_row_bytes: float  # one micro-batch row, without activation checkpointing
    activation_row_bytes_ac: float  # with it
    logits_row_bytes: float
    flops_per_token: float
    memory_bytes: int

    @property
    def state_bytes(self) -> int:  # fp32 weights + fp32 grads + AdamW's two fp32 moments
        return 16 * self.local_params

    def fixed_bytes(self) -> int:
        return self.state_bytes + self.gathered_bytes

    def total_bytes(self, rows: int, ac: bool) -> float:
        act = self.activation_row_bytes_ac if ac else self.activation_row_bytes
        return self.fixed_bytes() + rows * (act + self.logits_row_bytes)

    def max_rows(self, ac: bool) -> int:
        """The largest micro-batch (sequences per GPU) that fits in the memory less RESERVE; 0 if none does."""
        room = self.memory_bytes * (1 - RESERVE) - self.fixed_bytes()
        per_row = (self.activation_row_bytes_ac if ac else self.activation_row_bytes) + self.logits_row_bytes
        return max(0, int(room // per_row))


def make_plan(cfg: PlanConfig) -> Plan:
    """The arithmetic of the module docstring for `cfg` (no process group, no memory: a meta-device model)."""
    shape = mesh_shape(cfg.gpus, cfg.dp_replicate, cfg.dp_shard, cfg.ep, cfg.tp)
    config = ModelConfig.preset(cfg.preset)
    from deepsail.parallel.ep import check_ep
    from deepsail.parallel.tp import check_tp

    check_tp(config, shape.tp)
    check_ep(config, shape.ep)
    with torch.device("meta"):
        model = Transformer(config)
    tied = config.tie_word_embeddings
    local = {n: local_numel(n, tuple(p.shape), shape, tied) for n, p in model.named_parameters()}

    def unsharded_by_fsdp(prefix: str) -> int:  # a unit's bf16 weights once gathered: TP/EP-local, FSDP-whole
        one = MeshShape(1, 1, 1, shape.tp)
        total = 0
        for n, p in model.named_parameters():
            if n.startswith(prefix):
                count = local_numel(n, tuple(p.shape), one, tied)
                total += count // shape.ep if _EXPERTS.search(n) else count
        return total

    blocks = [f"layers.{i}." for i in range(config.num_hidden_layers)] + [
        f"mtp.{k}.block." for k in range(len(model.mtp))
    ]
    biggest = max(unsharded_by_fsdp(b) for b in blocks)
    root = unsharded_by_fsdp("embed_tokens.") + (0 if tied else unsharded_by_fsdp("lm_head."))
    gathered = 2 * (root + 2 * biggest) + 4 * biggest
    layers = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)] + [config.is_moe] * len(model.mtp)
    per_token = sum(activation_bytes(config, shape.tp, moe) for moe in layers)
    per_token_ac = config.hidden_size * 2 * len(layers) + max(activation_bytes(config, shape.tp, m) for m in layers)
    # The loss: fp32 logits of a chunk and their gradient (model/loss.py); under TP the vocab-sharded logits whole.
    logits = 2 * 4 * config.vocab_size / shape.tp * (1 + len(model.mtp))
    return Plan(
        mesh=shape,
        params=sum(p.numel() for p in model.parameters()),
        local_params=sum(local.values()),
        gathered_bytes=gathered,
        activation_row_bytes=per_token * cfg.seq_len,
        activation_row_bytes_ac=per_token_ac * cfg.seq_len,
        logits_row_bytes=logits * cfg.seq_len,
        flops_per_token=model.flops_per_token(cfg.seq_len),
        memory_bytes=parse_bytes(cfg.gpu_memory),
    )


def dry_run(cfg: PlanConfig) -> dict[str, int]:
    """Build the real model at full size on the meta device and `parallelize` it over a fake process group of
    `cfg.gpus` ranks (this process is rank 0); every parameter's rank-0 element count, by name."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from deepsail.parallel.mesh import build_mesh
    from deepsail.parallel.parallelize import parallelize
    from deepsail.train.config import TrainConfig

    if dist.is_initialized():
        raise ValueError("deepsail plan --dry-run makes its own fake process group; run it outside torchrun.")
    shape = mesh_shape(cfg.gpus, cfg.dp_replicate, cfg.dp_shard, cfg.ep, cfg.tp)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg.gpus)
    try:
        pm = build_mesh(shape, torch.device("cpu"))
        with torch.device("meta"):
            model = Transformer(ModelConfig.preset(cfg.preset))
        train = TrainConfig(
            precision="bf16", dp_replicate=shape.dp_replicate, dp_shard=shape.dp_shard, ep=shape.ep, tp=shape.tp
        )
        parallelize(model, pm, train.replace(activation_checkpointing=True))
        # named as saved: without the activation-checkpoint wrapper's prefix (state dicts and DCP drop it too)
        return {
            n.replace("_checkpoint_wrapped_module.", ""): (p.to_local() if isinstance(p, DTensor) else p).numel()
            for n, p in model.named_parameters()
        }
    finally:
        dist.destroy_process_group()


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def report(cfg: PlanConfig, plan: Plan, dry: dict[str, int] | None) -> str:
    m, lines = plan.mesh, []
    lines.append(
        f"{cfg.preset}: {plan.params / 1e9:,.1f}B parameters on {cfg.gpus} GPUs of {cfg.gpu_memory} "
        f"({_gib(plan.memory_bytes)}) | mesh {m.describe()} | seq_len {cfg.seq_len}"
    )
    lines.append(f"per GPU: {plan.local_params / 1e9:,.2f}B parameters (its shard)")
    lines.append(f"  weights (fp32)          {_gib(4 * plan.local_params)}")
    lines.append(f"  gradients (fp32)        {_gib(4 * plan.local_params)}")
    lines.append(f"  AdamW moments (fp32)    {_gib(8 * plan.local_params)}")
    lines.append(f"  gathered by FSDP (bf16) {_gib(plan.gathered_bytes)}")
    for ac in (False, True):
        act = plan.activation_row_bytes_ac if ac else plan.activation_row_bytes
        rows = plan.max_rows(ac)
        what = "with activation checkpointing" if ac else "without activation checkpointing"
        fits = f"largest micro-batch {rows} x {cfg.seq_len}" if rows else "does not fit even 1 sequence"
        total = f" -> {_gib(plan.total_bytes(rows, ac))} in use" if rows else ""
        lines.append(
            f"  activations {what}: {_gib(act + plan.logits_row_bytes)} per sequence; {fits}{total} "
            f"(of {_gib(plan.memory_bytes * (1 - RESERVE))} usable)"
        )
    rows = plan.max_rows(True) or 1
    tokens = rows * cfg.seq_len * m.dp
    flops = plan.flops_per_token * tokens
    seconds = flops / (cfg.gpus * cfg.peak_tflops * 1e12 * cfg.mfu)
    lines.append(
        f"FLOPs per step: {flops:.3e} for {tokens:,} tokens (micro-batch {rows} x {m.dp} data-parallel ranks; "
        f"{plan.flops_per_token / 1e9:,.1f} GFLOP/token) -> {seconds:,.2f} s/step, "
        f"{tokens / seconds:,.0f} tok/s at {cfg.mfu:.0%} MFU of {cfg.peak_tflops:g} TFLOP/s"
    )
    if dry is not None:
        same = sum(dry.values()) == plan.local_params
        lines.append(
            f"dry run: the parallelized {cfg.preset} built on the meta device over a fake {cfg.gpus}-rank process "
            f"group; rank 0 holds {sum(dry.values()) / 1e9:,.3f}B parameters "
            + ("= the plan's count" if same else f"(the plan counted {plan.local_params / 1e9:,.3f}B)")
        )
    return "\n".join(lines)


@options(cfg=Options(PlanConfig))
def plan_command(cfg: PlanConfig) -> Any:
    """Per-GPU memory (weights, gradients, AdamW, FSDP's gathered blocks, activations with and without activation
    checkpointing), the largest micro-batch that fits and the FLOPs of a step, for a preset on a mesh; then a dry
    run that parallelizes the full-size model on a fake process group to prove the shardings.

    \b
    Examples:
      deepsail plan --preset deepseek-v3 --gpus 256 --gpu-memory 80GB --tp 8 --ep 32
      deepsail plan --preset llama-3-8b --gpus 8 --gpu-memory 80GB --no-dry-run
    """
    from rich.console import Console

    plan = make_plan(cfg)
    dry = dry_run(cfg) if cfg.dry_run else None
    Console(highlight=False).print(report(cfg, plan, dry), soft_wrap=True)
    return plan
