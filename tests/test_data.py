"""Data: the default corpus split, `prepare` on every input kind, packing, loader resume, bucketing, CLI."""

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from deepsail.cli import app
from deepsail.data import BucketBatcher, PackedLoader, Tokenizer, default_corpus, eval_batches, length_buckets, prepare
from deepsail.data.corpus import (
    EXCLUDED_DIRS,
    MIN_VAL_DOCS,
    _all_default_documents,
    _default_split,
    default_corpus_info,
)
from deepsail.data.loader import TokenStream
from deepsail.data.prepare import token_dtype

DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(60)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    Tokenizer.train([d.text for d in default_corpus("train", max_bytes=200_000)] + DOCS, vocab_size=512).save(folder)
    return folder


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tok_dir) -> Path:
    """60 small documents in shards of ~100 tokens, so windows cross shard boundaries."""
    src = tmp_path_factory.mktemp("src")
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path_factory.mktemp("packed")
    prepare([src / "docs.jsonl"], tok_dir, out, val_fraction=0.1, shard_tokens=100, progress=False)
    return out


# --- the embedded default corpus ---------------------------------------------------------------


def test_default_corpus_split_is_deterministic_and_disjoint():
    train, val = default_corpus("train"), default_corpus("val")
    train_src, val_src = {d.source for d in train}, {d.source for d in val}
    assert not train_src & val_src
    assert len(val) >= MIN_VAL_DOCS and len(train) > 50 * len(val) // 2
    assert any(s.startswith("pydoc_data/topics.py#") for s in train_src | val_src)  # English help text is in
    assert not any(EXCLUDED_DIRS & set(s.split("/")[:-1]) for s in train_src | val_src)
    # Independent of the order files are listed in: shuffle the documents, same assignment.
    docs = list(_all_default_documents()[0])
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert _default_split(shuffled) == _default_split(docs)
    assert [d.source for d in default_corpus("val")] == [d.source for d in val]


