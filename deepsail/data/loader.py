"""Batches for training: packed windows over token shards, and length-bucketed padded batches.

`PackedLoader` is for pretraining: the shards written by `deepsail data prepare` are one long token
stream per split (documents separated by EOS); a batch is B windows of T+1 tokens from it,
x = window[:-1], y = window[1:]. Window starts are multiples of T, so every token is a target
exactly once per epoch; their order is a fresh permutation each epoch, drawn from (seed, epoch)
alone, so a loader restored from `state_dict()` yields exactly the batches the uninterrupted one
would have. With `world_size` > 1 each rank takes every world_size-th window of the same order.

`BucketBatcher` is for variable-length data (SFT, classification, preference pairs): documents
of similar length are batched together under a token budget, and each batch is padded only to
its own longest document.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

MANIFEST = "manifest.json"


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST} in {str(data_dir)!r}; create the folder with `deepsail data prepare ... --out {data_dir}`"
        )
    return json.loads(path.read_text())


class TokenStream:
    """One split's shards, memory-mapped and read as one concatenated array of token ids."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {str(data_dir)!r}; it has {', '.join(self.manifest['splits'])}")
        self.split = split
        dtype = np.dtype(self.manifest["dtype"])
        # Memory maps cost nothing until read: the OS pages in only the windows we touch.
        self.shards = [
            np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r")
            for s in self.manifest["splits"][split]["shards"]
        ]
        for s, m in zip(self.manifest["splits"][split]["shards"], self.shards):
            if len(m) != s["tokens"]:
                raise ValueError(
                    f"{self.data_dir / s['file']} has {len(m)} tokens but the manifest says {s['tokens']}; "
                    "re-run `deepsail data prepare`"
                )
        self.offsets = np.cumsum([0] + [len(m) for m in self.shards]).tolist()  # where each shard starts in the stream
        self.n_tokens = self.offsets[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, crossing shard boundaries as needed."""
        assert 0 <= start and start + length <= self.n_tokens
        k = bisect.bisect_right(self.offsets, start) - 1
        pieces = []
        while length > 0:
            local = start - self.offsets[k]
            piece = self.shards[k][local : local + length]
            pieces.append(piece)
            start, length, k = start + len(piece), length - len(piece), k + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(
        self, starts: np.ndarray, seq_len: int, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [len(starts), seq_len] for windows of seq_len + 1 tokens starting at `starts`."""
        buf = np.stack([self.read(int(s), seq_len + 1) for s in starts]).astype(np.int64)
        xy = torch.from_numpy(buf)
        if torch.device(device).type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)  # pinned: the copy overlaps with compute
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


