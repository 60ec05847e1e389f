"""Embedded fine-tuning data: instruction pairs and a classification task mined from the standard library.

`deepsail sft` and `deepsail finetune --task classify` need labelled data; like the pretraining
corpus (`corpus.py`), these datasets are mined from the running interpreter's standard library,
so they exist on every machine with no download. They read exactly the corpus's files (same
exclusions: no tests, no site-packages, no generated codecs; the pydoc help topics are not code
and are not used here). Measured on CPython 3.11.7 (531 files):

`docstring_chats`: "write the function this docstring describes" pairs, 2510 train / 69 val
(max_chars=2000; median prompt 222 characters, median answer 315). One pair per public
top-level function or method (methods of nested classes included, never functions nested in
functions) with a docstring, where
  - "public" means no component of `Class.name` starts with a single underscore: `_helper` and
    `__mangled` are implementation details whose docstrings talk about internal state; dunders
    (`__init__`, `__eq__`) are kept. Private *modules* (`_pydecimal.py`, `_pyio.py`) are kept:
    they are the best-documented pure-Python code in the stdlib;
  - the body has at least 2 statements besides the docstring (`return self._x` teaches nothing);
  - neither the docstring nor the answer is longer than `max_chars`.
The prompt names the function with its arguments (`ast.unparse` of the def's arguments, so the
answer's def line is determined) and gives the cleaned docstring (`ast.get_docstring`). The
answer is the function's source, decorators included, dedented, *with the docstring's lines cut
out* (and the blank lines right after it): otherwise the model could copy half its answer from
the prompt. A function is skipped when that cut is not clean (the docstring shares a line with
code) or the rest does not parse (6 of 2764 candidates on 3.11), when the docstring's text still
appears in the code (1), and when its answer repeats an earlier one (15: bz2/lzma's twin file
methods, distutils' two MSVC compilers, ...).

The split is the pretraining corpus's own split by file (`corpus._default_split`, 8 held-out
files, 6 of them with pairs: `collections/__init__.py`, `tempfile.py`, `traceback.py`, ...),
so a val function is held out of pretraining too: val loss measures writing unseen code, not
recalling it.

`module_chunks`: which stdlib package a `chunk_chars` window of source comes from. Labels are
the first path component of files inside packages (`email/mime/text.py` -> "email"); top-level
modules (`os.py`) belong to no family and are not used. 8 held-out files (2%) cannot give every
class a val file, so this task holds out more: a file is val when the corpus holds it out or its
path hash falls in the lowest `CLASSIFY_VAL_FRACTION` (20%), and a family with no val file gets
its lowest-hash file moved to val. Every corpus val file stays val, so no train chunk comes
from a file pretraining held out (val chunks may come from files pretraining trained on, but
never with their label). Chunks that import their own package by name (`from email.utils
import ...`) are the easy cases. The families kept are the `families` with the most train
*files* (ties by name). With the defaults (chunk_chars=1024, families=8), chunks train / val:
  asyncio 481 / 24, distutils 532 / 91, email 309 / 82, encodings 211 / 21,
  importlib 135 / 90, multiprocessing 247 / 39, turtledemo 59 / 14, xml 223 / 89
(2197 / 450 in all; files train / val: 29/4, 39/10, 24/4, 49/8, 18/6, 18/5, 16/5, 19/3). The
classes are 9:1 apart in train; `max_per_family` evens them out. Records come grouped by
file: shuffle before training.

Python 3.12 drops `distutils` and adds files, so the counts (and one family) differ by version,
like the corpus itself. Mining takes ~3.5 s for the chats (2.9 s of it `ast.parse` of the 531
files) and ~0.06 s for the chunks on this (shared, 2-core) machine, after the corpus is read
(~0.6 s warm); both are cached per process, for both splits (and, for the chats, every
`max_chars`) at once.
"""

from __future__ import annotations

import ast
import hashlib
import io
import textwrap
from collections import Counter
from functools import lru_cache

from deepsail.data.corpus import TOPICS_FILE, _all_default_documents, _default_split, split_of

