"""HF-format checkpoints: the one seam between deepsail and HF's names, for config.json and for tensors.

Everything that knows an HF spelling lives here: `config.json` <-> `ModelConfig` (`config_from_hf`,
`config_to_hf`), tensor names both ways, and `from_pretrained` / `save_pretrained`, which `Transformer` gets by
mixing in `HFCheckpoint` (so this module never imports the model it loads: no import circle).

deepsail's parameter names are HF's minus the `model.` prefix, except two places:
- routed experts are stacked tensors here (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj`
  [E, D, I]) and one tensor per expert in DeepSeek's checkpoints (`mlp.experts.{e}.gate_proj.weight`, ...);
  transformers 5's fused layout is read too;
- MTP module k is `mtp.{k}.*` here and `model.layers.{num_hidden_layers + k}.*` in DeepSeek-V3's checkpoint, where
  the block's weights sit flat beside `enorm`, `hnorm`, `eh_proj` and `shared_head`, and the shared embedding and
  head are stored again (we write those copies for other runtimes and ignore them on read).
Only safetensors are ever read: pickled `.bin` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepsail.files import atomic_dir
from deepsail.model.config import MODEL_TYPES, ROPE_TYPES, ModelConfig
from deepsail.precision import hf_dtype_name, to_dtype

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_KEEP_FP32 = ("e_score_correction_bias",)  # tiny and moved in 1e-3 steps: bf16 would swallow the updates
WEIGHT_FILES = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


# --- config.json ---------------------------------------------------------------------------------------------------
# A model using one of deepsail's own architecture options (ModelConfig.options: e.g. attn_gate) has weights HF has
# no module for. Its config.json says model_type "deepsail" (the architecture it extends under "deepsail_base"),
# so transformers refuses it by name rather than loading it with those weights silently dropped.
OWN_MODEL_TYPE = "deepsail"


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Reads an HF `config.json` dict of a deepseek_v3, deepseek_v2, qwen2 or llama model (or a deepsail one: one
    of those plus deepsail's own options, applied by `read_config` from the "deepsail" section)."""
    model_type = hf.get("model_type")
    if model_type == OWN_MODEL_TYPE:
        hf = {**hf, "model_type": hf.get("deepsail_base")}
        model_type = hf["model_type"]
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
        return ModelConfig(
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
    return ModelConfig(
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


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The HF `config.json` dict; `transformers.AutoConfig` reads it back to the same architecture."""
    rope_parameters = {"rope_type": config.rope_type, "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    rope_parameters.pop("type", None)
    out: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[config.model_type]],
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        hidden_act=config.hidden_act,
        rope_theta=config.rope_theta,
        rope_parameters=rope_parameters,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=dtype,
        use_cache=True,
    )
    if config.rope_scaling:
        out["rope_scaling"] = {"type": config.rope_type, **rope_parameters}
    if config.attention_type == "gqa":
        out.update(num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim)
        if config.model_type == "llama":
            out.update(attention_bias=config.attention_bias, mlp_bias=False)
        elif config.model_type == "qwen2":
            if not config.attention_bias:
                raise ValueError("qwen2 always has q/k/v bias: set attention_bias=True (or use model_type llama)")
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    else:
        out.update(
            num_key_value_heads=config.num_attention_heads,
            attention_bias=config.attention_bias,
            q_lora_rank=config.q_lora_rank or None,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            rope_interleave=config.rope_interleave,
            n_routed_experts=config.n_routed_experts or None,
            n_shared_experts=config.n_shared_experts or None,
            num_experts_per_tok=config.num_experts_per_tok if config.is_moe else None,
            moe_intermediate_size=config.moe_intermediate_size,
            n_group=config.n_group,
            topk_group=config.topk_group,
            topk_method=config.topk_method,
            scoring_func=config.scoring_func,
            norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
            # A dense DeepSeek model is written as "every layer is one of the first k dense ones".
            first_k_dense_replace=config.first_k_dense_replace if config.is_moe else config.num_hidden_layers,
            moe_layer_freq=config.moe_layer_freq,
            aux_loss_alpha=config.aux_loss_alpha,
            seq_aux=True,
        )
        if config.model_type == "deepseek_v3":
            if config.is_moe and (config.scoring_func != "sigmoid" or config.topk_method != "noaux_tc"):
                raise ValueError(
                    f"deepseek_v3 routes with sigmoid scores and noaux_tc; this config has scoring_func="
                    f"{config.scoring_func!r}, topk_method={config.topk_method!r}: save it as deepseek_v2"
                )
            out["num_nextn_predict_layers"] = config.num_nextn_predict_layers
        elif config.is_moe and config.scoring_func != "softmax":
            raise ValueError("deepseek_v2 routes with softmax scores: set scoring_func='softmax'")
    out.update(config.extra)
    if config.options:
        # transformers has no module for these weights: name the type so it refuses instead of dropping them
        out.update(model_type=OWN_MODEL_TYPE, architectures=["DeepsailForCausalLM"], deepsail_base=config.model_type)
    return out


def deepsail_section(config: ModelConfig) -> dict[str, Any]:
    """config.json's "deepsail" section: the fields HF has no key for (read back by `read_config`)."""
    extra = {k: getattr(config, k) for k in ("segment_memory", "exit_loss_weight") if getattr(config, k)}
    return {"mtp_loss_weight": config.mtp_loss_weight, **extra, **config.options}


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


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a dict; a missing or damaged one is a clear error."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; expected an HF model directory or a deepsail checkpoint")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} holds {type(hf).__name__}, not a JSON object")
    return hf


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF model directory or a deepsail checkpoint (whose config.json carries a `deepsail`
    section with the few fields HF has no key for)."""
    config_file = Path(path) / "config.json"
    hf = read_config_json(path)
    try:
        config = config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{config_file} lacks the key {e.args[0]!r} a {hf.get('model_type')} config needs") from e
    return config.replace(**hf["deepsail"]) if isinstance(hf.get("deepsail"), dict) else config


# --- names ---------------------------------------------------------------------------------------------------------
def native_to_hf(config: ModelConfig, name: str) -> str:
    L = config.num_hidden_layers
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        rest = rest.removeprefix("block.")
        if rest == "norm.weight":
            rest = "shared_head.norm.weight"
        return f"model.layers.{L + k}.{rest}"
    return name if name.startswith("lm_head.") else f"model.{name}"


def hf_to_native(config: ModelConfig, name: str) -> str | None:
    """None for tensors we deliberately skip (MTP's copies of the shared embedding and head)."""
    if name.startswith("lm_head."):
        return name
    if not name.startswith("model."):
        return name  # reported as unexpected later
    name = name.removeprefix("model.")
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        k, rest = int(m.group(1)) - config.num_hidden_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        if rest == "shared_head.norm.weight":
            return f"mtp.{k}.norm.weight"
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            return f"mtp.{k}.{rest}"
        return f"mtp.{k}.block.{rest}"
    return name


# --- load ----------------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ValueError(
            f"{path} holds only pickled weights (.bin/.pt); deepsail loads safetensors only, because "
            "unpickling can run arbitrary code. Convert them with a trusted tool first."
        )
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _summarise(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _read_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a damaged file (truncated, empty, not safetensors) is a clear error."""
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError for short reads
        raise ValueError(
            f"{file} is not a readable safetensors file ({e}); it may be truncated or overwritten. "
            "Restore it, or load an earlier checkpoint."
        ) from e


def load_hf_state(
    path: Path, config: ModelConfig, expected: dict[str, torch.Tensor], device: str
) -> tuple[dict[str, torch.Tensor], torch.dtype | None]:
    """The checkpoint's tensors under deepsail names, experts stacked, checked against `expected` (name -> a tensor
    of the right shape); also the checkpoint's own floating dtype."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    unexpected: list[str] = []
    saved_dtype = None
    for file in _weight_files(path):
        for hf_name, tensor in _read_tensors(file, device).items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # derived from the config, some old checkpoints stored it
            m = _EXPERT.match(hf_name)
            native = hf_to_native(config, m.group(1) if m else hf_name)
            if native is None:
                continue
            if saved_dtype is None and tensor.is_floating_point():
                saved_dtype = tensor.dtype
            if m:
                experts[native][int(m.group(2))][m.group(3)] = tensor
            elif native in expected:
                state[native] = tensor
            elif config.tie_word_embeddings and native == "lm_head.weight":
                continue  # some tied checkpoints store the head anyway
            else:
                unexpected.append(hf_name)
    # Per-expert tensors -> stacked [E, ...] (DeepSeek's layout -> ours).
    for prefix, per_expert in experts.items():
        n = config.n_routed_experts
        if sorted(per_expert) != list(range(n)) or any(len(p) != 3 for p in per_expert.values()):
            raise ValueError(
                f"{prefix}: expected gate/up/down weights for experts 0..{n - 1}, found experts {sorted(per_expert)}"
            )
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[e]["gate_proj"], per_expert[e]["up_proj"])) for e in range(n)]
        )
        state[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(n)])
        per_expert.clear()
    if config.topk_method != "noaux_tc":  # V2 checkpoints have no balancing bias: it stays zero
        for name in [k for k in expected if k.endswith("e_score_correction_bias") and k not in state]:
            state[name] = torch.zeros(config.n_routed_experts)

    missing = sorted(set(expected) - set(state))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(state)
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_summarise(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarise(mismatched)}")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not match its config.json ({config.model_type}):\n  " + "\n  ".join(problems)
        )
    return state, saved_dtype


