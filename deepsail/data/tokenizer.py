"""Byte-level BPE tokenizer: trained with HF `tokenizers`, saved in the HF folder layout.

A saved tokenizer is a folder that `transformers.AutoTokenizer.from_pretrained(folder)` loads as it
is, with the same ids and the same chat template:

    tokenizer.json           the tokenizer itself (HF `tokenizers` format)
    tokenizer_config.json    special tokens + the Jinja chat template (`chat_template` key)
    special_tokens_map.json  the same special tokens, for older transformers versions

Special tokens (ids 0..6, in this order, so every deepsail tokenizer agrees on them):

    <|bos|>        start of a sequence (the chat template opens with it)
    <|eos|>        end of a document; `deepsail data prepare` appends one after every document
    <|pad|>        padding in batches; never a training target
    <|system|>     opens a system message   \
    <|user|>       opens a user message      } chat roles
    <|assistant|>  opens an assistant message/
    <|end|>        closes any chat message; a chat model stops generating when it emits it

The chat template renders `[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]` as

    <|bos|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

with no newlines around the role tokens: they are single tokens already, and whitespace around them
would just be more tokens to learn. The assistant's content and its `<|end|>` sit inside a
`{% generation %}` block, so HF's `return_assistant_tokens_mask=True` and our `encode_chat` both
know which tokens an SFT loss should train on.

Pre-tokenization splits text with the GPT-4 regex before byte-level BPE (as nanochat does): words,
numbers of up to 3 digits, punctuation runs and whitespace runs become separate pieces, so merges
never glue a word to the space or newline after it, and indentation in code becomes few tokens.
Any string round-trips exactly (byte level: no unknown token, no normalization).

`Tokenizer.load` also reads any HF folder with a `tokenizer.json` (Llama, Qwen2, DeepSeek...), so
a model downloaded from the hub brings its own tokenizer to `deepsail generate`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import tokenizers
import typer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from deepsail.files import atomic_path, atomic_write_json, ensure_folder

if TYPE_CHECKING:
    import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]

# GPT-4's (cl100k) split pattern; possessive quantifiers are supported by the Oniguruma engine in `tokenizers`.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Role tokens are single special tokens, so the template needs no whitespace (see module docstring).
# Written without newlines on purpose: HF renders with trim_blocks, which would eat a newline after a tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% else %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Tokenizer:
    """A thin wrapper around an HF `tokenizers.Tokenizer` plus its `tokenizer_config.json`."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None):
        self._tok = tok
        self.config = dict(config or {})
        self._plain: tokenizers.Tokenizer | None = None  # a copy that treats special-token text as text
        self._jinja = None  # compiled chat template, built on first use

    # --- training, saving, loading -------------------------------------------------------------

    @classmethod
    def train(
        cls,
        source: Iterable[str] | Sequence[os.PathLike],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train byte-level BPE on texts, or on files and folders.

        `source` is either an iterable of texts (`str`), or a list of `pathlib.Path`s (text, .jsonl,
        .parquet files or folders, read like `deepsail data prepare` reads them). The type decides,
        never whether a string happens to name a file. `vocab_size` counts everything: the 7 special
        tokens, the 256 byte tokens and the merges.
        """
        if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for merges: it must exceed "
                f"{len(SPECIAL_TOKENS) + 256} (7 special tokens + 256 bytes)"
            )
        if isinstance(source, (str, os.PathLike)):
            raise ValueError("pass a list of paths, or an iterable of texts (a single str/Path is ambiguous)")
        skips = None
        if isinstance(source, (list, tuple)) and source and all(isinstance(s, os.PathLike) for s in source):
            from deepsail.data.corpus import SkipCounts, iter_documents

            skips = SkipCounts()
            texts: Iterable[str] = (d.text for d in iter_documents(source, skips=skips))
        else:
            texts = source
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,  # added first, so they get ids 0..6
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        if skips is not None and skips.total:
            warnings.warn(f"tokenizer training {skips.summary()}", stacklevel=2)
        if tok.get_vocab_size() < vocab_size:
            warnings.warn(
                f"the text ran out of pairs to merge: vocab is {tok.get_vocab_size()}, not the {vocab_size} asked for; "
                "train on more text for a larger vocabulary",
                stacklevel=2,
            )
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
            "model_max_length": 1_000_000_000,  # the model, not the tokenizer, limits the context
        }
        return cls(tok, config)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a folder with `tokenizer.json` (+ optional `tokenizer_config.json`): ours or any HF model's."""
        folder = Path(path)
        file = folder / "tokenizer.json" if folder.is_dir() else folder
        if not file.is_file():
            raise ValueError(
                f"no tokenizer.json in {str(folder)!r}. Train one with `deepsail tokenizer train --out DIR`, or, "
                "for an HF model that ships only a slow tokenizer, convert it with "
                "`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise ValueError(
                f"{file} is not a tokenizers file ({e}); it may be truncated or overwritten. Copy the "
                "tokenizer the model was trained with back into its folder."
            ) from e
        config_file = file.parent / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON ({e}); restore it or delete it") from e
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} holds {type(config).__name__}, not a JSON object")
        # Newer transformers versions save the template in its own file.
        template_file = file.parent / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text("utf-8")
        return cls(tok, config)

    def save(self, path: str | os.PathLike) -> Path:
        folder = Path(path)
        with atomic_path(folder / "tokenizer.json") as tmp:
            self._tok.save(str(tmp))
        atomic_write_json(folder / "tokenizer_config.json", self.config)
        specials = {k: self.config[k] for k in ("bos_token", "eos_token", "pad_token") if k in self.config}
        atomic_write_json(folder / "special_tokens_map.json", specials)
        return folder

    # --- encoding and decoding -----------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, nothing added (no post-processor runs), so `decode(encode(t)) == t`.

        `bos=True` prepends the BOS token (if this tokenizer has one). Special-token text such as
        "<|end|>" in `text` becomes the special token, as in HF; pass `split_special_tokens=True`
        for untrusted text that must be encoded as plain characters (data prep does).
        """
        ids = self._backend(split_special_tokens).encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if bos else ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, split_special_tokens: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once; runs on all cores (the Rust side is multithreaded)."""
        encodings = self._backend(split_special_tokens).encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids) if bos else e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    def _backend(self, split_special_tokens: bool) -> tokenizers.Tokenizer:
        if not split_special_tokens:
            return self._tok
        if self._plain is None:
            self._plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id] + ids if self.bos_id is not None else ids

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Make each of `tokens` one id that text never splits (an image placeholder, say), appended after the
        vocabulary; tokens already there keep their ids. Returns the ids."""
        self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])
        self._plain = None
        self.__dict__.pop("max_token_bytes", None)
        return [self._tok.token_to_id(t) for t in tokens]

    # --- vocabulary facts ----------------------------------------------------------------------

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text any one token stands for (special tokens' text included): a text of n bytes
        is at least n / max_token_bytes tokens, a bound a server checks before it tokenizes anything."""
        texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max(len(t.encode("utf-8", "replace")) for t in texts) or 1

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding needs at least this many rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # HF writes AddedToken objects as {"content": ..., ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        """The pad token, or EOS for tokenizers without one (padding is masked out either way)."""
        pad = self._special_id("pad_token")
        return pad if pad is not None else self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: EOS, and `<|end|>` (end of a chat turn) when the vocabulary has it."""
        ids = [self.eos_id, self._tok.token_to_id(END)]
        return sorted({i for i in ids if i is not None})

    @property
    def sha256(self) -> str:
        """Fingerprint of the tokenizer (vocab, merges, specials); data manifests record it."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    # --- chat ----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # HF allows several named templates; "default" is the chat one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        return template

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the saved Jinja template, exactly as `transformers` renders it."""
        return self._render_chat(messages, add_generation_prompt, kwargs)[0]

    def encode_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs
    ) -> tuple[list[int], list[int]]:
        """Token ids of a rendered chat, and a 0/1 mask that is 1 on assistant tokens (what SFT trains on).

        The mask comes from the template's `{% generation %}` blocks, like HF's
        `return_assistant_tokens_mask`; a template without them gives an all-zero mask.
        """
        text, spans = self._render_chat(messages, add_generation_prompt, kwargs)
        encoding = self._tok.encode(text, add_special_tokens=False)
        mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoding.offsets]
        return encoding.ids, mask

    def _render_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool, kwargs: dict
    ) -> tuple[str, list[tuple[int, int]]]:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (no `chat_template` in its tokenizer_config.json)")
        if self._jinja is None:
            self._jinja = _compile_chat_template(self.chat_template)
        template, tracker = self._jinja
        # The same variables transformers passes: the named special tokens (bos_token, eos_token, ...).
        specials = {
            k: v.get("content") if isinstance(v, dict) else v for k, v in self.config.items() if k in _NAMED_SPECIALS
        }
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        with tracker(blocks, spans):
            for block in template.generate(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **specials, **kwargs
            ):
                blocks.append(block)
        return "".join(blocks), spans


_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _compile_chat_template(source: str):
    """The template compiled in the same sandboxed environment transformers uses, so renders match."""
    from contextlib import contextmanager
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    state = threading.local()  # per thread, so a server can render chats concurrently

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text; we record where it lands.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            if getattr(state, "spans", None) is not None:
                start = sum(len(b) for b in state.blocks)
                state.spans.append((start, start + len(text)))
            return text

    @contextmanager
    def tracker(blocks: list, spans: list):
        state.blocks, state.spans = blocks, spans
        try:
            yield
        finally:
            state.blocks, state.spans = None, None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source), tracker


# -----------------------------------------------------------------------------
# Facts about a tokenizer that training and evaluation need


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE writes byte b as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor | None:
    """[vocab] int64: how many UTF-8 bytes each token id stands for (0 for special tokens).

    Exact for byte-level BPE (deepsail's tokenizers, and DeepSeek's, Qwen2's, Llama-3's): each
    token's string is its bytes written one character per byte. Returns None for other tokenizers
    (e.g. sentencepiece-style), for which bits per byte is then reported as nan.
    """
    import torch

    decoder = _byte_decoder()
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for i in range(tokenizer.vocab_size):
        if tokenizer.decode([i], skip_special_tokens=True) == "":  # a special token (or an empty one)
            continue
        piece = tokenizer.id_to_token(i)
        if piece is None or any(c not in decoder for c in piece):
            return None
        lengths[i] = len(piece)
    return lengths


def data_tokenizer(data_dir: str | os.PathLike, path: str | os.PathLike = "") -> Tokenizer:
    """The tokenizer a prepared data folder was made with: `path` if given, else the data folder, else the folder
    its manifest names. The manifest's sha256 fingerprint must match, so a checkpoint never ships the wrong one."""
    from deepsail.data.loader import read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    recorded = manifest["tokenizer"].get("path")
    candidates = [Path(path)] if path else [data_dir, *([Path(recorded), data_dir / recorded] if recorded else [])]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(folder)
            if tokenizer.sha256 != manifest["tokenizer"]["sha256"]:
                raise ValueError(
                    f"the tokenizer in {folder} is not the one {data_dir} was tokenized with (sha256 "
                    f"differs); pass the right one with --tokenizer DIR, or re-run `deepsail data prepare`."
                )
            return tokenizer
    raise ValueError(
        f"cannot find the tokenizer {data_dir} was made with (looked in {[str(c) for c in candidates]}); "
        f"pass it with --tokenizer DIR."
    )


