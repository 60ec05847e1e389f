"""Embedded fine-tuning data: docstring -> function chats and package-family chunks, mined from the stdlib.

Mining is cached per process: ~3.5 s for the chats (mostly `ast.parse` of 531 files) and ~0.06 s for the
chunks on the shared 2-core machine, so the fixtures below mine each dataset once for the whole file.
"""

import ast
import random
import re
from collections import Counter

import pytest

from deepsail.data import default_corpus, tasks
from deepsail.data.tasks import _chunks, _family_files, _file_chats, _source_files, docstring_chats, module_chunks


def _file(source: str) -> str:
    return source.rsplit(":", 1)[0]


@pytest.fixture(scope="module")
def chats() -> dict[str, list[dict]]:
    return {split: docstring_chats(split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def chunks() -> dict[str, tuple[list[dict], list[str]]]:
    return {split: module_chunks(split) for split in ("train", "val")}


def test_chats_are_well_formed(chats):
    assert len(chats["train"]) > 1000 and len(chats["val"]) > 20
    for record in chats["train"] + chats["val"]:
        assert set(record) == {"messages", "source"}
        user, assistant = record["messages"]  # exactly two
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].strip() and assistant["content"].strip()
        assert re.fullmatch(r"[\w/.]+\.py:\d+", record["source"]), record["source"]
        assert len(assistant["content"]) <= 2000


def test_chat_answers_are_the_named_function_without_its_docstring(chats):
    for record in chats["train"] + chats["val"]:
        prompt, answer = (m["content"] for m in record["messages"])
        header, docstring = prompt.split("\n\n", 1)
        qualname = re.search(r"`([\w.]+)\(", header).group(1)
        assert docstring and docstring not in answer, record["source"]
        (node,) = ast.parse(answer).body  # the answer is one whole def, and nothing else
        assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == qualname.split(".")[-1]
        assert ("async " in header) == isinstance(node, ast.AsyncFunctionDef)
        assert ast.get_docstring(node) is None, record["source"]
        assert len(node.body) >= tasks.MIN_BODY_STATEMENTS
        assert not any(p.startswith("_") and not p.endswith("__") for p in qualname.split("."))


def test_chat_docstring_cut_keeps_decorators_and_code():
    text = (
        "class A:\n"
        "    @property\n"
        "    def size(self):\n"
        '        """How big.\n'
        "\n"
        '        In bytes."""\n'
        "\n"
        "        n = len(self.data)\n"
        "        return n\n"
        "\n"
        "    def one_liner(self):\n"
        '        """Too small."""\n'
        "        return 1\n"
        "\n"
        "    def _private(self):\n"
        '        """Hidden."""\n'
        "        x = 1\n"
        "        return x\n"
        "\n"
        "def same_line(x):\n"
        '    """Doc."""; y = x\n'
        "    return y\n"
    )
    ((source, doc_chars, prompt, answer),) = _file_chats("pkg/mod.py", text)
    assert source == "pkg/mod.py:3" and doc_chars == len("How big.\n\nIn bytes.")
    assert prompt == "Write the Python method `A.size(self)` this docstring describes:\n\nHow big.\n\nIn bytes."
    assert answer == "@property\ndef size(self):\n    n = len(self.data)\n    return n\n"


def test_chats_split_by_file_and_held_out_of_pretraining(chats):
    train_files = {_file(r["source"]) for r in chats["train"]}
    val_files = {_file(r["source"]) for r in chats["val"]}
    assert train_files and val_files and not train_files & val_files
    assert val_files <= {d.source for d in default_corpus("val")}  # the corpus's own held-out files
    train_answers = {r["messages"][1]["content"] for r in chats["train"]}
    assert not any(r["messages"][1]["content"] in train_answers for r in chats["val"])


def test_chats_are_deterministic_and_ordered(chats):
    assert docstring_chats("val") == chats["val"]
    for split in ("train", "val"):
        keys = [(_file(r["source"]), int(r["source"].rsplit(":", 1)[1])) for r in chats[split]]
        assert keys == sorted(keys)
    # Mining again, without the cache and with the files in another order, gives the same pairs.
    files = [f for f in _source_files() if f[2] == "val"]
    random.Random(0).shuffle(files)
    again = sorted((s, p, a) for rel, text, _ in files for s, _, p, a in _file_chats(rel, text) if len(a) <= 2000)
    expected = sorted((r["source"], *(m["content"] for m in r["messages"])) for r in chats["val"])
    assert again == expected


def test_chats_max_records_and_max_chars(chats):
    sample = docstring_chats("train", max_records=50)
    assert len(sample) == 50 and sample == docstring_chats("train", max_records=50)
    assert all(r in chats["train"] for r in sample)
    assert len({_file(r["source"]) for r in sample}) > 10  # spread over files, not the first 50 pairs
    assert docstring_chats("train", max_records=0) == []
    short = docstring_chats("val", max_chars=300)
    assert short and len(short) < len(chats["val"])
    assert all(len(m["content"]) <= 300 + 200 for r in short for m in r["messages"])  # prompt adds a header
    assert all(len(r["messages"][1]["content"]) <= 300 for r in short)


def test_chunks_are_well_formed(chunks):
    records, labels = chunks["train"]
    assert labels == sorted(labels) and len(labels) == 8 and chunks["val"][1] == labels
    for split in ("train", "val"):
        for r in chunks[split][0]:
            assert set(r) == {"text", "label", "source"}
            assert r["label"] in labels and r["label"] == r["source"].split("/")[0]
            assert 0 < len(r["text"]) <= 1024 and len("".join(r["text"].split())) >= tasks.MIN_CHUNK_CHARS
            assert re.fullmatch(r"[\w/.-]+\.py:\d+", r["source"]), r["source"]
        assert set(Counter(r["label"] for r in chunks[split][0])) == set(labels)  # every class in both splits


def test_chunk_windows_cover_the_text_on_line_boundaries():
    text = "a = 1\n" * 30 + "x" * 250 + "\n" + "def f():\n    return 2\n" + "tail"
    windows = _chunks(text, 100)
    assert "".join(windows) == text
    assert all(0 < len(w) <= 100 for w in windows)
    # 16 lines of 6 characters fit in 100; the 251-character line is cut, its end starts the next window
    assert windows == [
        "a = 1\n" * 16,
        "a = 1\n" * 14,
        "x" * 100,
        "x" * 100,
        "x" * 50 + "\ndef f():\n    return 2\ntail",
    ]


def test_chunks_split_by_file_families_by_train_files(chunks):
    train_files = {_file(r["source"]) for r in chunks["train"][0]}
    val_files = {_file(r["source"]) for r in chunks["val"][0]}
    assert train_files and val_files and not train_files & val_files
    assert not train_files & {d.source for d in default_corpus("val")}  # nothing held out of pretraining
    files = _family_files()
    in_train = Counter(family for family, _, _, split in files if split == "train")
    labels = chunks["train"][1]
    others = set(in_train) - set(labels)
    assert min(in_train[f] for f in labels) >= max(in_train[f] for f in others)
    assert module_chunks("train", families=3)[1] == sorted(sorted(labels, key=lambda f: (-in_train[f], f))[:3])


def test_chunks_are_deterministic_and_capped(chunks):
    assert module_chunks("val") == chunks["val"]
    for split in ("train", "val"):
        keys = [(_file(r["source"]), int(r["source"].rsplit(":", 1)[1])) for r in chunks[split][0]]
        assert keys == sorted(keys)  # file then chunk order
    tasks._mine_chunks.cache_clear()  # re-mine (0.06 s) to compare against a fresh run, not the cache
    assert module_chunks("train") == chunks["train"]
    capped, labels = module_chunks("train", max_per_family=40)
    counts = Counter(r["label"] for r in capped)
    assert counts == {label: 40 for label in labels}
    assert capped == module_chunks("train", max_per_family=40)[0]
    assert all(r in chunks["train"][0] for r in capped)
    assert len({_file(r["source"]) for r in capped if r["label"] == "email"}) > 5  # spread over files
    small, _ = module_chunks("val", chunk_chars=200)
    assert small and all(len(r["text"]) <= 200 for r in small)


def test_bad_arguments_are_clear_errors():
    for call in (lambda: docstring_chats("test"), lambda: module_chunks("validation")):
        with pytest.raises(ValueError, match="split must be one of 'train', 'val'"):
            call()
    with pytest.raises(ValueError, match="families must be between 1 and"):
        module_chunks(families=1000)
    with pytest.raises(ValueError, match="max_per_family"):
        module_chunks(max_per_family=0)
    with pytest.raises(ValueError, match="max_chars"):
        docstring_chats(max_chars=0)