class PackedLoader:
    """Endless (x, y) batches of shape [batch_size, seq_len] from a prepared data folder.

    Iterate with `next(loader)` or `for x, y in loader` (it never stops by itself: the trainer
    decides the number of steps; `epoch` counts passes). `batches_per_epoch` and
    `tokens_per_epoch` are per rank.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.stream = TokenStream(data_dir, split)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.n_windows = max(self.stream.n_tokens - 1, 0) // seq_len  # each window also needs the token after it
        self.windows_per_rank = self.n_windows // world_size  # equal on every rank, so no rank waits on another
        self.batches_per_epoch = self.windows_per_rank // batch_size
        if self.batches_per_epoch == 0:
            need = batch_size * seq_len * world_size + 1
            raise ValueError(
                f"split {split!r} of {str(data_dir)!r} has {self.stream.n_tokens:,} tokens, fewer than one batch needs "
                f"(batch_size {batch_size} x seq_len {seq_len} x world_size {world_size} + 1 = {need:,}); "
                "lower batch_size or seq_len, or prepare more data"
            )
        self.tokens_per_epoch = self.batches_per_epoch * batch_size * seq_len
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`: a permutation seeded by (seed, epoch) only."""
        if self._order_epoch != epoch:
            # A full permutation costs 8 bytes per window: 80 MB for 10B tokens at seq_len 1024.
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order = perm[self.rank : self.windows_per_rank * self.world_size : self.world_size]
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        idx = self._epoch_order(self.epoch)[self.step * B : (self.step + 1) * B]
        x_BT, y_BT = self.stream.windows(idx * self.seq_len, self.seq_len, self.device)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return x_BT, y_BT

    def state_dict(self) -> dict:
        """Position of the next batch. The geometry is included so a mismatched restore fails loudly."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_tokens": self.stream.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_tokens": self.stream.n_tokens,
        }
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this loader has {value}; "
                    "an exact resume needs the same data and batch geometry"
                )
        if not 0 <= state["step"] < self.batches_per_epoch:
            raise ValueError(f"loader state step={state['step']} is outside [0, {self.batches_per_epoch})")
        self.epoch, self.step, self.seed = state["epoch"], state["step"], state["seed"]
        self._order_epoch = -1  # the seed may differ: redraw the order


class SegmentLoader:
    """Endless (x, y) batches that read the stream in order, for segment memory (model/memory.py): row b of every
    batch is the next `seq_len` tokens of lane b, lane b being the b-th of `batch_size` equal contiguous stretches
    of this rank's part of the stream (Transformer-XL's batchify). Documents therefore arrive whole and in order,
    segment after segment. `memory` (a SegmentMemory, set by the trainer) is saved and restored with the position,
    so a resumed run continues with the memory it had, and is reset whenever the lanes wrap to their start."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        self.stream = TokenStream(data_dir, split)
        self.batch_size, self.seq_len, self.world_size, self.device = batch_size, seq_len, world_size, device
        per_rank = self.stream.n_tokens // world_size
        self.lane = per_rank // batch_size
        self.batches_per_epoch = (self.lane - 1) // seq_len
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"split {split!r} of {str(data_dir)!r} has {self.stream.n_tokens:,} tokens: too few for "
                f"{batch_size} lanes x {world_size} ranks of at least seq_len + 1 = {seq_len + 1}; lower batch_size"
            )
        self.starts = np.arange(batch_size) * self.lane + rank * per_rank
        self.epoch, self.step = 0, 0
        self.memory: Any = None

    def __iter__(self) -> SegmentLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step == 0 and self.memory is not None:
            self.memory.reset()  # the lanes start over: nothing before this segment
        batch = self.stream.windows(self.starts + self.step * self.seq_len, self.seq_len, self.device)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        memory = self.memory.state_dict() if self.memory is not None else None
        return {"epoch": self.epoch, "step": self.step, "lane": self.lane, "memory": memory}

    def load_state_dict(self, state: dict) -> None:
        if state["lane"] != self.lane:
            raise ValueError(
                f"loader state was saved with lanes of {state['lane']} tokens but this loader's are {self.lane}; "
                "an exact resume needs the same data and batch geometry"
            )
        self.epoch, self.step = state["epoch"], state["step"]
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])


