"""ONNX: one graph that prefills and decodes, so a generation loop runs in onnxruntime alone.

    deepsail export onnx runs/default --out model.onnx

The graph is the model's stateless form (`Transformer.forward(..., past=)`), exported with PyTorch's dynamo
exporter (torch.export -> onnxscript), every dim that varies dynamic:

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64 (0 = left padding),
             past.{i} per layer: [batch, past, kv_lora_rank + rope_dim] (MLA: the latent cache, ~1/28 of
             per-head keys and values for DeepSeek-V3), or past.{i}.key and past.{i}.value, each
             [batch, past, kv_heads, head_dim]
    outputs  logits [batch, seq, vocab], present.* (past with the new tokens appended)

Prefill passes past of length 0; each decode step passes the last step's present. The model's description
(`deepsail.config`, `deepsail.past`) is in the file's metadata, so `OnnxGenerator` needs only the .onnx file.
MoE layers run every routed expert on every token, combined by the gates (`Experts.dense`): the same sums with
no routing-dependent shapes, at E/K times the experts' FLOPs. Weights are fp32.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsail.export.pt2 import refuse_untraceable
from deepsail.files import atomic_path

ONNX_LIMIT = 2 << 30  # protobuf's 2 GiB: a bigger model's weights go to `<out>.data` beside it


class PastGraph(nn.Module):
    """The exported computation: (input_ids, attention_mask, *past) -> (logits, *present), flat tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.per_layer = 1 if model.config.attention_type == "mla" else 2

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> Any:
        k = self.per_layer
        layers = [tuple(past[i : i + k]) for i in range(0, len(past), k)]
        out = self.model(input_ids, past=layers, attention_mask=attention_mask)
        return (out.logits, *[t for layer in out.present for t in layer])


def past_names(config: Any, prefix: str = "past") -> list[str]:
    if config.attention_type == "mla":
        return [f"{prefix}.{i}" for i in range(config.num_hidden_layers)]
    return [f"{prefix}.{i}.{kv}" for i in range(config.num_hidden_layers) for kv in ("key", "value")]


def past_shape(config: Any) -> list[int]:
    """The trailing dims of one past tensor (after [batch, past])."""
    if config.attention_type == "mla":
        return [config.kv_lora_rank + config.qk_rope_head_dim]
    return [config.num_key_value_heads, config.head_dim]


def export_onnx(model: nn.Module, out: str | Path) -> Path:
    """Write `model` (fp32, eval) as the ONNX graph described above to `out`, atomically."""
    from deepsail.model.hf import config_to_hf

    _require("onnx", "onnxscript")
    config = model.config
    refuse_untraceable(config, "The ONNX export (torch.export)")
    if model.embed_tokens.weight.dtype != torch.float32:
        raise ValueError(
            f"export_onnx writes fp32 graphs; this model is {model.embed_tokens.weight.dtype}: pass model.float()"
        )
    device = model.embed_tokens.weight.device
    B, T, P = 2, 3, 4  # trace sizes: any >= 2, so none is specialised into the graph
    past = [torch.zeros(B, P, *past_shape(config), device=device) for _ in past_names(config)]
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    mask = torch.ones(B, P + T, dtype=torch.long, device=device)
    dyn = torch.export.Dim.DYNAMIC
    dynamic_shapes = {
        "input_ids": {0: dyn, 1: dyn},
        "attention_mask": {0: dyn, 1: dyn},
        "past": tuple({0: dyn, 1: dyn} for _ in past),
    }
    names = past_names(config)
    was_training = model.training
    model.eval()
    try:
        program = _export(model, ids, mask, past, dynamic_shapes, names)
    finally:
        model.train(was_training)
    program.model.metadata_props["deepsail.config"] = json.dumps(config_to_hf(config))
    program.model.metadata_props["deepsail.past"] = json.dumps({"names": names, "shape": past_shape(config)})
    out = Path(out)
    weights = sum(p.numel() * 4 for p in model.parameters())
    if weights >= ONNX_LIMIT:
        data = out.with_name(out.name + ".data")
        # Weights first, the graph that names them last: a crash between the two leaves no graph.
        with atomic_path(out) as tmp:
            program.save(tmp, external_data=True)
            staged = tmp.with_name(tmp.name + ".data")
            with atomic_path(data) as data_tmp:
                staged.replace(data_tmp)
            _point_at(tmp, data.name)
    else:
        with atomic_path(out) as tmp:
            program.save(tmp, external_data=False)
    return out


def _export(model: nn.Module, ids: Any, mask: Any, past: Any, dynamic_shapes: Any, names: list[str]) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and torchvision notices are not ours
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            PastGraph(model),
            (ids, mask, *past),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", *names],
            output_names=["logits", *past_names(model.config, "present")],
            optimize=True,
            verbose=False,
        )
    return program


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"ONNX needs {', '.join(missing)}: pip install 'deepsail[export]' (onnx, onnxscript, onnxruntime)"
        )


def _point_at(graph: Path, data_name: str) -> None:
    """Rewrite the external-data locations in `graph` to `data_name` (they were saved under the temp name)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save(proto, str(graph))


class OnnxGenerator:
    """Greedy generation with onnxruntime and numpy only, from the .onnx file alone (its metadata describes it).

    `generate([[1, 2, 3], [4, 5]], max_new_tokens=16)` left-pads the batch, prefills with an empty past, then feeds
    each step's present back as the next past. `logits` of every step are kept in `.step_logits` for parity checks.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        _require("onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "deepsail.past" not in meta:
            raise ValueError(f"{path} is not a deepsail ONNX export (no deepsail.past metadata)")
        past = json.loads(meta["deepsail.past"])
        self.config = json.loads(meta["deepsail.config"])
        self.past_names, self.past_shape = past["names"], past["shape"]
        self.step_logits: list[np.ndarray] = []

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None) -> list[list[int]]:
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, width = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((B, width), np.int64)
        mask = np.zeros((B, width), np.int64)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1
        past = {n: np.zeros((B, 0, *self.past_shape), np.float32) for n in self.past_names}
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(B, bool)
        self.step_logits = []
        for _ in range(max_new_tokens):
            logits, *present = self.session.run(None, {"input_ids": ids, "attention_mask": mask, **past})
            self.step_logits.append(logits[:, -1])
            nxt = logits[:, -1].argmax(-1)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
                    done[b] = eos_id is not None and int(nxt[b]) == eos_id
            if done.all():
                break
            past = dict(zip(self.past_names, present))
            ids, mask = nxt[:, None].astype(np.int64), np.concatenate((mask, np.ones((B, 1), np.int64)), axis=1)
        return out
