"""Upcycling: a trained dense DeepSeek-style model -> a DeepSeekMoE model that starts where it stopped (the verb,
`deepsail upcycle`, is in train/upcycle.py).

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055) copies the dense MLP into every expert. DeepSeekMoE's
experts are fine-grained instead: with k routed experts per token and S shared ones, each expert is 1/(k + S) of
the dense MLP's width, so the upcycled model has the dense model's *active* parameters. A SwiGLU MLP splits exactly
along its hidden units — down(silu(gate x) * up x) is the sum of the same expression over any partition of the
hidden units — so the dense MLP is cut into k + S slices:

    shared experts  = the first S slices (one MLP of width S * expert_size, as DeepSeekMoE fuses them);
    routed experts  = E / k copies of each of the other k slices.

At step 0 each token must use one copy of each routed slice, each at weight 1. The router's weights start at zero,
so every score is sigmoid(0) = 1/2 and the normalised top-k weights are 1/k each (routed_scaling_factor = k makes
them 1); the aux-loss-free balancing bias (DeepSeek-V3 §2.1.2), which decides *which* experts win but never how
much they weigh, starts at +1 on one copy of each slice. So the upcycled model computes exactly the dense function
(tested: same logits, same loss). From there the router learns from the gradients and the bias update moves load
onto the idle copies (at `bias_update_rate` per step the +1 head start is gone after ~1/(2 * rate) steps), which
then specialise: the handover is gradual instead of a cold start.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsail.model.config import ModelConfig
from deepsail.model.layers import MLP
from deepsail.model.moe import MoE


def upcycled_config(dense: ModelConfig, experts: int, top_k: int, shared: int, first_dense: int) -> ModelConfig:
    """The MoE config of an upcycled `dense` model; a combination that cannot start exactly is a clear error."""
    if dense.is_moe:
        raise ValueError("the model is already a MoE model; upcycle a dense one (e.g. preset deepseek-v3-mini-dense)")
    if dense.model_type != "deepseek_v3":
        raise ValueError(
            f"upcycling builds DeepSeek-V3 MoE layers (sigmoid router with a balancing bias); this is a "
            f"{dense.model_type} model. Train a deepseek_v3 dense model (e.g. preset deepseek-v3-mini-dense)."
        )
    if top_k < 1 or shared < 0:
        raise ValueError(f"--top-k must be >= 1 and --shared >= 0 (got {top_k}, {shared})")
    slices = top_k + shared
    if dense.intermediate_size % slices:
        raise ValueError(
            f"the dense MLP's {dense.intermediate_size} hidden units do not split into top_k + shared = {slices} "
            "equal experts; choose --top-k and --shared whose sum divides it"
        )
    if experts < top_k or experts % top_k:
        raise ValueError(f"--experts {experts} must be a multiple of --top-k {top_k} (copies of each routed slice)")
    if not 0 <= first_dense < dense.num_hidden_layers:
        raise ValueError(f"--first-dense {first_dense} must be in 0..{dense.num_hidden_layers - 1}")
    return dense.replace(
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_shared_experts=shared,
        moe_intermediate_size=dense.intermediate_size // slices,
        n_group=1,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=float(top_k),
        first_k_dense_replace=first_dense,
        moe_layer_freq=1,
    )


@torch.no_grad()
def _fill_moe(moe: MoE, mlp: MLP, top_k: int, shared: int) -> None:
    width = moe.experts.down_proj.shape[-1]
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I, D], [I, D], [D, I]
    piece = lambda w, j, dim=0: w.narrow(dim, j * width, width)  # noqa: E731  hidden units of slice j
    if moe.shared_experts is not None:
        moe.shared_experts.gate_proj.weight.copy_(gate[: shared * width])
        moe.shared_experts.up_proj.weight.copy_(up[: shared * width])
        moe.shared_experts.down_proj.weight.copy_(down[:, : shared * width])
    for e in range(moe.n_experts):
        j = shared + e % top_k  # experts 0..k-1 are one copy of each routed slice, k..2k-1 the next copies, ...
        moe.experts.gate_up_proj[e].copy_(torch.cat((piece(gate, j), piece(up, j))))
        moe.experts.down_proj[e].copy_(piece(down, j, dim=1))
    moe.gate.weight.zero_()
    moe.gate.e_score_correction_bias.zero_()
    moe.gate.e_score_correction_bias[:top_k] = 1.0  # one copy of each slice wins every token at step 0


@torch.no_grad()
def upcycle(dense: nn.Module, experts: int, top_k: int, shared: int = 1, first_dense: int = 1) -> nn.Module:
    """A new MoE Transformer whose every non-MLP weight is `dense`'s and whose MoE layers compute exactly what
    `dense`'s MLPs did (module docstring). `dense` is left as it was."""
    from deepsail.model.transformer import Transformer

    config = upcycled_config(dense.config, experts, top_k, shared, first_dense)
    with torch.device("meta"):
        moe_model = Transformer(config)
    moe_model.to_empty(device=next(dense.parameters()).device)
    moe_model.init_weights()
    dtype = next(dense.parameters()).dtype
    moe_model.to(dtype)
    copied = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k or not _is_moe_key(moe_model, k)}
    missing, unexpected = moe_model.load_state_dict(copied, strict=False)
    assert not unexpected, unexpected
    blocks = [(m.mlp, d.mlp) for m, d in zip(moe_model.layers, dense.layers)]
    blocks += [(m.block.mlp, d.block.mlp) for m, d in zip(moe_model.mtp, dense.mtp)]
    for moe, mlp in blocks:
        if isinstance(moe, MoE):
            _fill_moe(moe, mlp, top_k, shared)
    for module in moe_model.modules():  # the balancing bias stays fp32 whatever the weights' dtype (hf.py)
        if isinstance(module, MoE):
            module.gate.e_score_correction_bias.data = module.gate.e_score_correction_bias.float()
    moe_model.tie_weights()
    return moe_model.train(dense.training)


def _is_moe_key(model: nn.Module, key: str) -> bool:
    owner = model.get_submodule(key.rsplit(".mlp.", 1)[0] + ".mlp")
    return isinstance(owner, MoE)
