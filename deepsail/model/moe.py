"""DeepSeekMoE: many small routed experts plus always-on shared experts (DeepSeekMoE, DeepSeek-V2/V3).

Routing follows DeepSeek-V3 §2.1.2: per-expert affinity scores (sigmoid, or softmax for V2), a bias added to the
scores only for *choosing* experts (aux-loss-free balancing), group-limited top-k (pick `topk_group` of `n_group`
expert groups first, the device-limited routing of V2/V3), gate weights from the unbiased scores, optionally
normalised, times `routed_scaling_factor`.

Experts run grouped: the (token, expert) pairs are sorted by expert and every expert does one matmul over its
contiguous slice — a single grouped GEMM where torch has one for the device and dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.config import ModelConfig
from deepsail.model.layers import MLP, SMALL_ROWS, linear, weight_major_applies

GATHER_TOKENS = 16  # up to this many tokens, compiled code gathers each token's experts (Experts.gathered)


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.method, self.scoring = config.topk_method, config.scoring_func
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # Aux-loss-free balancing bias: steers which experts are chosen, never how much they weigh. Updated by
        # `update_bias` outside autograd; kept in fp32 whatever the model dtype (it moves in steps of ~1e-3).
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (scores [N, E] fp32, top-k expert ids [N, K], gate weights [N, K] fp32)."""
        logits = F.linear(x_ND.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
        if self.n_group > 1 and self.method != "greedy":
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            # V3 ranks a group by the sum of its two best experts; V2 by its best one.
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.method == "noaux_tc" else grouped.amax(-1)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1), -1e9)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, ids, weights * self.scaling

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """b_i += γ·sign(mean load − load_i): overloaded experts get picked less, idle ones more (V3 §2.1.2)."""
        load = tokens_per_expert.float()
        self.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if weight_major_applies(x) and x.shape[0] <= 2 * SMALL_ROWS:
        return False  # decode: a loop over the few chosen experts takes the fast few-row route of `linear`
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # its fake kernel accepts bf16 only
        return False
    if x.device.type == "cuda":  # the CUDA kernel is Hopper+ and bf16 only
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