def eval_batches(
    data_dir: str | Path,
    batch_size: int,
    seq_len: int,
    split: str = "val",
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over a split in a fixed order (for validation loss); the last batch may be smaller.

    Every rank gets the same number of windows (rank r takes windows r, r + world_size, ...), so
    ranks that all-reduce after each batch stay in step.
    """
    stream = TokenStream(data_dir, split)
    n_windows = max(stream.n_tokens - 1, 0) // seq_len
    per_rank = n_windows // world_size
    if per_rank == 0:
        raise ValueError(
            f"split {split!r} of {str(data_dir)!r} has {stream.n_tokens:,} tokens, fewer than one window of "
            f"seq_len {seq_len} + 1 per rank (world_size {world_size}); lower seq_len or prepare more data"
        )
    windows = np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)
    for i, b in enumerate(range(0, per_rank, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield stream.windows(windows[b : b + batch_size] * seq_len, seq_len, device)


# -----------------------------------------------------------------------------
# Length-bucketed batches for variable-length data


class PaddedBatch(NamedTuple):
    input_ids: torch.Tensor  # [B, L] int64, right-padded with pad_id; L = the longest document in this batch
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens, 0 on padding
    lengths: torch.Tensor  # [B] int64
    indices: torch.Tensor  # [B] int64, positions of these documents in the batcher's `docs`


def length_buckets(
    lengths: Sequence[int] | np.ndarray, max_tokens: int, seed: int = 0, epoch: int = 0
) -> list[np.ndarray]:
    """Document indices grouped into batches whose padded size (count x longest) is <= max_tokens.

    Sort by length (ties broken by a seeded shuffle, so equal-length documents mix across epochs),
    cut greedily into batches under the budget, then shuffle the batch order: batches are
    homogeneous in length (little padding) while the order the model sees them in stays random.
    Every document is in exactly one batch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    order = perm[np.argsort(lengths[perm], kind="stable")]
    batches, start = [], 0
    for i, idx in enumerate(order):
        # Sorted ascending, so the newest document is the batch's longest.
        if (i + 1 - start) * lengths[idx] > max_tokens:
            batches.append(order[start:i])
            start = i
    if start < len(order):
        batches.append(order[start:])
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketBatcher:
    """Endless length-bucketed `PaddedBatch`es over in-memory token lists, resumable like `PackedLoader`.

    Each epoch covers every document exactly once (with world_size > 1, each rank takes every
    world_size-th batch and the last few batches that do not divide evenly are dropped).
    """

    def __init__(
        self,
        docs: Sequence[Sequence[int]],
        max_tokens: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.docs, self.max_tokens, self.pad_id = docs, max_tokens, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        if len(docs) == 0:
            raise ValueError("BucketBatcher got no documents")
        if (self.lengths == 0).any():
            raise ValueError(
                f"{int((self.lengths == 0).sum())} documents are empty (first: index "
                f"{int(np.argmax(self.lengths == 0))}); drop them first"
            )
        too_long = self.lengths > max_tokens
        if too_long.any():
            raise ValueError(
                f"{int(too_long.sum())} documents are longer than max_tokens={max_tokens} "
                f"(longest: {int(self.lengths.max())} tokens); "
                "raise max_tokens or truncate the documents"
            )
        self.epoch, self.step = 0, 0
        self._plan_epoch, self._plan = -1, []
        if len(self._epoch_plan(0)) == 0:
            raise ValueError(f"{len(docs)} documents make fewer batches than world_size={world_size}")

    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches (document indices) for `epoch`."""
        if self._plan_epoch != epoch:
            batches = length_buckets(self.lengths, self.max_tokens, self.seed, epoch)
            per_rank = len(batches) // self.world_size
            self._plan = batches[self.rank : per_rank * self.world_size : self.world_size]
            self._plan_epoch = epoch
        return self._plan

    @property
    def batches_per_epoch(self) -> int:
        """This epoch's number of batches (it can differ slightly between epochs)."""
        return len(self._epoch_plan(self.epoch))

    def __iter__(self) -> BucketBatcher:
        return self

    def __next__(self) -> PaddedBatch:
        return self.collate(self.next_indices())

    def next_indices(self) -> np.ndarray:
        """The next batch's document indices, advancing the position (for callers that collate their own way)."""
        plan = self._epoch_plan(self.epoch)
        idx = plan[self.step]
        self.step += 1
        if self.step == len(plan):
            self.epoch, self.step = self.epoch + 1, 0
        return idx

    def collate(self, idx: np.ndarray) -> PaddedBatch:
        lengths = self.lengths[idx]
        ids_BL = np.full((len(idx), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, i in enumerate(idx):
            ids_BL[row, : lengths[row]] = self.docs[i]
        mask_BL = (np.arange(ids_BL.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return PaddedBatch(
            torch.from_numpy(ids_BL),
            torch.from_numpy(mask_BL),
            torch.from_numpy(lengths.copy()),
            torch.from_numpy(np.asarray(idx, dtype=np.int64)),
        )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "world_size": self.world_size,
            "n_docs": len(self.docs),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("max_tokens", self.max_tokens), ("world_size", self.world_size), ("n_docs", len(self.docs))):
            if state[key] != mine:
                raise ValueError(
                    f"batcher state was saved with {key}={state[key]} but this batcher has {mine}; "
                    "an exact resume needs the same data and budget"
                )
        self.epoch, self.step, self.seed = state["epoch"], state["step"], state["seed"]
        self._plan_epoch = -1  # the seed may differ: redraw the plan
        if not 0 <= self.step < len(self._epoch_plan(self.epoch)):
            raise ValueError(
                f"batcher state step={self.step} is outside epoch {self.epoch}'s {len(self._plan)} batches"
            )
