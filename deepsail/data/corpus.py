"""Where text comes from: the embedded default corpus, and the user's own files.

The default corpus is real text that exists on every machine that runs deepsail, with no
download: the running interpreter's standard library. On CPython 3.11 that is 531 `.py` files
(9.1 MB of code, docstrings and comments) plus 79 pages of English help text (the `pydoc`
topics, 0.46 MB): 9.5 MB, ~2.4M tokens with an 8k vocabulary. Enough to train a small tokenizer
and a small model whose loss curve means something.

What is kept, and why:
  - every `.py` file under `sysconfig.get_paths()["stdlib"]`, except
    - `site-packages/`: third-party code, differs from machine to machine;
    - `test/`, `tests/`, `idle_test/`: test suites, full of deliberately odd or broken inputs;
    - `idlelib/`, `lib2to3/`: an application and a Python-2 era tool, not library code;
    - `__pycache__/` and the generated files (`_sysconfigdata_*.py`, and the 65 `encodings/`
      charmap codecs written by gencodec.py, which are ~1.4 MB of hex tables, not text);
  - `pydoc_data/topics.py` is not read as code: each of its help topics becomes one document
    (its key is `pydoc_data/topics.py#<topic>`), so English help text lands in both splits.

The train/val split is by file: a file is in val when the hash of its relative path falls in
the lowest `VAL_FRACTION` of the hash range. That depends only on the path, never on directory
listing order, so the split is the same on every machine with the same Python version, and a
file is never in both splits. (Different Python versions ship different files: the manifest
written by `deepsail data prepare` records the version.)
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

VAL_FRACTION = 0.02  # ~10 of ~610 documents (~43k tokens): a stable val loss without starving training
MIN_VAL_DOCS = 4  # guaranteed even if the hash draws fewer (on a stripped-down interpreter, say)
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "__pycache__"}
TOPICS_FILE = "pydoc_data/topics.py"

# Extensions that `iter_documents` reads when it walks a folder (an explicitly named file is read
# whatever its extension: .jsonl and .parquet by their format, anything else as plain text).
TEXT_SUFFIXES = (".txt", ".md", ".py")
FOLDER_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    """One document: `source` says where it came from (a path, `path:line` or `path#row`)."""

    source: str
    text: str


def split_of(key: str, val_fraction: float) -> str:
    """'val' or 'train' for a key (a relative path, or a document's text), decided by its hash alone."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


# -----------------------------------------------------------------------------
# The default corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_generated(rel: str, text: str) -> bool:
    if rel.startswith("_sysconfigdata_"):
        return True
    return rel.startswith("encodings/") and "with gencodec.py" in text[:300]


@lru_cache(maxsize=1)
def _all_default_documents() -> tuple[tuple[Document, ...], int]:
    """Every document of the default corpus, sorted by source, and how many files were undecodable."""
    root = stdlib_root()
    docs: list[Document] = []
    undecodable = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if EXCLUDED_DIRS.intersection(rel.split("/")[:-1]):
            continue
        if rel == TOPICS_FILE:
            continue  # read below as help text, one document per topic
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        if text.strip() and not _is_generated(rel, text):
            docs.append(Document(rel, text))
    # The pydoc topics: parse the `topics = {...}` literal out of the file rather than importing
    # `pydoc_data.topics`, so the corpus is this interpreter's stdlib even if another copy shadows it.
    topics_path = root / TOPICS_FILE
    if topics_path.exists():
        for node in ast.parse(topics_path.read_text("utf-8")).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["topics"]:
                for name, text in sorted(ast.literal_eval(node.value).items()):
                    docs.append(Document(f"{TOPICS_FILE}#{name}", text))
    if not docs:
        raise ValueError(
            f"found no Python source under {root} (sysconfig's stdlib path); this interpreter ships "
            "without its standard library sources, so pass your own text files instead"
        )
    docs.sort(key=lambda d: d.source)
    return tuple(docs), undecodable


def _default_split(docs: Iterable[Document]) -> dict[str, str]:
    """source -> split. Threshold on the path hash, topped up to MIN_VAL_DOCS by lowest hash."""
    docs = list(docs)
    split = {d.source: split_of(d.source, VAL_FRACTION) for d in docs}
    n_val = sum(s == "val" for s in split.values())
    if n_val < MIN_VAL_DOCS:
        by_hash = sorted(docs, key=lambda d: hashlib.sha1(d.source.encode()).digest())
        for d in by_hash[:MIN_VAL_DOCS]:
            split[d.source] = "val"
    return split


def default_corpus(split: str = "train", max_bytes: int | None = None) -> list[Document]:
    """The embedded default corpus (see the module docstring), one split of it, sorted by source.

    `max_bytes` keeps a deterministic sample of whole files (chosen by path hash, so the same
    files for the same budget) whose UTF-8 size stays within the budget: for fast runs and tests.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    docs, undecodable = _all_default_documents()
    if undecodable:
        warnings.warn(f"default corpus: skipped {undecodable} stdlib files that are not valid UTF-8", stacklevel=2)
    assignment = _default_split(docs)
    chosen = [d for d in docs if assignment[d.source] == split]
    if max_bytes is not None:
        budget, kept = max_bytes, set()
        for d in sorted(chosen, key=lambda d: hashlib.sha1(d.source.encode()).digest()):
            size = len(d.text.encode("utf-8", "surrogatepass"))
            if size <= budget:
                kept.add(d.source)
                budget -= size
        chosen = [d for d in chosen if d.source in kept]
    return chosen


@dataclass(frozen=True)
class CorpusInfo:
    root: str
    python: str
    files: dict[str, int]  # documents per split
    bytes: dict[str, int]  # UTF-8 bytes per split
    undecodable: int


def default_corpus_info() -> CorpusInfo:
    """Size of the default corpus per split, for reports and manifests."""
    docs, undecodable = _all_default_documents()
    assignment = _default_split(docs)
    files = {"train": 0, "val": 0}
    sizes = {"train": 0, "val": 0}
    for d in docs:
        files[assignment[d.source]] += 1
        sizes[assignment[d.source]] += len(d.text.encode("utf-8", "surrogatepass"))
    return CorpusInfo(str(stdlib_root()), sys.version.split()[0], files, sizes, undecodable)


# -----------------------------------------------------------------------------
# The user's files: text, JSONL, parquet, and folders of them


@dataclass
class SkipCounts:
    """Documents (or whole files) that were skipped, by reason, with the first example of each.

    Everything that is not read is counted here, so a run can never be silently short of data.
    """

    undecodable: int = 0  # not valid UTF-8 (a text file, or one JSONL line)
    empty: int = 0  # empty or whitespace-only text
    malformed_json: int = 0  # a JSONL line that does not parse as JSON
    missing_text_field: int = 0  # a JSON object or parquet file without the text field (or with a non-string value)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str, n: int = 1) -> None:
        setattr(self, reason, getattr(self, reason) + n)
        self.examples.setdefault(reason, where)

    @property
    def total(self) -> int:
        return self.undecodable + self.empty + self.malformed_json + self.missing_text_field

    def to_dict(self) -> dict:
        return {
            "undecodable": self.undecodable,
            "empty": self.empty,
            "malformed_json": self.malformed_json,
            "missing_text_field": self.missing_text_field,
            "examples": dict(self.examples),
        }

    def summary(self) -> str:
        parts = [
            f"{getattr(self, k)} {k.replace('_', ' ')}"
            for k in ("undecodable", "empty", "malformed_json", "missing_text_field")
            if getattr(self, k)
        ]
        firsts = "; ".join(f"first {k.replace('_', ' ')}: {v}" for k, v in self.examples.items())
        return f"skipped {self.total} documents ({', '.join(parts)}); {firsts}"


def input_files(item: str | Path) -> list[Path]:
    """The files one input stands for (a folder is walked recursively, in sorted order)."""
    path = Path(item)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES)
        if not found:
            raise ValueError(
                f"folder {str(path)!r} contains no {'/'.join('*' + s for s in FOLDER_SUFFIXES)} files; "
                "point at the files themselves if they have another extension"
            )
        return found
    if path.is_file():
        return [path]
    raise ValueError(
        f"input {str(path)!r} does not exist (expected a text, .jsonl or .parquet file, or a folder of them)"
    )


def _read_text_file(path: Path, skips: SkipCounts) -> Iterator[Document]:
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: drop a byte-order mark if there is one
    except UnicodeDecodeError as e:
        skips.add("undecodable", f"{path} (byte {e.start})")
        return
    if not text.strip():
        skips.add("empty", str(path))
        return
    yield Document(str(path), text)


def _read_jsonl(path: Path, text_field: str, skips: SkipCounts) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines separate nothing in JSONL; not a document, so not a skip
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                skips.add("undecodable", where)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skips.add("malformed_json", where)
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.add("missing_text_field", f"{where} (no string field {text_field!r})")
            elif not text.strip():
                skips.add("empty", where)
            else:
                yield Document(where, text)


def _read_parquet(path: Path, text_field: str, skips: SkipCounts) -> Iterator[Document]:
    import pyarrow.parquet as pq  # lazy: only runs that read parquet pay for the import

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        skips.add("missing_text_field", f"{path} (columns: {', '.join(pf.schema_arrow.names)})", n=pf.metadata.num_rows)
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{path}#{row}"
            row += 1
            if not isinstance(text, str):
                skips.add("missing_text_field", f"{where} (not a string)")
            elif not text.strip():
                skips.add("empty", where)
            else:
                yield Document(where, text)


def iter_documents(
    inputs: Iterable[str | Path], text_field: str = "text", skips: SkipCounts | None = None
) -> Iterator[Document]:
    """Documents from files and folders, in sorted path order, one per text file / JSONL line / parquet row.

    Bad documents are skipped and counted in `skips`. A missing input, or an input (file or
    folder) that yields no document at all, is a ValueError: it is almost certainly a wrong path
    or a wrong `text_field`, and a run on less data than asked for would be silently wrong.
    """
    skips = skips if skips is not None else SkipCounts()
    inputs = list(inputs)
    files = [input_files(item) for item in inputs]  # check every input exists before reading any
    for item, paths in zip(inputs, files):
        n = 0
        for path in paths:
            if path.suffix == ".jsonl":
                reader = _read_jsonl(path, text_field, skips)
            elif path.suffix == ".parquet":
                reader = _read_parquet(path, text_field, skips)
            else:
                reader = _read_text_file(path, skips)
            for doc in reader:
                n += 1
                yield doc
        if n == 0:
            raise ValueError(f"input {str(item)!r} has no usable documents ({skips.summary()})")