class Experts(nn.Module):
    """The routed experts' weights as stacked tensors (HF transformers 5 layout): gate|up fused, then down."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D]: token copies sorted by expert; counts [E]: how many rows each expert owns."""
        return self.run(x_sorted, counts, self.gate_up_proj, self.down_proj)

    @staticmethod
    def run(
        x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
    ) -> torch.Tensor:
        """The experts with the given stacked weights (a wrapper from outside, e.g. LoRA, passes adapted ones)."""
        w_gate_up = w_gate_up.to(x_sorted.dtype)
        w_down = w_down.to(x_sorted.dtype)
        if torch.compiler.is_compiling() and not _grouped_mm_ok(x_sorted):
            return _expert_loop(x_sorted, counts, w_gate_up, w_down)
        return _experts_eager(x_sorted, counts, w_gate_up, w_down)

    def gathered(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Each token through its own top-k experts, their weights gathered per (token, expert) pair: static shapes
        and only the chosen experts' bytes read — the route of a compiled decode step (a few tokens)."""
        N, K = ids_NK.shape
        flat = ids_NK.reshape(-1)
        x_M1D = x_ND.repeat_interleave(K, dim=0)[:, None]
        h = torch.bmm(x_M1D, self.gate_up_proj[flat].to(x_ND.dtype).transpose(1, 2))  # [N·K, 1, 2H]
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down_proj[flat].to(x_ND.dtype).transpose(1, 2))  # [N·K, 1, D]
        return (y.view(N, K, -1) * weights_NK[..., None].to(y.dtype)).sum(1)

    def dense(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, combined by the gate weights (zero off each token's top-k): the same sum as
        the grouped route with no shape that depends on the routing, which a static graph (torch.export, ONNX)
        cannot size. Costs E/K times the routed experts' FLOPs, so only exported graphs take it."""
        combine_EN = (
            torch.zeros(x_ND.shape[0], self.gate_up_proj.shape[0], device=x_ND.device)
            .scatter(1, ids_NK, weights_NK.float())
            .t()
        )
        h_ENH = torch.matmul(x_ND, self.gate_up_proj.to(x_ND.dtype).transpose(1, 2))
        gate, up = h_ENH.chunk(2, dim=-1)
        y_END = torch.matmul(F.silu(gate) * up, self.down_proj.to(x_ND.dtype).transpose(1, 2))
        return (y_END * combine_EN[..., None].to(y_END.dtype)).sum(0)


def _experts_eager(
    x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """One grouped GEMM per projection where torch has one for the device and dtype, else the loop over experts."""
    if _grouped_mm_ok(x_sorted):
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.grouped_mm(x_sorted, w_gate_up.transpose(1, 2), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        return F.grouped_mm((F.silu(gate) * up).contiguous(), w_down.transpose(1, 2), offs=offsets)
    return _loop_over_experts(x_sorted, counts, w_gate_up, w_down)


def _expert_loop(
    x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The experts inside a compiled graph where grouped_mm cannot be traced (its fake kernel is bf16 only).

    The slice sizes are the routing's counts: traced, every new count was a recompile (torch.compile recompiled
    every step at fp32). Without gradients the experts are one opaque op of the graph (its output is [M, D] whatever
    the counts), which runs them eagerly — grouped_mm where it exists: 570 vs 707 us for the loop at 64 tokens of
    deepseek-v3-mini; with gradients they run eagerly between graphs. A graph break there had each block compiled
    on its own, per layer: at batch 64 the decode step hit dynamo's recompile limit and ran eager."""
    if not torch.is_grad_enabled():
        return torch.ops.deepsail.expert_loop(x_sorted, counts, w_gate_up, w_down)
    return _eager_expert_loop()(x_sorted, counts, w_gate_up, w_down)


@functools.cache
def _eager_expert_loop() -> Any:
    # Made on first use: torch.compiler.disable imports torch._dynamo, 1.5 s that `import deepsail` need not pay.
    return torch.compiler.disable(_experts_eager)


def _loop_over_experts(
    x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = linear(x_sorted[start : start + n], w_gate_up[e]).chunk(2, dim=-1)
            out.append(linear(F.silu(gate) * up, w_down[e]))
        start += n
    return torch.cat(out) if out else x_sorted.new_zeros(0, w_down.shape[1])


@torch.library.custom_op("deepsail::expert_loop", mutates_args=())
def _expert_loop_op(
    x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    return _experts_eager(x_sorted, counts, w_gate_up, w_down)


@_expert_loop_op.register_fake
def _(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return x_sorted.new_empty(x_sorted.shape[0], w_down.shape[1])


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.aux_alpha = config.aux_loss_alpha
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.tokens_per_expert: torch.Tensor | None = None  # load since the last bias update (training only)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(-1, D)
        scores, ids, weights = self.gate(x)

        counts = None
        if torch.compiler.is_exporting():  # a static graph: no shape may depend on the routing (Experts.dense)
            out = self.experts.dense(x, ids, weights)
        elif torch.compiler.is_compiling() and x.shape[0] <= GATHER_TOKENS and hasattr(self.experts, "gathered"):
            out = self.experts.gathered(x, ids, weights)  # a compiled decode step: no routing-dependent slices
        else:
            # Group (token, expert) pairs by expert: a stable sort keeps each expert's tokens in order.
            flat_ids = ids.view(-1)
            order = flat_ids.argsort(stable=True)
            # (not bincount: its output size depends on the values, which a compiled graph cannot size)
            counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).index_add_(
                0, flat_ids, torch.ones_like(flat_ids)
            )
            token_of = order // self.top_k
            y = self.experts(x.index_select(0, token_of), counts)
            y = y * weights.view(-1, 1).index_select(0, order).to(y.dtype)
            out = torch.zeros_like(x, dtype=y.dtype).index_add_(0, token_of, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        if self.training and counts is not None:
            with torch.no_grad():
                self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
            self.aux_loss = (
                self._sequence_aux_loss(scores.view(B, T, -1), ids.view(B, T, -1)) if self.aux_alpha else None
            )
        return out.view(B, T, D).to(x_BTD.dtype)

    def _sequence_aux_loss(self, scores_BTE: torch.Tensor, ids_BTK: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 eq. 17–20: α·Σ_i f_i·P_i per sequence, averaged over the batch.

        f_i = E/(K·T)·#tokens routed to i; P_i = mean over tokens of the normalised score s_i/Σ_j s_j.
        """
        B, T, E = scores_BTE.shape
        hits = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
            1, ids_BTK.view(B, -1), torch.ones_like(ids_BTK.view(B, -1), dtype=torch.float32)
        )
        f = hits * E / (self.top_k * T)
        p = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
        return self.aux_alpha * (f * p).sum(-1).mean()
