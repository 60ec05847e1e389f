"""ModelConfig: every architectural number of a deepsail model, and its HF `config.json` form.

One dataclass covers the four architectures deepsail reads and writes (DeepSeek-V3, DeepSeek-V2, Qwen2, Llama):
they are all the same decoder with different attention (MLA or GQA) and MLP (dense or DeepSeekMoE). Field names
follow DeepSeek's HF config so `config.json` maps almost one to one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
ROPE_TYPES = ("default", "yarn", "llama3")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


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

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        from deepsail.model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    # --- HF config.json -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Reads an HF `config.json` dict of a deepseek_v3, deepseek_v2, qwen2 or llama model."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json has model_type={model_type!r}; deepsail reads {', '.join(MODEL_TYPES)}")
        rope_theta, rope_scaling = _read_rope(hf)
        common = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02),
            hidden_act=hf.get("hidden_act", "silu"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if model_type in ("qwen2", "llama"):
            if hf.get("mlp_bias"):
                raise ValueError("config.json sets mlp_bias=true; deepsail's SwiGLU has no MLP bias")
            heads = hf["num_attention_heads"]
            return cls(
                **common,
                attention_type="gqa",
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                # Qwen2 always has q/k/v bias (and no o bias); Llama puts attention_bias on all four.
                attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
                rope_interleave=False,
            )
        n_routed = hf.get("n_routed_experts") or 0
        if model_type == "deepseek_v3":
            topk_method, scoring = hf.get("topk_method", "noaux_tc"), hf.get("scoring_func", "sigmoid")
        else:
            topk_method, scoring = hf.get("topk_method") or "greedy", hf.get("scoring_func", "softmax")
        return cls(
            **common,
            attention_type="mla",
            attention_bias=bool(hf.get("attention_bias", False)),
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_interleave=hf.get("rope_interleave", True),
            n_routed_experts=n_routed,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 1,
            moe_intermediate_size=hf.get("moe_intermediate_size") or 1,
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            topk_method=topk_method,
            scoring_func=scoring,
            # transformers' DeepseekV2 router never normalises (its norm_topk_prob is unused); read it as written.
            norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "deepseek_v3")),
            routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
            moe_layer_freq=hf.get("moe_layer_freq") or 1,
            aux_loss_alpha=hf.get("aux_loss_alpha", 0.0) if hf.get("seq_aux", True) else 0.0,
            num_nextn_predict_layers=hf.get("num_nextn_predict_layers", 0) if model_type == "deepseek_v3" else 0,
        )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """The HF `config.json` dict; `transformers.AutoConfig` reads it back to the same architecture."""
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        rope_parameters.pop("type", None)
        out: dict[str, Any] = dict(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            hidden_act=self.hidden_act,
            rope_theta=self.rope_theta,
            rope_parameters=rope_parameters,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=dtype,
            use_cache=True,
        )
        if self.rope_scaling:
            out["rope_scaling"] = {"type": self.rope_type, **rope_parameters}
        if self.attention_type == "gqa":
            out.update(num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim)
            if self.model_type == "llama":
                out.update(attention_bias=self.attention_bias, mlp_bias=False)
            elif self.model_type == "qwen2":
                if not self.attention_bias:
                    raise ValueError("qwen2 always has q/k/v bias: set attention_bias=True (or use model_type llama)")
                out.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        else:
            out.update(
                num_key_value_heads=self.num_attention_heads,
                attention_bias=self.attention_bias,
                q_lora_rank=self.q_lora_rank or None,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                rope_interleave=self.rope_interleave,
                n_routed_experts=self.n_routed_experts or None,
                n_shared_experts=self.n_shared_experts or None,
                num_experts_per_tok=self.num_experts_per_tok if self.is_moe else None,
                moe_intermediate_size=self.moe_intermediate_size,
                n_group=self.n_group,
                topk_group=self.topk_group,
                topk_method=self.topk_method,
                scoring_func=self.scoring_func,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
                # A dense DeepSeek model is written as "every layer is one of the first k dense ones".
                first_k_dense_replace=self.first_k_dense_replace if self.is_moe else self.num_hidden_layers,
                moe_layer_freq=self.moe_layer_freq,
                aux_loss_alpha=self.aux_loss_alpha,
                seq_aux=True,
            )
            if self.model_type == "deepseek_v3":
                if self.is_moe and (self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc"):
                    raise ValueError(
                        f"deepseek_v3 routes with sigmoid scores and noaux_tc; this config has scoring_func="
                        f"{self.scoring_func!r}, topk_method={self.topk_method!r}: save it as deepseek_v2"
                    )
                out["num_nextn_predict_layers"] = self.num_nextn_predict_layers
            elif self.is_moe and self.scoring_func != "softmax":
                raise ValueError("deepseek_v2 routes with softmax scores: set scoring_func='softmax'")
        out.update(self.extra)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} has no config.json; expected an HF model directory or a deepsail checkpoint")
        return cls.from_hf(json.loads(config_file.read_text()))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1·m·ln(s) + 1 (DeepSeek-V2 appendix)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """HF has two spellings: `rope_theta` + `rope_scaling` (<= 4.x) and `rope_parameters` (5.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json rope type {rope_type!r} is not supported; deepsail reads {ROPE_TYPES}")
    if rope_type == "yarn":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **params}


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
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, attention_type=attention, rope_interleave=attention == "mla",
    )
    if attention == "mla":
        base.update(kv_lora_rank=4 * head, q_lora_rank=12 * head, qk_nope_head_dim=head, qk_rope_head_dim=head // 2,
                    v_head_dim=head, num_nextn_predict_layers=mtp)
        if experts:
            base.update(n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=shared_experts,
                        moe_intermediate_size=max(16, intermediate // 4), first_k_dense_replace=min(1, layers - 1))
    else:
        base.update(num_key_value_heads=kv_heads or heads)
    base.update(fields)
    return ModelConfig(**base)
