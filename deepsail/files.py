"""Every file deepsail writes goes through here: written under a temporary name, flushed to disk, then renamed.

A reader, or the next run after a crash, sees the old file or the new one, never half of one: `os.replace` is atomic
on POSIX, and the fsync before it makes sure the bytes the new name points at are on disk (without it, a power cut
can publish a name whose data never arrived). Checkpoints, model folders, exports, metrics, plots, reports and
manifests all use these helpers, so there is one place that knows how.

    atomic_write_text(path, text)              small files (JSON, markdown, pointers)
    with atomic_path(path) as tmp: save(tmp)   writers that want a file name (safetensors, torch.save, savefig)
    with atomic_dir(path) as tmp: ...          a whole folder (a checkpoint, an HF model directory)

Temporary names are hidden siblings (`.name.tmp-<pid>`) on the same filesystem, so the rename never copies. A
writer that fails part way (an exception, Ctrl-C) removes its temporary; one killed outright leaves it behind, and
`remove_debris` clears such leftovers. A write that fails because the disk is full raises `DiskFull` (after the
partial files are gone), whichever library was writing: safetensors and torch.save do not say ENOSPC themselves.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
_FULL = 1 << 20  # a write that fails with less than this free has failed for lack of space


class DiskFull(OSError):
    """No space left on the device; the writer removed its partial files before raising this."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _disk_full(e: BaseException, folder: Path) -> bool:
    if isinstance(e, DiskFull) or not isinstance(e, Exception):
        return False
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "os error 28" in str(e):
        return True
    try:  # torch.save reports a full disk as "unexpected pos 576 vs 534"
        return shutil.disk_usage(folder).free < _FULL
    except OSError:
        return False


def _fail(e: BaseException, tmp: Path, path: Path) -> None:
    """Remove the temporary; turn a full disk, however the writing library said it, into DiskFull."""
    full = _disk_full(e, path.parent)
    remove(tmp)
    if full:
        free = shutil.disk_usage(path.parent).free
        raise DiskFull(
            f"no space left on the device writing {path} ({free / 2**20:.1f} MiB free once the partial files were "
            "removed; nothing half-written was left)"
        ) from e


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, so a rename publishes data that is on disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: Path, path: Path) -> None:
    """Make the finished file `tmp` durable and give it the name `path` (for writers that stream into a
    `temp_sibling` over many calls, such as token shards; everyone else uses `atomic_path`)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; once the block succeeds, the file replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException as e:
        _fail(e, tmp, path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; once the block succeeds, it replaces the folder `path`.

    `carry(name)` says which entries of an existing `path` that the block did not write are kept (copied, not
    moved: until the swap the old folder stays whole). The swap is two renames: old folder aside, new one in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if carry is not None and path.is_dir():
            for item in path.iterdir():
                if carry(item.name) and not (tmp / item.name).exists():
                    if item.is_dir():
                        shutil.copytree(item, tmp / item.name)
                    else:
                        shutil.copy2(item, tmp / item.name)
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        _fail(e, tmp, path)
        raise
    fsync_dir(path.parent)


def check_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`path` may become a folder: a file standing there is a clear error now, not a traceback half way through."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")
    return path


def check_run_folder(path: str | os.PathLike, resume: bool) -> Path:
    """A run's --out: a new (or empty) folder, or with `resume` the folder of the run to continue."""
    path = check_folder(path)
    if not resume and path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{path} already holds files; pass --resume to continue that run, or choose a new --out.")
    return path


def ensure_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `path` as a folder (see `check_folder`)."""
    path = check_folder(path, flag)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_debris(name: str) -> bool:
    """A temporary or set-aside entry left by a writer that was killed before it could clean up."""
    return name.startswith(".") and (TMP_MARK in name or ".old-" in name)


def remove_debris(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.iterdir():
            if is_debris(p.name):
                remove(p)
