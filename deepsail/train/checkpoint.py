"""Atomic checkpoints and exact resume.

A checkpoint is one directory, `<out>/checkpoints/step_000500/`, that is also a loadable model:

    config.json, model.safetensors   model.save_pretrained (HF layout; ds.from_pretrained reads it)
    tokenizer files                  the data's tokenizer, so the directory is self-contained
    optimizer.pt                     AdamW moments and step counts
    state.pt                         loader position, loss-scaler state, RNG states (python, numpy, torch, cuda)
    trainer_state.json               step, tokens seen, elapsed time, and the TrainConfig
    checksums.json                   size and sha256 of every file above, verified before a resume

Atomicity: everything is written into a hidden temporary folder, fsynced, then renamed in one
`os.replace` (atomic on POSIX; `deepsail.files.atomic_dir`), and only then is the `latest` pointer file
swapped the same way. A crash at any moment therefore leaves `latest` naming a complete checkpoint; a
half-written temporary is ignored and removed on resume. A checkpoint damaged after it was written (a
truncated or overwritten file) fails its checksums, and a resume falls back to the newest one that verifies.

Loading never unpickles arbitrary objects: weights come from safetensors, metadata from JSON, and
the two .pt files are read with `torch.load(weights_only=True)` (tensors and plain containers only).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsail.files import atomic_dir, atomic_write_text, remove

STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"  # the pointer file: one line, the name of the newest complete checkpoint
CHECKSUMS = "checksums.json"  # size and sha256 of every file, recorded at write time, verified on resume


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# --- RNG state: everything that could make two runs differ after the same step ---


def rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    return {
        # python and numpy states are converted to tensors/ints so weights_only loading accepts them
        "python": (version, torch.tensor(mt_state, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save ---


def save_checkpoint(
    root: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Any,
    trainer_state: dict[str, Any],
    tokenizer: Any = None,
    keep_last: int = 3,
    save_model: Callable[[nn.Module, Path], None] | None = None,
) -> Path:
    """Write `root/step_XXXXXX/` atomically, point `root/latest` at it, drop all but the last `keep_last`.

    `trainer_state` must hold "step"; it is stored as JSON with whatever else it carries.
    `loader` needs `state_dict()`; `tokenizer`, if given, needs `save(dir)`. `save_model(model, folder)` writes the
    weights (default `model.save_pretrained`; fine-tuning writes only what it trains, plus the adapter).
    """
    step = int(trainer_state["step"])
    final = root / checkpoint_name(step)
    with atomic_dir(final) as tmp:  # the commit point for the directory...
        (save_model or (lambda m, d: m.save_pretrained(d)))(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"loader": loader.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        write_checksums(tmp)
    atomic_write_text(root / LATEST, final.name + "\n")  # ...and for resume

    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


# --- integrity: what was written is what is read back ---


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record every file's size and sha256 (~1 GB/s, so ~0.1 s for a 40M-parameter model and its AdamW state)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    record = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": record}, indent=1) + "\n")


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is whole; else what is wrong with it, naming the file. Checkpoints written before
    checksums were recorded are only checked for their trainer state."""
    if not (path / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    if not (path / CHECKSUMS).is_file():
        return None
    try:
        files = json.loads((path / CHECKSUMS).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size:,} bytes but was written as {want['bytes']:,} (truncated or overwritten)"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written (corrupted or overwritten)"
    return None


def resumable_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under root that verifies: the one `latest` names, else the newest older one that is
    whole. Also a note per checkpoint passed over, saying why."""
    named = pointed_to(root)
    candidates = ([named] if named else []) + [p for p in reversed(list_checkpoints(root)) if p != named]
    notes = []
    for path in candidates:
        problem = verify_checkpoint(path) if path.is_dir() else "it does not exist"
        if problem is None:
            return path, notes
        notes.append(f"{path.name}: {problem}")
    return None, notes


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def pointed_to(root: Path) -> Path | None:
    """The folder `root/latest` names (whether or not it exists), None without a pointer: the one reader of it."""
    pointer = root / LATEST
    return root / pointer.read_text().strip() if pointer.is_file() else None


def latest_checkpoint(root: Path, need: str = "trainer_state.json") -> Path | None:
    """The checkpoint `root/latest` names, or None if there is none yet.

    `need` is the file that makes it usable: the trainer state to resume from, or config.json to load the model."""
    path = pointed_to(root)
    if path is None:
        return None
    pointer = root / LATEST
    if not (path / need).is_file():
        raise ValueError(
            f"{pointer} names {path.name}, which is missing or incomplete; point it at one of "
            f"{[p.name for p in list_checkpoints(root)]} or start a fresh --out."
        )
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A model folder as is; a training run folder (or its checkpoints/ folder) -> the checkpoint `latest` names."""
    p = Path(path)
    loadable = ("config.json", "adapter_config.json", "tuned.safetensors")  # a model, an adapter, a fine-tune's
    if any((p / name).is_file() for name in loadable):
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"  # a finished fine-tuning run: its merged model
    for root in (p / "checkpoints", p):
        if (root / LATEST).is_file():
            newest = pointed_to(root)
            need = next((n for n in loadable if newest is not None and (newest / n).is_file()), "config.json")
            return latest_checkpoint(root, need=need)
    raise ValueError(
        f"{str(p)!r} is neither a model directory (config.json + *.safetensors + tokenizer.json) nor a deepsail "
        "training run folder (with checkpoints/latest). Point at one of those, e.g. runs/base or "
        "runs/base/checkpoints/step_001000"
    )


def discard_newer(root: Path, step: int) -> None:
    """Before resuming from `step`: remove checkpoints past `step` and any debris of interrupted writes.

    Checkpoints past `step` belong to the interrupted timeline (a crash between the rename and the
    `latest` update leaves a complete but unreferenced newer directory); the resumed run rewrites
    them identically. Debris is everything else that is not `latest`: the hidden temporaries of writers
    that were killed (`deepsail.files`).
    """
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if p.name != LATEST and (m is None or int(m.group(1)) > step):
            remove(p)


# --- load ---


def load_checkpoint(
    path: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Any,
) -> dict[str, Any]:
    """Restore the training state `save_checkpoint` wrote; return the trainer_state dict.

    The model itself is `deepsail.model.from_pretrained(path)`: build the optimizer on it, then call this.
    """
    device = optimizer.param_groups[0]["params"][0].device
    optimizer.load_state_dict(load_pt(path / "optimizer.pt", device))
    state = load_pt(path / "state.pt", "cpu")
    loader.load_state_dict(state["loader"])
    if state["scaler"]:  # empty when saved without fp16; a resume may switch precision
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return read_trainer_state(path)


def load_pt(file: Path, device: Any) -> Any:
    """torch.load of tensors and plain containers only (never arbitrary objects), a damaged file named."""
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{file} is unreadable ({str(e).splitlines()[0][:200]}); the checkpoint is damaged. Resume "
            "from an earlier one (point latest at it) or start a fresh --out."
        ) from e


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The step, tokens, elapsed time and TrainConfig a checkpoint was saved with."""
    file = Path(path) / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{file} is unreadable ({e}); the checkpoint is damaged. Point {file.parent.parent}/latest "
            "at an earlier checkpoint, or start a fresh --out."
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{file} has no step; it was not written by deepsail's trainer.")
    return state


# --- sharded checkpoints (torchrun): torch.distributed.checkpoint ---------------------------------------------------
#
# A run under torchrun writes `step_XXXXXX/` as:
#     dcp/                       model + AdamW state, each rank writing its own shards (DCP's .distcp files and
#                                .metadata, which records every tensor's global shape: any mesh can read them back)
#     state_rank00000.pt ...     per rank: loader position, loss-scaler state, RNG states
#     config.json, tokenizer     the model's HF config and the data's tokenizer (no weights: `deepsail export hf RUN`
#                                gathers them into one HF folder)
#     trainer_state.json         step, tokens, elapsed time, the TrainConfig, and the mesh it was written from
#     checksums.json             as for one-process checkpoints
# Rank 0 opens the temporary folder (files.atomic_dir) and names it to the others; every rank writes into it; after
# a barrier rank 0 adds the metadata and checksums and renames it into place, then moves `latest`. The folder must
# be on a filesystem every rank sees (a multi-node run needs shared storage, as DCP's FileSystemWriter does).

SHARDED = "dcp"


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint was written by a torchrun run (DCP shards, no safetensors)."""
    return (Path(path) / SHARDED / ".metadata").is_file()