def test_default_corpus_max_bytes_and_info():
    small = default_corpus("train", max_bytes=100_000)
    assert 0 < sum(len(d.text.encode()) for d in small) <= 100_000
    assert {d.source for d in small} <= {d.source for d in default_corpus("train")}
    assert [d.source for d in default_corpus("train", max_bytes=100_000)] == [d.source for d in small]
    info = default_corpus_info()
    assert info.files["train"] == len(default_corpus("train")) and info.bytes["train"] > 1_000_000
    with pytest.raises(ValueError, match="split"):
        default_corpus("test")


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_reads_every_kind_and_counts_skips(tmp_path, tok_dir):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("plain text document")
    (src / "sub" / "b.md").write_text("# markdown document")
    (src / "empty.txt").write_text("   \n")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "ignored.csv").write_text("not read: not a known extension inside a folder")
    lines = [
        json.dumps({"text": "jsonl one"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": ""}),
        "",  # blank line: not a document
        json.dumps({"text": 5}),
        json.dumps({"text": "jsonl two ✓"}),
    ]
    (src / "c.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n')
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two", ""]}), src / "d.parquet")
    pq.write_table(pa.table({"content": ["wrong column"] * 3}), src / "sub" / "e.parquet")

    m = prepare([src], tok_dir, tmp_path / "out", val_fraction=0.0, progress=False)
    assert m["splits"]["train"]["docs"] == 6 and m["splits"]["val"]["docs"] == 0
    skipped = {k: v for k, v in m["skipped"].items() if k != "examples"}
    # undecodable: latin1.txt + the \xff line; empty: empty.txt, "" line, "" row;
    # missing: body, 5, None, 3 rows of e.parquet
    assert skipped == {"undecodable": 2, "empty": 3, "malformed_json": 1, "missing_text_field": 6}
    assert m["skipped"]["examples"]["malformed_json"].endswith("c.jsonl:2")
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 512

    tok = Tokenizer.load(tok_dir)
    stream = TokenStream(tmp_path / "out", "train")
    text = tok.decode(stream.read(0, stream.n_tokens).tolist())
    expected = ["plain text document", "jsonl one", "jsonl two ✓", "parquet one", "parquet two", "# markdown document"]
    assert text == "".join(d + "<|eos|>" for d in expected)  # sorted path order, EOS after each document


def test_prepare_bad_inputs_are_clear_errors(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="missing.txt.*does not exist"):
        prepare([tmp_path / "missing.txt"], tok_dir, tmp_path / "out", progress=False)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="nothing.*contains no"):
        prepare([tmp_path / "nothing"], tok_dir, tmp_path / "out", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl.*no usable documents.*missing text field"):
        prepare([tmp_path / "bad.jsonl"], tok_dir, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.bin"))  # a failed run leaves no shards behind
    with pytest.raises(ValueError, match="no tokenizer.json"):
        prepare([tmp_path / "bad.jsonl"], tmp_path, tmp_path / "out", progress=False)


def test_prepare_splits_by_document_hash(tmp_path, tok_dir):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS + DOCS[:5]))
    m1 = prepare([tmp_path / "d.jsonl"], tok_dir, tmp_path / "o1", val_fraction=0.2, progress=False)
    m2 = prepare([tmp_path / "d.jsonl"], tok_dir, tmp_path / "o2", val_fraction=0.2, progress=False)
    assert m1["splits"] == m2["splits"]
    assert 0 < m1["splits"]["val"]["docs"] < len(DOCS)
    tok = Tokenizer.load(tok_dir)
    val_docs = set(
        tok.decode(TokenStream(tmp_path / "o1", "val").read(0, m1["splits"]["val"]["tokens"]).tolist()).split("<|eos|>")
    )
    train_docs = set(
        tok.decode(TokenStream(tmp_path / "o1", "train").read(0, m1["splits"]["train"]["tokens"]).tolist()).split(
            "<|eos|>"
        )
    )
    assert not (val_docs & train_docs) - {""}  # duplicates land on the same side


def test_prepare_default_corpus_small(tmp_path, tok_dir):
    m = prepare(None, tok_dir, tmp_path / "out", max_bytes=150_000, progress=False)
    assert m["splits"]["train"]["docs"] > 0 and m["splits"]["val"]["docs"] >= MIN_VAL_DOCS
    assert m["sources"][0].startswith("embedded:python-")


def test_token_dtype():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


# --- packing and the loader --------------------------------------------------------------------


def test_shards_and_packing(packed, tok_dir):
    m = json.loads((packed / "manifest.json").read_text())
    train = m["splits"]["train"]
    assert len(train["shards"]) > 3 and all(s["tokens"] >= 100 for s in train["shards"][:-1])
    stream = TokenStream(packed, "train")
    tokens = stream.read(0, stream.n_tokens)
    tok = Tokenizer.load(tok_dir)
    assert (tokens == tok.eos_id).sum() == train["docs"]  # exactly one EOS per document
    assert tokens[-1] == tok.eos_id and all(
        tok.decode(stream.read(o - 1, 1).tolist()) == "<|eos|>" for o in stream.offsets[1:]
    )
    docs = tok.decode(tokens.tolist()).split("<|eos|>")[:-1]
    assert set(docs) <= set(DOCS) and len(docs) == train["docs"]


def test_loader_windows_are_shifted_stream_slices(packed):
    loader = PackedLoader(packed, "train", batch_size=3, seq_len=16)
    stream = loader.stream.read(0, loader.stream.n_tokens).astype(np.int64)
    order = loader._epoch_order(0)
    assert sorted(order.tolist()) == list(range(loader.n_windows))  # each window once per epoch (world_size 1)
    for k in range(loader.batches_per_epoch):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        for row, w in enumerate(order[3 * k : 3 * k + 3]):
            window = stream[w * 16 : w * 16 + 17]  # T + 1 tokens of the concatenated stream
            assert np.array_equal(x[row].numpy(), window[:-1]) and np.array_equal(y[row].numpy(), window[1:])
    assert loader.epoch == 1 and loader.step == 0
    assert loader.tokens_per_epoch == loader.batches_per_epoch * 3 * 16
    assert not np.array_equal(loader._epoch_order(1), order)  # a fresh shuffle each epoch


def test_loader_resume_reproduces_the_exact_next_batches(packed):
    reference = PackedLoader(packed, "train", batch_size=2, seq_len=8, seed=7)
    n = reference.batches_per_epoch
    stop = n - 2  # stop just before an epoch boundary, so the resumed run crosses it
    expected = [next(reference) for _ in range(stop + 5)]
    first = PackedLoader(packed, "train", batch_size=2, seq_len=8, seed=7)
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PackedLoader(packed, "train", batch_size=2, seq_len=8, seed=0)
    resumed.load_state_dict(state)
    for want in expected[stop:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(
        next(PackedLoader(packed, "train", batch_size=2, seq_len=8, seed=8))[0], expected[0][0]
    )  # the seed matters
    with pytest.raises(ValueError, match="seq_len=8"):
        PackedLoader(packed, "train", batch_size=2, seq_len=4).load_state_dict(state)


def test_loader_ranks_partition_the_windows(packed):
    r0 = PackedLoader(packed, "train", batch_size=2, seq_len=8, rank=0, world_size=2)
    r1 = PackedLoader(packed, "train", batch_size=2, seq_len=8, rank=1, world_size=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch
    assert not set(r0._epoch_order(0).tolist()) & set(r1._epoch_order(0).tolist())


def test_loader_split_too_small_is_a_clear_error(packed):
    with pytest.raises(ValueError, match="fewer than one batch needs"):
        PackedLoader(packed, "val", batch_size=64, seq_len=512)
    with pytest.raises(ValueError, match="no manifest.json"):
        PackedLoader(packed / "nope", "train")


def test_eval_batches_fixed_order(packed):
    a = list(eval_batches(packed, batch_size=4, seq_len=8, split="val"))
    b = list(eval_batches(packed, batch_size=4, seq_len=8, split="val"))
    assert len(a) > 0 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    stream = TokenStream(packed, "val")
    n_windows = (stream.n_tokens - 1) // 8
    assert sum(x.shape[0] for x, _ in a) == n_windows
    assert np.array_equal(a[0][0][0].numpy(), stream.read(0, 8))  # window 0 first
    assert len(list(eval_batches(packed, 4, 8, split="val", max_batches=1))) == 1


# --- length-bucketed batches -------------------------------------------------------------------


def _ragged(n: int = 200, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 120))] for _ in range(n)]


def test_bucket_batcher_pads_to_longest_and_covers_each_doc_once():
    docs = _ragged()
    batcher = BucketBatcher(docs, max_tokens=512, pad_id=2, seed=1)
    seen = []
    total_pad, total_tokens = 0, 0
    for _ in range(batcher.batches_per_epoch):
        b = next(batcher)
        assert b.input_ids.shape[1] == int(b.lengths.max())  # padded only to this batch's longest
        assert b.input_ids.numel() <= 512
        assert torch.equal(b.attention_mask.sum(1), b.lengths)
        for row, i in enumerate(b.indices.tolist()):
            L = len(docs[i])
            assert b.input_ids[row, :L].tolist() == docs[i] and (b.input_ids[row, L:] == 2).all()
            assert (b.attention_mask[row, :L] == 1).all() and (b.attention_mask[row, L:] == 0).all()
        seen += b.indices.tolist()
        total_pad += int((b.attention_mask == 0).sum())
        total_tokens += b.input_ids.numel()
    assert sorted(seen) == list(range(len(docs)))
    assert total_pad / total_tokens < 0.15  # bucketing keeps padding low (random batches: ~50%)
    assert batcher.epoch == 1


def test_bucket_batcher_is_deterministic_and_resumable():
    docs = _ragged()

    def plan(seed):
        return [b.tolist() for b in length_buckets([len(d) for d in docs], 512, seed=seed)]

    assert plan(3) == plan(3) and plan(3) != plan(4)
    reference = BucketBatcher(docs, max_tokens=512, pad_id=0, seed=3)
    n = reference.batches_per_epoch
    expected = [next(reference) for _ in range(n + 4)]
    first = BucketBatcher(docs, max_tokens=512, pad_id=0, seed=3)
    for _ in range(n - 2):
        next(first)
    resumed = BucketBatcher(docs, max_tokens=512, pad_id=0)
    resumed.load_state_dict(first.state_dict())
    for want in expected[n - 2 :]:
        assert torch.equal(next(resumed).input_ids, want.input_ids)


def test_bucket_batcher_errors():
    with pytest.raises(ValueError, match="longer than max_tokens=10"):
        BucketBatcher([[1] * 11], max_tokens=10, pad_id=0)
    with pytest.raises(ValueError, match="empty"):
        BucketBatcher([[1], []], max_tokens=10, pad_id=0)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_data_prepare(tmp_path, tok_dir):
    runner = CliRunner()
    help_ = runner.invoke(app, ["data", "prepare", "--help"])
    assert help_.exit_code == 0 and "--tokenizer" in help_.output and "--val-fraction" in help_.output
    missing = runner.invoke(
        app,
        ["data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")],
    )
    assert missing.exit_code != 0 and "missing.txt" in missing.output and "does not exist" in missing.output
    (tmp_path / "a.txt").write_text("hello there")
    ok = runner.invoke(
        app, ["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["splits"]["train"]["docs"] == 1
