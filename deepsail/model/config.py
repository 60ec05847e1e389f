"""ModelConfig: every architectural number of a deepsail model, validated.

One dataclass covers the four architectures deepsail reads and writes (DeepSeek-V3, DeepSeek-V2, Qwen2, Llama):
they are all the same decoder with different attention (MLA or GQA) and MLP (dense or DeepSeekMoE). Field names
follow DeepSeek's HF config so `config.json` maps almost one to one; that mapping lives in `hf.py`, the one place
that knows HF's names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")
ROPE_TYPES = ("default", "yarn", "llama3")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
ATTN_GATES = ("none", "headwise", "elementwise")
SPARSE_ATTENTIONS = ("none", "hybrid")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408  # dense MLP width (and the first_k_dense_replace layers of a MoE model)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"

    # attention: "mla" (DeepSeek latent attention) or "gqa" (MHA when kv heads == heads)
    attention_type: str = "mla"
    num_key_value_heads: int = 8  # gqa only
    head_dim: int = 0  # gqa only; 0 -> hidden_size // num_attention_heads
    attention_bias: bool = False  # qwen2: bias on q/k/v; llama: on q/k/v/o; MLA: on q_a and kv_a
    # MLA ranks (DeepSeek-V2 paper notation: d_c = kv_lora_rank, d'_c = q_lora_rank, d_h^R = qk_rope_head_dim)
    q_lora_rank: int = 0  # 0 = queries projected directly from the hidden state (DeepSeek-V2-Lite)
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64

    # rotary position embedding
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn"|"llama3", "factor": ..., ...} as in HF
    rope_interleave: bool = True  # DeepSeek checkpoints pair rotary dims (x0,x1),(x2,x3)...; Llama/Qwen rotate halves

    # DeepSeekMoE (n_routed_experts == 0 means every layer has a dense MLP)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # V3: group score = sum of top-2, balancing bias; V2: max / plain top-k
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0  # weight of the sequence-wise balance loss; 0 = aux-loss-free balancing only

    # multi-token prediction (DeepSeek-V3): D extra modules, each predicting one token further ahead
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3

    # Transformer-XL segment memory (model/memory.py): a training run reads each document in order, segment by
    # segment, attending to the previous segments' last `segment_memory` keys/values. 0 = off. It adds no weights:
    # HF loads such a model as is (it attends within its input only).
    segment_memory: int = 0

    # Dynamic depth (model/depth.py). Mixture-of-Depths (Raposo et al. 2024): every `mod_every`-th block has a
    # router; in training only the top `mod_capacity` fraction of each sequence's tokens get the block's update (and
    # its MLP), the rest ride the residual stream. 0 = off. LayerSkip-style early exit (Elhoushi et al. 2024): with
    # `exit_loss_weight` > 0 the shared head is also trained on the upper half's intermediate layers, so inference
    # can stop at the first layer confident enough.
    mod_capacity: float = 0.0
    mod_every: int = 2
    exit_loss_weight: float = 0.0

    # --- deepsail's own architecture options (off by default: HF parity untouched). A checkpoint using one is written
    # with model_type "deepsail" (hf.py), which transformers refuses by name instead of loading it wrong.
    # Gated attention (Qiu et al. 2025): each head's output times sigmoid(x W_g) of the layer input, before o_proj:
    # one gate per head ("headwise") or per output channel ("elementwise").
    attn_gate: str = "none"
    # Hybrid sparse attention (NSA, arXiv 2502.11089; model/sparse_attention.py): per-head sigmoid gates mix a
    # sliding window of `sliding_window` keys, attention over `compress_block`-token pooled blocks, and attention
    # over the `select_top_k` `select_block`-token blocks those compressed scores rank highest.
    sparse_attention: str = "none"
    sliding_window: int = 256
    compress_block: int = 32
    select_block: int = 64
    select_top_k: int = 4

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we carry through unchanged

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.attention_type == "gqa" and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # --- derived numbers -------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_k), times DeepSeek's YaRN correction mscale(factor, mscale_all_dim)^2 when YaRN is on."""
        if self.attention_type != "mla":
            return self.head_dim**-0.5
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0) or 0
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    # --- validation: an impossible combination names the field ----------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"unknown model type; deepsail supports {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        if self.hidden_act != "silu":
            bad("hidden_act", "only SwiGLU ('silu') MLPs are implemented")
        if self.attention_type not in ("mla", "gqa"):
            bad("attention_type", "must be 'mla' or 'gqa'")
        if self.model_type.startswith("deepseek") and self.attention_type != "mla":
            bad("attention_type", f"{self.model_type} uses multi-head latent attention ('mla')")
        if self.model_type in ("qwen2", "llama"):
            if self.attention_type != "gqa":
                bad("attention_type", f"{self.model_type} uses grouped-query attention ('gqa')")
            if self.is_moe:
                bad("n_routed_experts", f"{self.model_type} is a dense architecture; use a deepseek model_type for MoE")
            if self.num_nextn_predict_layers:
                bad("num_nextn_predict_layers", "multi-token prediction is a DeepSeek-V3 feature")
        if self.attention_type == "gqa":
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
            if self.head_dim % 2:
                bad("head_dim", "rotary embedding needs an even head dimension")
        else:
            if self.kv_lora_rank <= 0:
                bad("kv_lora_rank", "MLA needs a positive latent rank")
            if self.q_lora_rank < 0:
                bad("q_lora_rank", "must be 0 (no query compression) or positive")
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", "must be positive and even")
            if self.qk_nope_head_dim <= 0 or self.v_head_dim <= 0:
                bad("qk_nope_head_dim", "qk_nope_head_dim and v_head_dim must be positive")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_scaling", f"rope_type must be one of {ROPE_TYPES}")
        if self.rope_type in ("yarn", "llama3"):
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    bad("rope_scaling", f"{self.rope_type} scaling needs '{key}'")
        if self.rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in self.rope_scaling:
                    bad("rope_scaling", f"llama3 scaling needs '{key}'")
        if self.is_moe:
            if self.topk_method not in TOPK_METHODS:
                bad("topk_method", f"must be one of {TOPK_METHODS}")
            if self.scoring_func not in ("sigmoid", "softmax"):
                bad("scoring_func", "must be 'sigmoid' or 'softmax'")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.topk_group <= self.n_group:
                bad("topk_group", f"must be in 1..n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts, so each group needs at least 2")
            if self.num_experts_per_tok > self.topk_group * per_group:
                bad("num_experts_per_tok", f"exceeds the {self.topk_group * per_group} experts in topk_group groups")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be positive")
            if self.moe_layer_freq <= 0:
                bad("moe_layer_freq", "must be positive")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.segment_memory < 0:
            bad("segment_memory", "must be >= 0 (0 = off)")
        if not 0 <= self.mod_capacity < 1:
            bad("mod_capacity", "must be in [0, 1): the fraction of tokens a routed block processes (0 = off)")
        if self.mod_every < 1:
            bad("mod_every", "must be >= 1")
        if self.exit_loss_weight < 0:
            bad("exit_loss_weight", "must be >= 0")
        if self.attn_gate not in ATTN_GATES:
            bad("attn_gate", f"must be one of {', '.join(ATTN_GATES)}")
        if self.sparse_attention not in SPARSE_ATTENTIONS:
            bad("sparse_attention", f"must be one of {', '.join(SPARSE_ATTENTIONS)}")
        for name in ("sliding_window", "compress_block", "select_block", "select_top_k"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        if self.select_block % self.compress_block:
            bad(
                "select_block",
                f"must be a multiple of compress_block={self.compress_block}: a selected block's "
                "score is the sum of its compressed blocks' attention",
            )

    @property
    def options(self) -> dict[str, Any]:
        """deepsail's own architecture options that differ from their defaults (what HF cannot represent)."""
        return {
            name: getattr(self, name) for name, default in OPTION_DEFAULTS.items() if getattr(self, name) != default
        }

    # --- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items: Sequence[str]) -> ModelConfig:
        """This config with `KEY=VALUE` strings applied (`--arch`), each value parsed as its field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            key, _, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields or key == "extra":
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"--arch {item!r}: ModelConfig has no field {key!r}{hint}")
            current = getattr(self, key)
            try:
                if isinstance(current, bool):
                    if raw.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(raw)
                    value: Any = raw.lower() in ("true", "1")
                elif isinstance(current, (int, float)) and not isinstance(current, bool):
                    value = type(current)(raw)
                elif current is None or isinstance(current, (dict, list)):
                    value = json.loads(raw)
                else:
                    value = raw
            except ValueError as e:
                raise ValueError(f"--arch {item!r}: {raw!r} is not a valid {type(current).__name__}") from e
            changes[key] = value
        return self.replace(**changes)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        from deepsail.model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1·m·ln(s) + 1 (DeepSeek-V2 appendix)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def config_from_seed(
    layers: int = 12,
    heads: int = 16,
    hidden: int | None = None,
    vocab: int = 32000,
    experts: int = 8,
    top_k: int = 2,
    shared_experts: int = 1,
    mtp: int = 1,
    attention: str = "mla",
    kv_heads: int | None = None,
    **fields: Any,
) -> ModelConfig:
    """A DeepSeek-V3-shaped config from a few numbers, the other sizes in V3's proportions.

    head dim 64 (hidden = 64·heads unless given); MLA latent 4 head dims, query latent 3× that; rope on half a head;
    dense MLP ≈ 8/3·hidden; each routed expert a quarter of that; first layer dense; one MTP module.
    `experts=0` gives a dense model; `attention="gqa"` a Llama-style one. Any ModelConfig field can be passed too.
    """
    hidden = hidden or 64 * heads
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    head = hidden // heads
    intermediate = 64 * max(1, round(8 * hidden / 3 / 64))
    base: dict[str, Any] = dict(
        model_type="deepseek_v3" if attention == "mla" else "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        attention_type=attention,
        rope_interleave=attention == "mla",
    )
    if attention == "mla":
        base.update(
            kv_lora_rank=4 * head,
            q_lora_rank=12 * head,
            qk_nope_head_dim=head,
            qk_rope_head_dim=head // 2,
            v_head_dim=head,
            num_nextn_predict_layers=mtp,
        )
        if experts:
            base.update(
                n_routed_experts=experts,
                num_experts_per_tok=top_k,
                n_shared_experts=shared_experts,
                moe_intermediate_size=max(16, intermediate // 4),
                first_k_dense_replace=min(1, layers - 1),
            )
    else:
        base.update(num_key_value_heads=kv_heads or heads)
    base.update(fields)
    return ModelConfig(**base)


# deepsail-only fields and their "off" values: a config with all of them off is plain HF.
OPTION_DEFAULTS: dict[str, Any] = {"attn_gate": "none"}
OPTION_DEFAULTS.update(mod_capacity=0.0, mod_every=2)
OPTION_DEFAULTS.update(sparse_attention="none", sliding_window=256, compress_block=32, select_block=64, select_top_k=4)
