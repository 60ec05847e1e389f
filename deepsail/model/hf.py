"""HF-format checkpoints: `from_pretrained` and `save_pretrained`, and the one name mapping between them.

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
import os
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepsail.model.config import ModelConfig
from deepsail.model.transformer import Transformer

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEEP_FP32 = ("e_score_correction_bias",)  # tiny and moved in 1e-3 steps: bf16 would swallow the updates


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# --- names ---------------------------------------------------------------------------------------------------------
def _native_to_hf(config: ModelConfig, name: str) -> str:
    L = config.num_hidden_layers
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        rest = rest.removeprefix("block.")
        if rest == "norm.weight":
            rest = "shared_head.norm.weight"
        return f"model.layers.{L + k}.{rest}"
    return name if name.startswith("lm_head.") else f"model.{name}"


def _hf_to_native(config: ModelConfig, name: str) -> str | None:
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
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path} holds only pickled weights (.bin/.pt); deepsail loads safetensors only, because "
                         "unpickling can run arbitrary code. Convert them with a trusted tool first.")
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _summarise(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def from_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> Transformer:
    """Loads an HF model directory (deepseek_v3, deepseek_v2, qwen2, llama) or a deepsail checkpoint.

    The model is built on the meta device and the checkpoint tensors are assigned into it, so weights are held in
    memory once. `dtype` defaults to the checkpoint's own.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; expected an HF model directory with config.json")
    hf_config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    config = ModelConfig.from_pretrained(path)
    if hf_config and "deepsail" in hf_config:
        config = config.replace(**hf_config["deepsail"])
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]

    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    unexpected: list[str] = []
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # derived from the config, some old checkpoints stored it
                m = _EXPERT.match(hf_name)
                native = _hf_to_native(config, m.group(1) if m else hf_name)
                if native is None:
                    continue
                tensor = f.get_tensor(hf_name)
                if dtype is None:
                    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
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
            raise ValueError(f"{prefix}: expected gate/up/down weights for experts 0..{n - 1}, found experts "
                             f"{sorted(per_expert)}")
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[e]["gate_proj"], per_expert[e]["up_proj"])) for e in range(n)])
        state[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(n)])
        per_expert.clear()
    if config.topk_method != "noaux_tc":  # V2 checkpoints have no balancing bias: it stays zero
        for name in [k for k in expected if k.endswith("e_score_correction_bias") and k not in state]:
            state[name] = torch.zeros(config.n_routed_experts)

    if len(model.mtp) and not any(k.startswith("mtp.") for k in state):
        # HF transformers writes num_nextn_predict_layers but not the MTP weights; the model is whole without them.
        warnings.warn(f"{path}: config.json declares {len(model.mtp)} MTP module(s) but the checkpoint has no MTP "
                      "weights; loading without multi-token prediction", stacklevel=2)
        model.mtp = torch.nn.ModuleList()
        model.config = config = config.replace(num_nextn_predict_layers=0)
        expected = {k: v for k, v in expected.items() if not k.startswith("mtp.")}
    missing = sorted(set(expected) - set(state))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(state) if k in expected and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_summarise(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarise(mismatched)}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json ({config.model_type}):\n  "
                         + "\n  ".join(problems))

    dtype = dtype or torch.float32
    for k, t in state.items():
        state[k] = t.to(dtype=torch.float32 if k.endswith(_KEEP_FP32) else dtype, device=device)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    return model.eval()


# --- save ----------------------------------------------------------------------------------------------------------
def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under DeepSeek/HF checkpoint names, experts split per expert."""
    config = model.config
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        keep = name.endswith(_KEEP_FP32) or dtype is None
        out[name] = t.detach().to(torch.float32 if name.endswith(_KEEP_FP32) else (t.dtype if keep else dtype)).contiguous()

    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("e_score_correction_bias") and config.topk_method != "noaux_tc":
            continue
        hf_name = _native_to_hf(config, name)
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


def save_pretrained(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 << 30) -> None:
    """Writes config.json + model.safetensors (sharded with an index above `max_shard_bytes`), atomically:
    everything goes to a sibling temp directory that replaces `path` only once complete."""
    path = Path(path)
    tensors = hf_state_dict(model, dtype)
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

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config = model.config.to_hf(_dtype_name(saved_dtype))
    hf_config["deepsail"] = {"mtp_loss_weight": model.config.mtp_loss_weight}
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
    for file in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _replace_dir(tmp, path)


def _replace_dir(new: Path, path: Path) -> None:
    """Swap `new` into `path`. Keeps files already in `path` that we did not write (e.g. a tokenizer)."""
    if path.exists():
        for item in path.iterdir():
            if item.name in ("config.json", "model.safetensors", "model.safetensors.index.json") or \
                    re.match(r"model-\d+-of-\d+\.safetensors", item.name):
                continue
            if not (new / item.name).exists():  # copy, not move: until the swap the old directory stays whole
                if item.is_dir():
                    shutil.copytree(item, new / item.name)
                else:
                    shutil.copy2(item, new / item.name)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
