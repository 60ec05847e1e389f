"""`ds.compile` and `ds.load`: a model compiled for its hot path, and saved as a static graph that runs without
deepsail.

    compiled = ds.compile(model, input_shape=(128, 512), optimize_for="inference")
    logits = compiled(input_ids).logits          # torch.compile'd forward, same outputs as the eager model
    compiled.save("optimized_model.ds")          # a torch.export program: input_ids [B, T] -> logits [B, T, V]
    program = ds.load("optimized_model.ds")      # or torch.export.load(path).module(): torch alone runs it

The saved program has dynamic batch and sequence dims (1 .. max_position_embeddings) and holds the weights; it
calls only aten operators, so a process that cannot import deepsail runs it (tested). Its MoE layers compute every
routed expert on every token and weight them by the gates (the same sum, no routing-dependent shapes: see
`Experts.dense`), E/K times the experts' FLOPs of the eager model — the price of a static graph.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsail.files import atomic_path

FORMAT = "deepsail.export/1"
META = "deepsail.json"  # the extra file inside the archive that says what the program is
GOALS = ("inference", "training")


class LogitsOnly(nn.Module):
    """What an exported program computes: input_ids [B, T] -> logits [B, T, V] (no cache, no losses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def refuse_untraceable(config: Any, what: str) -> None:
    """The options whose sizes depend on the data, which torch.export (and the ONNX export built on it) cannot trace:
    a clear error naming the field, not the exporter's data-dependent-guard traceback."""
    why = {
        "sparse_attention": "hybrid sparse attention selects a data-dependent number of blocks per query",
        "mod_capacity": "Mixture-of-Depths routes a data-dependent number of tokens through each routed block",
    }
    for field, reason in why.items():
        value = getattr(config, field, None)
        if value not in (None, "none", 0, 0.0):
            raise ValueError(
                f"{what} cannot trace ModelConfig.{field}={value!r}: {reason}. Serve the model with deepsail "
                "(generate, serve, the engine), or export a model trained without the option"
            )


def _check_shape(input_shape: Any) -> tuple[int, int]:
    if (
        not isinstance(input_shape, tuple | list)
        or len(input_shape) != 2
        or not all(isinstance(n, int) and n >= 1 for n in input_shape)
    ):
        raise ValueError(f"input_shape must be (batch, seq_len), two positive ints; got {input_shape!r}")
    return int(input_shape[0]), int(input_shape[1])


def export_program(model: nn.Module, input_shape: tuple[int, int] = (2, 16)) -> torch.export.ExportedProgram:
    """torch.export of `model`'s logits with dynamic batch and sequence dims, traced at `input_shape`."""
    B, T = _check_shape(input_shape)
    config = model.config
    refuse_untraceable(config, "torch.export")
    if T > config.max_position_embeddings:
        raise ValueError(f"input_shape seq_len {T} exceeds the model's max_position_embeddings")
    # A traced size of 1 would be specialised into the graph; trace at >= 2 and declare the range from 1.
    ids = torch.zeros(max(B, 2), max(T, 2), dtype=torch.long, device=model.embed_tokens.weight.device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("seq", min=1, max=config.max_position_embeddings)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(LogitsOnly(model), (ids,), dynamic_shapes=({0: batch, 1: seq},))
    finally:
        model.train(was_training)


def save_program(model: nn.Module, path: str | Path, input_shape: tuple[int, int] = (2, 16)) -> Path:
    """Export `model` (see `export_program`) and write the program to `path` atomically."""
    from deepsail.model.hf import config_to_hf

    program = export_program(model, input_shape)
    meta = {
        "format": FORMAT,
        "inputs": {"input_ids": ["batch", "seq"]},
        "outputs": {"logits": ["batch", "seq", "vocab"]},
    }
    meta["config"] = config_to_hf(model.config)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: any suffix, not only .pt2
        torch.export.save(program, f, extra_files={META: json.dumps(meta)})
    return path


def _refuse_pickles(path: Path) -> None:
    """torch.export.load unpickles (weights_only=False) any weight or constant its archive marks `use_pickle`:
    ds.load refuses such an archive rather than run code from a file. deepsail's own programs hold plain tensors
    only (raw bytes)."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/data/" in f"/{name}" and name.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                pickled = [fqn for fqn, entry in config.items() if isinstance(entry, dict) and entry.get("use_pickle")]
                if pickled:
                    raise ValueError(
                        f"{path} holds pickled tensors ({pickled[:3]}); ds.load never unpickles a file. Export the "
                        "model again with ds.compile(...).save() (plain tensors)."
                    )
            elif name.endswith(".pt") and "/data/weights/" in f"/{name}":
                raise ValueError(f"{path} stores its weights in the legacy pickled format ({name}); refusing to load")


def load(path: str | Path) -> nn.Module:
    """A saved program as a callable module: `ds.load(path)(input_ids) -> logits`. Needs torch only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; ds.load reads what `ds.compile(...).save(path)` wrote")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch.export program (not a zip archive); was it written by .save()?")
    try:
        _refuse_pickles(path)
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is a damaged torch.export program: {e}") from e
    extra = {META: ""}
    try:
        with open(path, "rb") as f:
            program = torch.export.load(f, extra_files=extra)
    except Exception as e:  # torch raises several types for a foreign or damaged archive
        raise ValueError(f"{path} is not a readable torch.export program: {type(e).__name__}: {e}") from e
    module = program.module()
    module.deepsail_meta = json.loads(extra[META]) if extra[META] else {}
    return module


class CompiledModel(nn.Module):
    """`model` with a torch.compile'd forward; `.save(path)` writes its torch.export program.

    inference: eval mode, no autograd, the graph specialised to `input_shape` (other shapes compile once each);
    training: the same compile the training loop's --compile applies (`parallel.parallelize.apply_compile`),
    autograd on: `compiled(ids, labels=labels).loss.backward()`, and `compiled.parameters()` for the optimizer.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int], optimize_for: str) -> None:
        super().__init__()
        from deepsail.parallel.parallelize import apply_compile

        self.model, self.input_shape, self.optimize_for = model, input_shape, optimize_for
        if optimize_for == "inference":
            model.eval()
            self._forward = torch.compile(model, dynamic=False)
        else:
            model.train()
            self._forward = apply_compile(model)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if self.optimize_for == "inference":
            with torch.no_grad():
                return self._forward(input_ids, **kwargs)
        return self._forward(input_ids, **kwargs)

    def save(self, path: str | Path) -> Path:
        return save_program(self.model, path, self.input_shape)


def compile(
    model: nn.Module, input_shape: tuple[int, int] = (1, 512), optimize_for: str = "inference"
) -> CompiledModel:
    """`ds.compile`: see the module docstring."""
    if optimize_for not in GOALS:
        raise ValueError(f"optimize_for must be one of {', '.join(GOALS)}; got {optimize_for!r}")
    if not hasattr(model, "config") or not hasattr(model, "embed_tokens"):
        raise ValueError(f"ds.compile takes a deepsail model (ds.Transformer / ds.from_pretrained), not {type(model)}")
    return CompiledModel(model, _check_shape(input_shape), optimize_for)