SPLITS = ("train", "val")
CLASSIFY_VAL_FRACTION = 0.2  # ~5 held-out files for a 25-file family; 0.1 leaves several of the top 8 with 1
MIN_BODY_STATEMENTS = 2  # statements after the docstring; one-statement bodies are mostly `return self._x`
MIN_CHUNK_CHARS = 32  # non-space characters: a file's last window can be a lone `main()` or blank tail


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")


def _hash(key: str) -> bytes:
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()


def _source_files() -> list[tuple[str, str, str]]:
    """(relative path, text, corpus split) of every stdlib `.py` file in the corpus, sorted by path."""
    docs, _ = _all_default_documents()
    assignment = _default_split(docs)
    return [(d.source, d.text, assignment[d.source]) for d in docs if not d.source.startswith(TOPICS_FILE + "#")]


# -----------------------------------------------------------------------------
# Instruction pairs: docstring -> function


def _is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _functions(body: list[ast.stmt], prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of the functions in a module body and, recursively, in its classes' bodies."""
    found = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _is_public(node.name):
            found.append((prefix + node.name, node))
        elif isinstance(node, ast.ClassDef) and _is_public(node.name):
            found.extend(_functions(node.body, f"{prefix}{node.name}."))
    return found


def _answer(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (decorators included) without its docstring, dedented; None if not cleanly cut."""
    doc = node.body[0]
    first_line, last_line = doc.lineno - 1, doc.end_lineno - 1  # 0-based, inclusive
    if lines[first_line][: doc.col_offset].strip() or lines[last_line][doc.end_col_offset :].strip():
        return None  # `def f(): """doc"""` or `"""doc"""; x = 1`: cutting the lines would cut code
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    after = last_line + 1
    while after < node.end_lineno and not lines[after].strip():
        after += 1
    code = textwrap.dedent("".join(lines[start:first_line] + lines[after : node.end_lineno]))
    try:
        ast.parse(code)
    except SyntaxError:  # a multi-line string less indented than the def defeats dedent
        return None
    return code


def _file_chats(rel: str, text: str) -> list[tuple[str, int, str, str]]:
    """(source, docstring length, prompt, answer) of one file's pairs, in line order, of any length."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []  # none on 3.11; a stdlib file in newer syntax than this interpreter's would be one
    # Lines as `ast` numbers them (\n, \r\n, \r): `str.splitlines` would also break at form feeds
    # and \u2028 (no 3.11 stdlib file has one, but a line off would cut the wrong lines).
    lines = io.StringIO(text, newline="").readlines()
    pairs = []
    for qualname, node in _functions(tree.body):
        doc = ast.get_docstring(node)
        if not doc or len(node.body) - 1 < MIN_BODY_STATEMENTS:
            continue
        answer = _answer(lines, node)
        if answer is None or doc in answer:
            continue
        kind = ("async " if isinstance(node, ast.AsyncFunctionDef) else "") + (
            "method" if "." in qualname else "function"
        )
        prompt = f"Write the Python {kind} `{qualname}({ast.unparse(node.args)})` this docstring describes:\n\n{doc}"
        pairs.append((f"{rel}:{node.lineno}", len(doc), prompt, answer))
    return pairs


@lru_cache(maxsize=1)
def _mine_chats() -> tuple[tuple[str, str, int, str, str], ...]:
    """(corpus split, source, docstring length, prompt, answer) of every pair of any length, in file then line order."""
    return tuple((split, *pair) for rel, text, split in _source_files() for pair in _file_chats(rel, text))


def docstring_chats(split: str = "train", max_records: int | None = None, max_chars: int = 2000) -> list[dict]:
    """Instruction pairs "write the function this docstring describes" -> its code (see the module docstring).

    Each record: `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "source": "relpath:lineno"}`,
    in file then line order. `max_records` keeps a deterministic sample (the lowest hashes of
    `source`, so spread over many files rather than the first files alphabetically), still in
    that order. `max_chars` bounds both the docstring and the answer.
    """
    _check_split(split)
    if max_chars < 1:
        raise ValueError(f"max_chars must be a positive number of characters, got {max_chars}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0 (or None for all), got {max_records}")
    pairs, answers = [], set()
    for pair_split, source, doc_chars, prompt, answer in _mine_chats():
        if doc_chars > max_chars or len(answer) > max_chars or answer in answers:
            continue  # too long, or a repeat: the same code under two names (bz2/lzma, ntpath/posixpath, ...)
        answers.add(answer)  # over both splits, so a val answer never repeats a train one
        if pair_split == split:
            pairs.append((source, prompt, answer))
    if max_records is not None and max_records < len(pairs):
        kept = {p[0] for p in sorted(pairs, key=lambda p: _hash(p[0]))[:max_records]}
        pairs = [p for p in pairs if p[0] in kept]
    return [
        {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "source": source,
        }
        for source, prompt, answer in pairs
    ]


# -----------------------------------------------------------------------------
# Classification: which package a chunk of source comes from


@lru_cache(maxsize=1)
def _family_files() -> tuple[tuple[str, str, str, str], ...]:
    """(family, relative path, text, split) of every file inside a package, with the classification split."""
    files = [(rel.split("/")[0], rel, text, split) for rel, text, split in _source_files() if "/" in rel]
    split = {
        rel: "val" if corpus_split == "val" or split_of(rel, CLASSIFY_VAL_FRACTION) == "val" else "train"
        for _, rel, _, corpus_split in files
    }
    by_family: dict[str, list[str]] = {}
    for family, rel, _, _ in files:
        by_family.setdefault(family, []).append(rel)
    for rels in by_family.values():
        if len(rels) > 1 and all(split[r] == "train" for r in rels):
            split[min(rels, key=_hash)] = "val"
    return tuple((family, rel, text, split[rel]) for family, rel, text, _ in files)


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Windows of whole lines of at most `chunk_chars` characters (a longer line is cut into pieces)."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if current:
                out.append(current)
                current = ""
            out.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            out.append(current)
            current = ""
        current += line
    if current:
        out.append(current)
    return out


@lru_cache(maxsize=4)
def _mine_chunks(chunk_chars: int) -> tuple[tuple[str, str, str, str], ...]:
    """(family, split, source, chunk) of every file's chunks, in file then chunk order."""
    return tuple(
        (family, split, f"{rel}:{i}", chunk)
        for family, rel, text, split in _family_files()
        for i, chunk in enumerate(_chunks(text, chunk_chars))
        if len("".join(chunk.split())) >= MIN_CHUNK_CHARS
    )


def module_chunks(
    split: str = "train", chunk_chars: int = 1024, families: int = 8, max_per_family: int | None = None
) -> tuple[list[dict], list[str]]:
    """Classification records `{"text", "label", "source": "relpath:chunk_index"}` and the sorted label list.

    `text` is a window of whole lines of one stdlib file, at most `chunk_chars` characters; `label`
    is the file's package family; the `families` families with the most train files are kept (see
    the module docstring). `max_per_family` caps each family's chunks in this split, keeping a
    deterministic sample (lowest hashes of `source`, spread over the family's files).
    """
    _check_split(split)
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be a positive number of characters, got {chunk_chars}")
    if max_per_family is not None and max_per_family < 1:
        raise ValueError(f"max_per_family must be >= 1 (or None for no cap), got {max_per_family}")
    files = _family_files()
    train_files = Counter(family for family, _, _, s in files if s == "train")
    eligible = set(train_files) & {family for family, _, _, s in files if s == "val"}
    if not 1 <= families <= len(eligible):
        raise ValueError(
            f"families must be between 1 and {len(eligible)} (the stdlib packages with files in both splits "
            f"on this Python), got {families}"
        )
    labels = sorted(sorted(eligible, key=lambda f: (-train_files[f], f))[:families])
    chosen = [c for c in _mine_chunks(chunk_chars) if c[1] == split and c[0] in labels]
    if max_per_family is not None:
        kept: set[str] = set()
        for label in labels:
            ranked = sorted((c[2] for c in chosen if c[0] == label), key=_hash)
            kept.update(ranked[:max_per_family])
        chosen = [c for c in chosen if c[2] in kept]
    return [{"text": chunk, "label": family, "source": source} for family, _, source, chunk in chosen], labels
