"""Tokenize text once into memory-mapped token shards: `deepsail data prepare`.

Output folder layout:

    manifest.json     what is in the shards and how they were made (see `prepare`)
    train_0000.bin    raw token ids, uint16 when the vocabulary fits (<= 65,536 ids), else uint32
    train_0001.bin    ...
    val_0000.bin

Every document is followed by EOS, and the shards of a split, concatenated in order, are one long
token stream: `PackedLoader` cuts fixed-length windows out of it, so a window may span documents
and EOS tells the model where one ends. A shard is closed once it holds at least `shard_tokens`
tokens, always on a document boundary, so each shard's document count is exact.

Which split a document goes to:
  - the embedded default corpus: its fixed split by file path (see `corpus.py`);
  - your files: by the hash of the document's text, with probability `val_fraction`. Identical
    documents therefore land in the same split, so exact duplicates never leak from train into val.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from deepsail.data.corpus import (
    Document,
    SkipCounts,
    default_corpus,
    default_corpus_info,
    input_files,
    iter_documents,
    split_of,
)
from deepsail.data.loader import MANIFEST
from deepsail.data.tokenizer import Tokenizer
from deepsail.files import atomic_write_json, check_folder, ensure_folder, publish, remove, remove_debris, temp_sibling

FORMAT = "deepsail.tokens.v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: halving the bytes per token halves the I/O."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends documents (already ending in EOS) to `{split}_{i:04d}.bin` files."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens", "docs"} per closed shard
        self._file = None
        self._path = out
        self._tokens = 0
        self._docs = 0

    def add(self, docs: Sequence[Sequence[int]]) -> None:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter(chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        i, pos = 0, 0
        while i < len(docs):
            if self._file is None:
                self._path = self.out / f"{self.split}_{len(self.shards):04d}.bin"
                self._file = open(temp_sibling(self._path), "wb")
            # Take documents up to and including the one that fills the shard.
            cum = np.cumsum(lengths[i:])
            k = min(int(np.searchsorted(cum, self.shard_tokens - self._tokens, side="left")) + 1, len(docs) - i)
            n = int(cum[k - 1])
            flat[pos : pos + n].tofile(self._file)
            self._tokens += n
            self._docs += k
            i, pos = i + k, pos + n
            if self._tokens >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            publish(Path(self._file.name), self._path)
            self.shards.append({"file": self._path.name, "tokens": self._tokens, "docs": self._docs})
            self._file, self._tokens, self._docs = None, 0, 0

    def abort(self) -> None:
        """Remove every shard this writer made (the one being written included)."""
        if self._file is not None:
            self._file.close()
            remove(Path(self._file.name))
            self._file = None
        for s in self.shards:
            remove(self.out / s["file"])

    def finish(self) -> dict:
        self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "docs": sum(s["docs"] for s in self.shards),
            "shards": self.shards,
        }


def _chunks(
    docs: Iterable[tuple[str, Document]], max_docs: int = 512, max_chars: int = 8_000_000
) -> Iterator[list[tuple[str, Document]]]:
    """Groups of (split, document) big enough to keep every core busy in `encode_batch`."""
    chunk: list[tuple[str, Document]] = []
    chars = 0
    for item in docs:
        chunk.append(item)
        chars += len(item[1].text)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def prepare(
    inputs: Sequence[str | Path] | None,
    tokenizer: str | Path | Tokenizer,
    out: str | Path,
    text_field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    max_bytes: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (or the embedded default corpus when `inputs` is empty) into shards in `out`.

    Returns the manifest, which is also written to `out/manifest.json`: tokenizer fingerprint,
    vocab size and special ids, dtype, per split the shard files with token and document counts,
    the sources, and the skipped-document counts. Old shards in `out` are removed first, so a
    folder never mixes two runs. `max_bytes` caps the default corpus (a deterministic file sample).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    check_folder(out)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if tok.eos_id is None:
        raise ValueError(
            "the tokenizer has no EOS token (`eos_token` in tokenizer_config.json); documents need one between them"
        )
    dtype = token_dtype(tok.vocab_size)
    skips = SkipCounts()

    # Where the documents come from, each tagged with its split.
    if inputs:
        sources = [str(p) for p in inputs]
        for item in inputs:
            input_files(item)  # a missing path fails here, before `out` is touched
        user_docs = iter_documents(inputs, text_field=text_field, skips=skips)
        tagged: Iterable[tuple[str, Document]] = ((split_of(d.text, val_fraction), d) for d in user_docs)
        total_docs = None
    else:
        info = default_corpus_info()
        sources = [f"embedded:python-{info.python}-stdlib ({info.root})"]
        corpus = {s: default_corpus(s, max_bytes=max_bytes) for s in SPLITS}
        tagged = [(s, d) for s in SPLITS for d in corpus[s]]
        total_docs = len(tagged)

    out = ensure_folder(out)
    for old in [out / MANIFEST, *out.glob("train_*.bin"), *out.glob("val_*.bin")]:
        old.unlink(missing_ok=True)
    remove_debris(out)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        TextColumn(
            "{task.fields[docs]:,} docs ({task.fields[docs_s]:,.0f}/s)  "
            "{task.fields[tokens]:,} tokens ({task.fields[tok_s]:,.0f}/s)"
        ),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    t0 = time.perf_counter()
    n_docs = n_tokens = n_bytes = 0
    try:
        with bar:
            task = bar.add_task("prepare", total=total_docs, docs=0, docs_s=0.0, tokens=0, tok_s=0.0)
            for chunk in _chunks(tagged):
                # split_special_tokens: a document that contains the text "<|eos|>" must not inject an EOS.
                ids = tok.encode_batch([d.text for _, d in chunk], split_special_tokens=True)
                for split in SPLITS:
                    docs = [i + [tok.eos_id] for (s, _), i in zip(chunk, ids) if s == split]
                    if docs:
                        writers[split].add(docs)
                n_docs += len(chunk)
                n_tokens += sum(len(i) + 1 for i in ids)
                n_bytes += sum(len(d.text.encode("utf-8", "surrogatepass")) for _, d in chunk)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.update(
                    task, advance=len(chunk), docs=n_docs, docs_s=n_docs / dt, tokens=n_tokens, tok_s=n_tokens / dt
                )
    except BaseException:
        for w in writers.values():  # no half-written shards left behind to be mistaken for data
            w.abort()
        raise
    seconds = time.perf_counter() - t0

    splits = {s: w.finish() for s, w in writers.items()}
    manifest = {
        "format": FORMAT,
        "tokenizer": {
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "path": str(tokenizer) if not isinstance(tokenizer, Tokenizer) else None,
        },
        "dtype": dtype.name,
        "splits": splits,
        "sources": sources,
        "text_field": text_field if inputs else None,
        "val_fraction": val_fraction if inputs else None,
        "skipped": skips.to_dict(),
        "bytes": n_bytes,
        "seconds": round(seconds, 3),
        "python": sys.version.split()[0],
    }
    atomic_write_json(out / MANIFEST, manifest)  # appears last and whole: its presence means the shards are complete

    if progress:
        console.print(
            f"{n_docs:,} docs, {n_bytes / 1e6:,.1f} MB -> {n_tokens:,} tokens "
            f"({n_bytes / max(n_tokens, 1):.2f} bytes/token) "
            f"in {seconds:.1f}s ({n_tokens / max(seconds, 1e-9):,.0f} tok/s); "
            f"train {splits['train']['tokens']:,} / val {splits['val']['tokens']:,} tokens in {out}/"
        )
    if skips.total:
        console.print(f"[yellow]warning:[/yellow] {skips.summary()}")
    if val_fraction > 0 and splits["val"]["docs"] == 0:
        console.print(
            f"[yellow]warning:[/yellow] no document fell in the val split (val_fraction={val_fraction}); "
            "add data or raise --val-fraction"
        )
    return manifest


# -----------------------------------------------------------------------------
# The CLI verb: `deepsail data prepare`


def data_prepare(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Text/.md/.py files, .jsonl, .parquet, or folders of them (recursive). Default: the embedded corpus."
        ),
    ] = None,
    tokenizer: Annotated[
        Path, typer.Option(help="Tokenizer folder (tokenizer.json), e.g. from `deepsail tokenizer train`.")
    ] = Path("tokenizer"),
    out: Annotated[Path, typer.Option(help="Output folder for the .bin shards and manifest.json.")] = Path("data"),
    text_field: Annotated[str, typer.Option(help="JSONL field / parquet column holding the text.")] = "text",
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of your documents (by text hash) held out for validation.")
    ] = 0.01,
    shard_tokens: Annotated[
        int, typer.Option(help="Tokens per shard file (shards end on document boundaries).")
    ] = 100_000_000,
    max_bytes: Annotated[
        int | None, typer.Option(help="Embedded corpus only: use at most this many bytes (for quick runs).")
    ] = None,
) -> None:
    """Tokenize text into memory-mapped token shards (+ manifest.json) for training.

    \b
    Examples:
      deepsail data prepare --tokenizer tok --out data              # the embedded corpus
      deepsail data prepare my_docs/ corpus.jsonl --tokenizer tok --out data --val-fraction 0.02
      deepsail data prepare table.parquet --text-field body --tokenizer tok --out data
    """
    prepare(
        inputs,
        tokenizer,
        out,
        text_field=text_field,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        max_bytes=max_bytes,
    )
