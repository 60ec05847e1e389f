"""Text augmentation: EDA's four word edits (Wei & Zou 2019) and back-translation through two models.

    aug = TextAugmenter(methods=["synonym_replacement", "random_swap"], prob=0.1, n_aug=4, seed=0)
    out = aug.transform(["a sentence", ...])            # strings in, strings out
    out = aug.transform([{"text": ..., "label": 1}])    # dicts: the text is edited, the label copied
    out = aug.transform([{"messages": [...]}])          # chat: only the user turns are edited

Why these four edits: EDA measured them on five text classification sets and found +0.8 accuracy points on
average with the full training sets and +3.0 when training on 500 examples; its recommended setting runs from
alpha = 0.05 with 16 copies per sentence (500 examples) to alpha = 0.1 with 4 copies (5,000 or more, our default).
They are cheap (no model) and keep the label meaning of a classification record. They are not for the target side
of an SFT pair: a model would learn to write the typos, which is why a chat record's assistant turns are never
touched.

What `prob` means (EDA's alpha), per method, with n the number of whitespace-separated words:
  - synonym_replacement: max(1, round(prob * n)) word positions that have a WordNet synonym are replaced, each by
    one of its synonyms (EDA replaces every occurrence of a chosen word; here each position is its own choice);
  - random_insertion: max(1, round(prob * n)) times, a synonym of a random word is inserted at a random position;
  - random_swap: max(1, round(prob * n)) times, two random words trade places;
  - random_deletion: each word is dropped with probability prob (a one-word text is kept, and if every word would
    go, one random word stays);
  - back_translation: prob is not used; the text becomes from_pivot(to_pivot(text)).
prob = 0 leaves a text unchanged by the first three, as EDA's alpha = 0 does.

Each augmented copy is made by one method, drawn uniformly from `methods` (EDA also edits each augmented sentence
with one operation); list a method twice to draw it twice as often. A record always yields exactly n_aug copies,
even when a copy happens to equal its original (a text with no synonyms, say), so len(out) == len(dataset) *
(n_aug + keep_original) and copy j of record i is at a known place. The originals come first, as EDA returns them;
keep_original=False returns only the copies.

Words are split on whitespace and the whitespace between them is kept (a newline stays a newline); punctuation
stuck to a word stays with it, and a replaced capitalised word gets a capitalised synonym. Stop-words (a fixed
English list, below) are never replaced, nor used as the word whose synonym is inserted; swap and deletion move and
drop any word, as in EDA.

Synonyms come from WordNet 3.0, read offline from Debian's `wordnet-base` package (/usr/share/wordnet, 28 MB;
scripts/install.sh installs it) or the folder in $DEEPSAIL_WORDNET, through nltk's WordNet reader; nothing is
downloaded, ever. A synonym is WordNet's base form ("jumps" -> "leap"), as in EDA. Loading the reader parses the four
index files (147,306 lemmas): 1.4-2.2 s once per process on a shared 2-core box, then a word's synonyms cost ~1.5 ms
the first time and nothing after.

Determinism: record i is edited with its own `random.Random(f"{seed}:{i}")`, never the global RNG, so the same seed
gives the same output on every machine and every call, and a record's copies do not depend on the records before
it (a dataset split into shards augments the same as whole, given each record's global index).
"""

from __future__ import annotations

import copy
import io
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

METHODS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion", "back_translation")
SYNONYM_METHODS = frozenset({"synonym_replacement", "random_insertion"})

WORDNET_ENV = "DEEPSAIL_WORDNET"
WORDNET_DIRS = ("/usr/share/wordnet",)  # Debian and Ubuntu's wordnet-base (`dpkg -L wordnet-base`)
INSTALL_HINT = f"install it with `apt-get install wordnet-base`, or set {WORDNET_ENV} to a WordNet 3.0 dict folder"