# --- save ----------------------------------------------------------------------------------------------------------
def hf_state_dict(
    model: Any, dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors (or `state`, the same names with other values) under DeepSeek/HF checkpoint names,
    experts split per expert."""
    config = model.config
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        keep = name.endswith(_KEEP_FP32) or dtype is None
        out[name] = (
            t.detach().to(torch.float32 if name.endswith(_KEEP_FP32) else (t.dtype if keep else dtype)).contiguous()
        )

    for name, t in (model.state_dict() if state is None else state).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("e_score_correction_bias") and config.topk_method != "noaux_tc":
            continue
        hf_name = native_to_hf(config, name)
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            base, hidden = hf_name.removesuffix(".gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                put(f"{base}.{e}.gate_proj.weight", t[e, :hidden])
                put(f"{base}.{e}.up_proj.weight", t[e, hidden:])
        elif hf_name.endswith("mlp.experts.down_proj"):
            base = hf_name.removesuffix(".down_proj")
            for e in range(t.shape[0]):
                put(f"{base}.{e}.down_proj.weight", t[e])
        else:
            put(hf_name, t)
    for k in range(len(model.mtp)):  # DeepSeek-V3 stores the shared embedding and head again in each MTP layer
        layer = f"model.layers.{config.num_hidden_layers + k}"
        put(f"{layer}.embed_tokens.weight", model.embed_tokens.weight.clone())
        put(f"{layer}.shared_head.head.weight", model.lm_head.weight.clone())
    return out


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20}
_UNITS |= {"GIB": 1 << 30, "TIB": 1 << 40}


def shard_bytes(size: int | str) -> int:
    """`max_shard_size` as transformers reads it: an int of bytes, or "2GB" (10^9), "500MB", "2GiB" (2^30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like 2GB, 500MB, 2GiB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive; got {size!r}")
    return n


def save_hf(
    model: Any,
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """config.json + model.safetensors (sharded with an index above `max_shard_size`), written atomically: the new
    folder replaces `path` only once complete, keeping the files of an existing `path` that are not weights or
    config (a tokenizer saved beside them, say). `state` replaces the model's own tensors (a LoRA-adapted model
    saves its merged weights this way)."""
    max_shard_bytes = shard_bytes(max_shard_size)
    tensors = hf_state_dict(model, dtype, state)
    saved_dtype = dtype or model.embed_tokens.weight.dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    hf_config = config_to_hf(model.config, hf_dtype_name(saved_dtype))
    hf_config["deepsail"] = deepsail_section(model.config)
    with atomic_dir(path, carry=lambda name: name != "config.json" and not WEIGHT_FILES.match(name)) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata=meta)
                weight_map.update({name: file for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(path)


class HFCheckpoint:
    """`from_pretrained` and `save_pretrained`, mixed into `Transformer`."""

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
    ) -> Any:
        """Load an HF model directory (deepseek_v3, deepseek_v2, qwen2, llama) or a deepsail checkpoint.

        The model is built on the meta device and the checkpoint tensors are assigned into it, so weights are held
        in memory once. `dtype` (fp32/bf16/fp16 or a torch dtype) defaults to the checkpoint's own ("auto" too).
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory; expected an HF model directory with config.json")
        config = read_config(path)
        want = None if dtype is None or dtype == "auto" else to_dtype(dtype)
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.state_dict())
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        if len(model.mtp) and not any(k.startswith("mtp.") for k in _tensor_names(path, config)):
            # HF transformers writes num_nextn_predict_layers but not the MTP weights; the model is whole without them.
            warnings.warn(
                f"{path}: config.json declares {len(model.mtp)} MTP module(s) but the checkpoint has no MTP "
                "weights; loading without multi-token prediction",
                stacklevel=2,
            )
            model.mtp = torch.nn.ModuleList()
            model.config = config = config.replace(num_nextn_predict_layers=0)
            expected = {k: v for k, v in expected.items() if not k.startswith("mtp.")}
        state, saved_dtype = load_hf_state(path, config, expected, str(device))
        dtype = want or saved_dtype or torch.float32
        for k, t in state.items():
            state[k] = t.to(dtype=torch.float32 if k.endswith(_KEEP_FP32) else dtype, device=device)
        model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
        model.tie_weights()
        return model.eval()

    def save_pretrained(
        self, path: str | Path, dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB"
    ) -> Path:
        """config.json + model.safetensors that `transformers` and `ds.from_pretrained` load (see `save_hf`);
        above `max_shard_size` ("2GB", as transformers takes it) shards + model.safetensors.index.json."""
        return save_hf(self, path, dtype=dtype, max_shard_size=max_shard_size)


def _tensor_names(path: Path, config: ModelConfig) -> set[str]:
    """deepsail names of the tensors a checkpoint holds (headers only: no tensor is read)."""
    names = set()
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except Exception as e:
            raise ValueError(
                f"{file} is not a readable safetensors file ({e}); it may be truncated or "
                "overwritten. Restore it, or load an earlier checkpoint."
            ) from e
        for hf_name in keys:
            m = _EXPERT.match(hf_name)
            native = hf_to_native(config, m.group(1) if m else hf_name)
            if native is not None:
                names.add(native)
    return names
