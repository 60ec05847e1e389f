"""Tokenizer: exact round trips, the HF folder format, and chat template parity with transformers."""

import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepsail.cli import app
from deepsail.data import SPECIAL_TOKENS, Tokenizer, default_corpus

TEXTS = [
    "Hello, world!",
    "héllo wörld — naïve café, Ελληνικά, русский, 中文, 日本語, 한국어",
    "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tclass A:\n\t\tpass\n",
    "   leading and trailing spaces   ",
    "\n\n\r\n\t \u00a0\u2003 mixed whitespace \x00\x07 control chars \ufeff",
    "numbers 1234567890 3.14159 -42 1e-9",
    "",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? 🎲"},
    {"role": "assistant", "content": "6, of course.\n"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    texts = [d.text for d in default_corpus("train", max_bytes=300_000)]
    folder = tmp_path_factory.mktemp("tok")
    Tokenizer.train(texts, vocab_size=512).save(folder)
    return folder


def test_train_vocab_and_special_tokens(tok_dir):
    tok = Tokenizer.load(tok_dir)
    assert tok.vocab_size == 512
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.stop_ids == [1, tok.token_to_id("<|end|>")]
    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert "chat_template" in json.loads((tok_dir / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_exact(tok_dir, text):
    tok = Tokenizer.load(tok_dir)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, bos=True) == [tok.bos_id] + tok.encode(text)


def test_encode_batch_matches_encode(tok_dir):
    tok = Tokenizer.load(tok_dir)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_special_token_text_in_data_cannot_inject_specials(tok_dir):
    tok = Tokenizer.load(tok_dir)
    text = "a document that mentions <|eos|> and <|end|> literally"
    assert tok.eos_id in tok.encode(text)  # HF behaviour: special-token text becomes the token
    plain = tok.encode(text, split_special_tokens=True)
    assert not set(plain) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(plain) == text


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="no room for merges"):
        Tokenizer.train(["abc"], vocab_size=200)


def test_train_from_paths(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jumps over jumps over"}) + "\n{broken\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.train([tmp_path / "a.txt", tmp_path / "b.jsonl"], vocab_size=300)
    assert any("1 malformed json" in str(w.message) for w in caught)
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    assert len(tok.encode(" jumps")) < len(b" jumps")  # merges were learned from the files


def test_hf_loads_the_folder_with_identical_ids_and_chat(tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.load(tok_dir)
    for hf in (AutoTokenizer.from_pretrained(tok_dir), PreTrainedTokenizerFast.from_pretrained(tok_dir)):
        assert len(hf) == tok.vocab_size
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        for text in TEXTS:
            assert hf(text)["input_ids"] == tok.encode(text)
            assert hf.decode(tok.encode(text)) == text
        for gen in (True, False):
            ours = tok.apply_chat_template(CHAT[:2], add_generation_prompt=gen)
            assert hf.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=gen) == ours
        out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = tok.encode_chat(CHAT)
        assert out["input_ids"] == ids
        assert out["assistant_masks"] == mask


def test_chat_template_format_and_assistant_mask(tok_dir):
    tok = Tokenizer.load(tok_dir)
    text = tok.apply_chat_template(CHAT[:3], add_generation_prompt=False)
    assert text == "<|bos|><|system|>You are terse.<|end|><|user|>What is 2+2?<|end|><|assistant|>4.<|end|>"
    assert tok.apply_chat_template(CHAT[:2]).endswith("<|user|>What is 2+2?<|end|><|assistant|>")
    ids, mask = tok.encode_chat(CHAT[:3])
    # The mask covers exactly the assistant's content and its <|end|>: what SFT trains on.
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4.<|end|>"
    with pytest.raises(Exception, match="unknown chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_loads_a_folder_saved_by_transformers(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path)
    ours, theirs = Tokenizer.load(tok_dir), Tokenizer.load(tmp_path)
    assert all(theirs.encode(t) == ours.encode(t) for t in TEXTS)
    assert (theirs.bos_id, theirs.eos_id, theirs.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert theirs.apply_chat_template(CHAT) == ours.apply_chat_template(CHAT)


def test_load_without_tokenizer_json_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_cli_tokenizer_train(tmp_path):
    runner = CliRunner()
    help_ = runner.invoke(app, ["tokenizer", "train", "--help"])
    assert help_.exit_code == 0 and "--vocab-size" in help_.output
    (tmp_path / "a.txt").write_text(default_corpus("val", max_bytes=50_000)[0].text)
    result = runner.invoke(
        app, ["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    )
    assert result.exit_code == 0, result.output
    assert "vocab 300" in result.output
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 300
    missing = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "tok2")])
    assert missing.exit_code != 0 and "nope.txt" in missing.output