# The usual English function words (pronouns, articles, auxiliaries, prepositions, conjunctions): replacing one
# by a "synonym" changes grammar, not wording ("a" -> "angstrom", "it" -> "information technology" in WordNet).
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves
    """.split()
)

# A word: letters, with inner apostrophes or hyphens ("don't", "well-known"), and any punctuation stuck to its ends.
_WORD = re.compile(r"^(\W*)([A-Za-z]+(?:['-][A-Za-z]+)*)(\W*)$")
_SYNONYM = re.compile(r"^[A-Za-z][A-Za-z' -]*$")  # drops WordNet lemmas with digits or dots ("1st", "St.")

# WordNet 3.0's 45 lexicographer files, in the order their numbers index them (lexnames(5WN)). nltk's reader opens
# a `lexnames` file to build this list; Debian's wordnet-base does not ship one (its README.Debian: the C library
# has the list compiled in), so the reader is handed this copy instead.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
_LEXNAME_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


# -----------------------------------------------------------------------------
# WordNet


def wordnet_dir() -> Path | None:
    """The WordNet dictionary folder: $DEEPSAIL_WORDNET if set, else the Debian path; None when there is none."""
    env = os.environ.get(WORDNET_ENV)
    if env:
        path = Path(env).expanduser()
        if not (path / "index.noun").is_file():
            raise ValueError(f"{WORDNET_ENV}={env}: no WordNet there (expected index.noun, data.noun, ...)")
        return path
    return next((Path(d) for d in WORDNET_DIRS if (Path(d) / "index.noun").is_file()), None)


def wordnet() -> Any:
    """nltk's `WordNetCorpusReader` over the local WordNet (loaded once per folder); ValueError if there is none."""
    root = wordnet_dir()
    if root is None:
        raise ValueError(
            f"synonym methods need WordNet and none was found in {', '.join(WORDNET_DIRS)}: {INSTALL_HINT}"
        )
    return _reader(str(root))


@cache
def _reader(root: str) -> Any:
    import nltk.data  # imported here: `import nltk` costs ~0.9 s, and most users of deepsail.data never augment
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # nltk >= 3.9.3 (3.10.4 measured) refuses to open corpus files outside its data path ("Security Violation
    # [CorpusReader.__init__]: Unauthorized path /usr/share/wordnet"); adding the folder to nltk.data.path is its
    # documented opt-in. The folder holds nothing nltk.data.find looks for, so other lookups are unaffected.
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    has_lexnames = (Path(root) / "lexnames").is_file()

    class Reader(WordNetCorpusReader):
        def open(self, file: str) -> Any:
            if file == "lexnames" and not has_lexnames:
                pos = [_LEXNAME_POS[name.split(".")[0]] for name in _LEXNAMES]
                return io.StringIO("".join(f"{i:02d}\t{n}\t{p}\n" for i, (n, p) in enumerate(zip(_LEXNAMES, pos))))
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            # The base class maps the synsets of nltk_data's own "wordnet" download onto this copy, for the
            # multilingual (OMW) lookups; it would look for that download and raise LookupError. This copy is
            # WordNet 3.0 itself and no OMW data is loaded, so there is nothing to map.
            return None

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The multilingual functions are not available")  # no OMW: expected
        return Reader(root, None)


