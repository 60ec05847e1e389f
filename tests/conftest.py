"""Fixtures shared across test files, built once per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from deepsail.data import Tokenizer, default_corpus
from deepsail.model import ModelConfig, Transformer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A servable model folder: random `deepseek-v3-debug` weights and a 512-token BPE trained on 100 kB of the
    embedded corpus. Tests may copy it, never change it."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("deepseek-v3-debug")).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ran out of pairs to merge" on this little text is fine
        Tokenizer.train([d.text for d in default_corpus("train", max_bytes=100_000)], vocab_size=512).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A tokenized data folder as `deepsail data prepare` makes it: the tokenizer of `tiny_model_dir`'s kind (a
    512-token BPE) over 100 kB of the embedded corpus. Its tokenizer sits in the folder's parent /tokenizer."""
    from deepsail.data.prepare import prepare

    root = tmp_path_factory.mktemp("tinydata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train([d.text for d in default_corpus("train", max_bytes=100_000)], vocab_size=512)
    tok.save(root / "tokenizer")
    prepare(None, root / "tokenizer", root / "data", max_bytes=100_000, progress=False)
    return root / "data"