# -----------------------------------------------------------------------------
# The CLI verb: `deepsail tokenizer train`


def tokenizer_train(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Text, .jsonl or .parquet files, or folders of them. Default: the embedded corpus (Python's stdlib)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder to write tokenizer.json + tokenizer_config.json into.")] = Path(
        "tokenizer"
    ),
    vocab_size: Annotated[
        int, typer.Option(help="Total vocabulary size, special tokens and 256 byte tokens included.")
    ] = 8192,
    max_bytes: Annotated[
        int | None,
        typer.Option(help="Train on at most this many bytes of the embedded corpus (a deterministic sample of files)."),
    ] = None,
    min_frequency: Annotated[int, typer.Option(help="A pair must occur this often to be merged.")] = 2,
) -> None:
    """Train a byte-level BPE tokenizer and save it as an HF-loadable folder (tokenizer.json + chat template).

    \b
    Examples:
      deepsail tokenizer train --vocab-size 8192 --out tok          # on the embedded corpus
      deepsail tokenizer train my_docs/ corpus.jsonl --vocab-size 32000 --out tok
    """
    from rich.console import Console

    from deepsail.data.corpus import default_corpus, default_corpus_info, input_files

    console = Console(stderr=True)
    if inputs:
        for item in inputs:
            input_files(item)  # a missing path fails now, not halfway through training
        source: Sequence = [Path(p) for p in inputs]
        what = ", ".join(map(str, inputs))
    else:
        info = default_corpus_info()
        docs = default_corpus("train", max_bytes=max_bytes)
        source = [d.text for d in docs]
        what = (
            f"embedded corpus (Python {info.python} stdlib, train split): {len(docs)} files, "
            f"{sum(len(t.encode('utf-8', 'surrogatepass')) for t in source) / 1e6:.1f} MB"
        )
    ensure_folder(out)  # before the minutes of training, not after
    console.print(f"training a {vocab_size}-token BPE on {what}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(source, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=console.is_terminal)
    seconds = time.perf_counter() - t0
    tok.save(out)
    console.print(f"trained in {seconds:.1f}s; vocab {tok.vocab_size}; saved to {out}/")