@lru_cache(maxsize=65536)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of a word (lowercase, any part of speech, multi-word lemmas with spaces), in WordNet's
    order; () for stop-words and for words WordNet does not know."""
    word = word.lower()
    if word in STOP_WORDS:
        return ()
    names = (lemma.name().replace("_", " ") for synset in wordnet().synsets(word) for lemma in synset.lemmas())
    return tuple(n for n in dict.fromkeys(n.lower() for n in names) if n != word and _SYNONYM.match(n))


# -----------------------------------------------------------------------------
# The edits, on one text's words. `seps[i]` is the whitespace after `words[i]`.


def _split(text: str) -> tuple[str, list[str], list[str]]:
    body = text.lstrip()
    parts = re.split(r"(\s+)", body)  # word, whitespace, word, ..., word-or-""
    words, seps = parts[0::2], parts[1::2]
    if words[-1] == "":  # the text ended in whitespace (or was empty): that whitespace follows the last word
        words.pop()
    seps += [""] * (len(words) - len(seps))
    return text[: len(text) - len(body)], words, seps


def _join(lead: str, words: list[str], seps: list[str]) -> str:
    return lead + "".join(w + s for w, s in zip(words, seps))


def _word_synonyms(token: str) -> tuple[re.Match[str] | None, tuple[str, ...]]:
    m = _WORD.match(token)
    return m, synonyms(m.group(2)) if m else ()


def _with_case(synonym: str, core: str) -> str:
    return synonym[0].upper() + synonym[1:] if core[0].isupper() else synonym


def _n_changes(prob: float, n_words: int) -> int:
    return max(1, round(prob * n_words)) if prob > 0 else 0


def synonym_replacement(words: list[str], seps: list[str], prob: float, rng: random.Random) -> None:
    order = list(range(len(words)))
    rng.shuffle(order)
    todo = _n_changes(prob, len(words))
    for i in order:
        if todo == 0:
            break
        m, syns = _word_synonyms(words[i])
        if syns:
            words[i] = m.group(1) + _with_case(rng.choice(syns), m.group(2)) + m.group(3)
            todo -= 1


def random_insertion(words: list[str], seps: list[str], prob: float, rng: random.Random) -> None:
    sources = [syns for syns in (_word_synonyms(w)[1] for w in words) if syns]
    if not sources:
        return
    for _ in range(_n_changes(prob, len(words))):
        i = rng.randrange(len(words))  # before an existing word, as in EDA: never after the last one
        words.insert(i, rng.choice(rng.choice(sources)))
        seps.insert(i, " ")


def random_swap(words: list[str], seps: list[str], prob: float, rng: random.Random) -> None:
    if len(words) < 2:
        return
    for _ in range(_n_changes(prob, len(words))):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]


def random_deletion(words: list[str], seps: list[str], prob: float, rng: random.Random) -> None:
    if len(words) < 2:
        return
    keep = [rng.random() >= prob for _ in words]
    if not any(keep):
        keep[rng.randrange(len(words))] = True
    # A dropped word takes the whitespace before it, so the break after it survives ("a b\nc" minus b -> "a\nc").
    kept_words, kept_seps = [], []
    for i, (w, s) in enumerate(zip(words, seps)):
        if keep[i]:
            kept_words.append(w)
            kept_seps.append(s)
        elif kept_seps:
            kept_seps[-1] = s
    words[:], seps[:] = kept_words, kept_seps


EDITS = {
    "synonym_replacement": synonym_replacement,
    "random_insertion": random_insertion,
    "random_swap": random_swap,
    "random_deletion": random_deletion,
}


# -----------------------------------------------------------------------------
# The augmenter


class TextAugmenter:
    """EDA edits and back-translation over a list of texts, of text records, or of chat records.

    methods: any of METHODS; each copy uses one, drawn uniformly (a method listed twice is drawn twice as often).
    prob: EDA's alpha, in [0, 1] (see the module docstring for what it means per method).
    n_aug: augmented copies per record, >= 1.
    keep_original: return each original before its copies (as EDA does); False returns only the copies.
    seed: record i uses random.Random(f"{seed}:{i}"); None draws fresh randomness on every call.
    translators: (to_pivot, from_pivot), each str -> str (two models' generate functions, say); needed by
        "back_translation", whose result is from_pivot(to_pivot(text)).
    text_field: the key a text record's text is under; a dict without it that has "messages" is a chat record,
        whose user turns' "content" is augmented and every other turn copied as is.
    record_field: the key added to every output dict saying how it was made ("original" or the method name); None
        adds nothing. Strings carry no such note.
    """

    def __init__(
        self,
        methods: Sequence[str] | str = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion"),
        prob: float = 0.1,
        n_aug: int = 4,
        *,
        keep_original: bool = True,
        seed: int | None = 0,
        translators: tuple[Callable[[str], str], Callable[[str], str]] | None = None,
        text_field: str = "text",
        record_field: str | None = "augmentation",
    ) -> None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        if not methods:
            raise ValueError(f"methods is empty: choose one or more of {', '.join(METHODS)}")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown augmentation method {m!r}: choose from {', '.join(METHODS)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob={prob}: must be in [0, 1] (the share of words changed; EDA uses 0.05-0.3)")
        if not isinstance(n_aug, int) or n_aug < 1:
            raise ValueError(f"n_aug={n_aug!r}: must be an integer >= 1 (augmented copies per record)")
        if "back_translation" in methods:
            if translators is None:
                raise ValueError(
                    "back_translation needs a model to translate with: pass translators=(to_pivot, from_pivot), two "
                    "str -> str callables, e.g. lambda t: generate(en_fr, tok, t, max_tokens=256)[0].text and its "
                    "reverse; or drop 'back_translation' from methods"
                )
            if len(translators) != 2 or not all(callable(t) for t in translators):
                raise ValueError("translators must be a pair of str -> str callables: (to_pivot, from_pivot)")
        if SYNONYM_METHODS.intersection(methods) and wordnet_dir() is None:
            wanted = ", ".join(sorted(SYNONYM_METHODS.intersection(methods)))
            raise ValueError(
                f"{wanted} need WordNet and none was found in {', '.join(WORDNET_DIRS)}: {INSTALL_HINT}; "
                "random_swap and random_deletion work without it"
            )
        self.methods = methods
        self.prob = float(prob)
        self.n_aug = n_aug
        self.keep_original = keep_original
        self.seed = seed
        self.translators = translators
        self.text_field = text_field
        self.record_field = record_field

    def augment(self, text: str, rng: random.Random, method: str | None = None) -> tuple[str, str]:
        """One augmented copy of `text`: (the method used, the new text). `method` None draws one from `methods`."""
        method = method or rng.choice(self.methods)
        if method == "back_translation":
            to_pivot, from_pivot = self.translators
            pivot = to_pivot(text)
            if not isinstance(pivot, str):
                raise ValueError(f"translators[0] returned {type(pivot).__name__}, not str: return the decoded text")
            back = from_pivot(pivot)
            if not isinstance(back, str):
                raise ValueError(f"translators[1] returned {type(back).__name__}, not str: return the decoded text")
            return method, back
        lead, words, seps = _split(text)
        EDITS[method](words, seps, self.prob, rng)
        return method, _join(lead, words, seps)

    def transform(self, dataset: Sequence[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        """Each record's original (when keep_original) followed by its n_aug copies, in dataset order; a string
        gives strings, a dict gives dicts with every other key copied unchanged."""
        if isinstance(dataset, (str, dict)):
            raise ValueError(f"transform takes a list of records, got one {type(dataset).__name__}: wrap it in [...]")
        out: list[str | dict[str, Any]] = []
        for i, record in enumerate(dataset):
            edit = self._record_editor(i, record)
            rng = random.Random(None if self.seed is None else f"{self.seed}:{i}")
            if self.keep_original:
                out.append(edit("original", None))
            for _ in range(self.n_aug):
                method = rng.choice(self.methods)
                out.append(edit(method, lambda text, m=method, r=rng: self.augment(text, r, m)[1]))
        return out

    def _record_editor(self, i: int, record: Any) -> Callable[[str, Callable[[str], str] | None], Any]:
        """Checks record i and returns edit(method, fn): a copy of the record with fn applied to its text(s)."""
        if isinstance(record, str):
            return lambda method, fn: fn(record) if fn else record
        if not isinstance(record, dict):
            raise ValueError(f"record {i} is a {type(record).__name__}: expected a str or a dict")
        if self.record_field is not None and self.record_field in record:
            raise ValueError(
                f"record {i} already has the key {self.record_field!r}, which transform would overwrite: "
                "pass record_field=None or another name"
            )
        field = self.text_field
        if field in record:
            if not isinstance(record[field], str):
                raise ValueError(f"record {i}: {field!r} is a {type(record[field]).__name__}, expected a str")
            turns = None
        elif "messages" in record:
            turns = record["messages"]
            if not isinstance(turns, list) or not all(isinstance(t, dict) and "role" in t for t in turns):
                raise ValueError(f"record {i}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts")
            for j, t in enumerate(turns):
                if t["role"] == "user" and not isinstance(t.get("content"), str):
                    kind = type(t.get("content")).__name__
                    raise ValueError(f"record {i}: messages[{j}] (user) 'content' is a {kind}, expected a str")
        else:
            raise ValueError(
                f"record {i} has no {field!r} key (keys: {', '.join(map(repr, record)) or 'none'}): expected a "
                f"{field!r} string, or a 'messages' list of chat turns; pass text_field= if the text is elsewhere"
            )

        def edit(method: str, fn: Callable[[str], str] | None) -> dict[str, Any]:
            new = copy.deepcopy(record)
            if fn is not None:
                if turns is None:
                    new[field] = fn(record[field])
                else:
                    for t in new["messages"]:
                        if t["role"] == "user":  # never the assistant's target, nor system or tool turns
                            t["content"] = fn(t["content"])
            if self.record_field is not None:
                new[self.record_field] = method
            return new

        return edit