def _rank_state_file(folder: Path, rank: int) -> Path:
    return folder / f"state_rank{rank:05d}.pt"


def _dcp_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Optimizer state keyed by parameter name, with each parameter's own lr/betas/decay beside it: a reader whose
    # parameter groups differ (another mesh splits them by layout, optim.py) still finds every value.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_sharded_checkpoint(
    root: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Any,
    trainer_state: dict[str, Any],
    tokenizer: Any = None,
    keep_last: int = 3,
) -> Path:
    """Every rank calls this together; see the section comment above for the layout and the commit order."""
    import contextlib

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from deepsail.model.hf import config_to_hf

    rank, main = dist.get_rank(), dist.get_rank() == 0
    final = root / checkpoint_name(int(trainer_state["step"]))
    with atomic_dir(final) if main else contextlib.nullcontext() as tmp:
        name = [str(tmp) if main else None]
        dist.broadcast_object_list(name, src=0)
        folder = Path(name[0])
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder / SHARDED)
        state = {"loader": loader.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}
        torch.save(state, _rank_state_file(folder, rank))
        dist.barrier()  # every rank's shards are in the folder
        if main:
            hf_config = config_to_hf(model.config) | {"deepsail": {"mtp_loss_weight": model.config.mtp_loss_weight}}
            (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save(folder)
            (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
            write_checksums(folder)
    if main:
        atomic_write_text(root / LATEST, final.name + "\n")
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()  # no rank runs ahead of the rename
    return final


def load_sharded_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Any,
) -> dict[str, Any]:
    """Restore a sharded checkpoint into `model` and `optimizer` as they are laid out now (any mesh, or one
    process): DCP reads each tensor's slice this rank holds. Returns the trainer_state dict."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path / SHARDED)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_dcp_options()
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    # At another world size the ranks are other ranks: a rank without its own file takes rank 0's RNG (training
    # draws no random numbers after init; the loader position is the same on every rank).
    own = _rank_state_file(path, rank)
    extra = load_pt(own if own.is_file() else _rank_state_file(path, 0), "cpu")
    loader.load_state_dict(_regeometry(extra["loader"], loader))
    if extra["scaler"]:
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])
    return read_trainer_state(path)


def _regeometry(saved: dict[str, Any], loader: Any) -> dict[str, Any]:
    """A loader state saved at another data-parallel degree, for this loader: the same global batch
    (batch_size x ranks) reads the same windows in the same order at any degree (data/loader.py), so the position
    carries over when that product is unchanged."""
    if saved.get("world_size", 1) == loader.world_size:
        return saved
    was, now = saved["batch_size"] * saved["world_size"], loader.batch_size * loader.world_size
    if was != now:
        need = was // loader.world_size if was % loader.world_size == 0 else None
        fix = f"--batch-size {need}" if need else f"a data-parallel degree that divides {was}"
        raise ValueError(
            f"the run was saved with a global batch of {was} sequences ({saved['world_size']} data-parallel ranks x "
            f"{saved['batch_size']}), this launch reads {now} ({loader.world_size} x {loader.batch_size}); an exact "
            f"resume needs the same global batch: use {fix}."
        )
    return saved | {"batch_size": loader.batch_size, "world_size": loader.world_size}


def load_sharded_model(path: Path) -> nn.Module:
    """The whole model of a sharded checkpoint in this one process (on CPU, fp32 as trained), for export."""
    import torch.distributed.checkpoint as dcp

    from deepsail.model import Transformer
    from deepsail.model.hf import read_config

    with torch.device("meta"):
        model = Transformer(read_config(path))
    model.to_empty(device="cpu")
    model.tie_weights()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=Path(path) / SHARDED)  # in place into the model's own tensors
    return model.eval()
