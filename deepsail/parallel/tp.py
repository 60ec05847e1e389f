"""Tensor parallelism: DTensor plans that split attention heads, MLP columns and the vocabulary over the `tp` mesh.

Megatron's layout, spelled with torch's own `parallelize_module` styles: a layer that fans out (q_b, kv_b, GQA's
q/k/v, MLP gate/up) is `ColwiseParallel` (each rank keeps its heads' or columns' rows of the weight) and the layer
that folds back (o_proj, MLP down) is `RowwiseParallel`, whose all-reduce is the only collective of the pair.

MLA keeps its two low-rank down-projections whole on every rank (q_a, kv_a and their norms): the norms need the
full latent vector and the matrices are small (q_a 1536x7168 and kv_a 576x7168 in DeepSeek-V3, 9% of a layer's
attention weights); the head-wise up-projections q_b and kv_b split by heads. The router and the routed experts
are left to expert parallelism (`ep.py`); the shared experts are a dense MLP and split like one.

The embedding splits the vocabulary rows (`RowwiseParallel`: each rank looks up its rows, one all-reduce) and the
head its output columns. With `loss_parallel` the logits stay sharded over the vocabulary and the cross-entropy is
computed on the shards (torch's `loss_parallel`): the [tokens, vocab] logits are never gathered, which for
DeepSeek-V3's 129,280-word vocabulary at 4,096 tokens is 2 GB of fp32 per micro-batch row saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from deepsail.model.layers import MLP, Linear
from deepsail.model.moe import MoE

_LOSS_PARALLEL = {"on": False}  # inside `loss_parallel_context`: the head's logits stay vocab-sharded


class ParallelHead(Linear):
    """The output head once tensor-parallel. Its own class, so the model's fused linear-cross-entropy (which reads
    `lm_head.weight` as one plain matrix) steps aside for the plain route, whose cross-entropy torch's
    `loss_parallel` computes on vocab-sharded logits. Outside a training step the logits come back whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if isinstance(logits, DTensor) and not _LOSS_PARALLEL["on"]:
            return logits.full_tensor()
        return logits


@contextlib.contextmanager
def loss_parallel_context(enabled: bool) -> Iterator[None]:
    """Around a training step's forward and backward: the cross-entropy of vocab-sharded logits (no-op if off)."""
    if not enabled:
        yield
        return
    from torch.distributed.tensor.experimental import implicit_replication

    _LOSS_PARALLEL["on"] = True
    try:
        # implicit_replication: the replicated loss of the sharded logits adds up with the plain-tensor losses
        # (MTP on unsharded hidden states, the MoE balance term) as one replicated value.
        with loss_parallel(), implicit_replication():
            yield
    finally:
        _LOSS_PARALLEL["on"] = False


def check_tp(config: object, tp: int) -> None:
    """Every split must be even: heads, kv heads, MLP widths and the vocabulary divide by tp. Hybrid sparse
    attention does not split by heads: its selection sums the compressed attention of every head sharing the keys
    (all of MLA's), and its gates are one projection for all heads."""
    c = config
    if getattr(c, "sparse_attention", "none") != "none" and tp > 1:
        raise ValueError(
            f"--tp {tp} with ModelConfig.sparse_attention={c.sparse_attention!r}: its block selection sums over the "
            "heads that --tp would split across ranks; shard it with --dp-shard (FSDP) instead."
        )
    need = {"num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size}
    if c.attention_type == "gqa":
        need["num_key_value_heads"] = c.num_key_value_heads
    if c.n_shared_experts:
        need["moe_intermediate_size x n_shared_experts"] = c.moe_intermediate_size * c.n_shared_experts
    if not c.tie_word_embeddings:
        need["vocab_size"] = c.vocab_size
    for name, value in need.items():
        if value % tp:
            raise ValueError(f"--tp {tp} must divide the model's {name} ({value}); choose a --tp that does.")


def _mlp_plan(prefix: str) -> dict[str, object]:
    return {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(),
    }


def block_plan(block: nn.Module) -> dict[str, object]:
    """The plan of one decoder block (attention + dense MLP or the MoE's shared experts)."""
    attn = block.self_attn
    if hasattr(attn, "kv_b_proj"):  # MLA
        plan: dict[str, object] = {"self_attn.kv_b_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()}
        plan["self_attn.q_b_proj" if attn.q_lora_rank else "self_attn.q_proj"] = ColwiseParallel()
    else:  # GQA
        plan = {f"self_attn.{n}_proj": ColwiseParallel() for n in "qkv"} | {"self_attn.o_proj": RowwiseParallel()}
    if getattr(attn, "gate", None) is not None:  # gated attention: one gate per head (or per head dim), split alike
        plan["self_attn.gate.proj"] = ColwiseParallel()
    if isinstance(block.mlp, MLP):
        plan |= _mlp_plan("mlp")
    elif isinstance(block.mlp, MoE) and block.mlp.shared_experts is not None:
        plan |= _mlp_plan("mlp.shared_experts")
    return plan


def _reduce_rope_key_grad(tp_mesh: DeviceMesh, rank: int) -> object:
    """A forward hook for MLA's kv_a projection: its output's last `rank` columns are the rope key, which every
    head shares and which no split layer consumes, so each rank's backward only sums its own heads into it. Marking
    that slice's gradient Partial makes DTensor all-reduce it over tp (the latent part reaches kv_b, whose
    ColwiseParallel input already reduces its gradient). Measured without it: kv_a's gradient off by 0.9%."""

    def hook(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        latent, rope = out.split([out.shape[-1] - rank, rank], dim=-1)
        rope = DTensor.from_local(rope, tp_mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
        return torch.cat((latent, rope), dim=-1)

    return hook


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool = True) -> None:
    """Split `model` (a Transformer) over `tp_mesh` in place."""
    tp = tp_mesh.size()
    check_tp(model.config, tp)
    if not model.config.tie_word_embeddings:
        # A tied head shares the embedding's Parameter; two plans would split it twice, so tied models keep both
        # whole (the small Qwen2 sizes that tie them fit one GPU anyway).
        old = model.lm_head
        head = ParallelHead(old.in_features, old.out_features, bias=False, device="meta")
        head.weight = old.weight
        model.lm_head = head
        parallelize_module(
            model,
            tp_mesh,
            {
                "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                "lm_head": ColwiseParallel(
                    output_layouts=Shard(-1) if loss_parallel else Replicate(), use_local_output=False
                ),
            },
        )
    blocks = [*model.layers, *(m.block for m in getattr(model, "mtp", ()))]
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block))
        # The attention code views its projections as [B, T, n_heads, ...]: after the split a rank holds n/tp heads.
        attn = block.self_attn
        if hasattr(attn, "kv_b_proj"):
            attn.kv_a_proj_with_mqa.register_forward_hook(_reduce_rope_key_grad(tp_mesh, attn.rope_dim))
        attn.n_heads //= tp
        if getattr(attn, "gate", None) is not None:
            attn.gate.n_heads //= tp
        if hasattr(attn, "n_kv"):
            attn.n_kv //= tp
