"""TextAugmenter: the design's call, seeded determinism, WordNet synonyms, stop-words, chat records, errors, and
back-translation. Needs Debian's wordnet-base (scripts/install.sh installs it); ~3 s, most of it loading WordNet."""

from __future__ import annotations

import random

import pytest

from deepsail.data import TextAugmenter, augment
from deepsail.data.augment import METHODS, STOP_WORDS, synonyms, wordnet

EDA = ["synonym_replacement", "random_insertion", "random_swap", "random_deletion"]

# A toy "translation" pair: English -> pseudo-French word by word, and back with one paraphrase (film -> movie), so
# a back-translated text differs from its original in a known way, as a real round trip through two models would.
TO_FR = {"i": "je", "liked": "aimais", "the": "le", "film": "film", "a": "un", "lot": "beaucoup"}
FROM_FR = {v: k for k, v in TO_FR.items()} | {"film": "movie"}


class Translator:
    """Maps word by word and remembers every text it was given."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table, self.seen = table, []

    def __call__(self, text: str) -> str:
        self.seen.append(text)
        return " ".join(self.table.get(w, w) for w in text.split())


def toy_translators() -> tuple[Translator, Translator]:
    return Translator(TO_FR), Translator(FROM_FR)


def lemma_set(word: str) -> set[str]:
    """Every WordNet lemma of every synset of `word`, straight from the reader (lowercase, spaces for '_')."""
    return {lemma.name().replace("_", " ").lower() for s in wordnet().synsets(word) for lemma in s.lemmas()}


RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog near the river bank.", "label": 1, "id": "a"},
    {"text": "A happy child watched a funny movie with her old friend.", "label": 0, "id": "b"},
]


def test_design_call_returns_originals_and_two_copies_with_labels():
    # The design's call, as written, names back_translation but passes no model to translate with: that is the
    # documented ValueError (a requested method is never silently skipped) ...
    with pytest.raises(ValueError, match=r"back_translation needs a model .*translators=\(to_pivot, from_pivot\)"):
        TextAugmenter(
            methods=["synonym_replacement", "random_insertion", "random_swap", "random_deletion", "back_translation"],
            prob=0.4,
            n_aug=2,
        )
    # ... and the same call with the two translators runs.
    aug = TextAugmenter(
        methods=["synonym_replacement", "random_insertion", "random_swap", "random_deletion", "back_translation"],
        prob=0.4,
        n_aug=2,
        translators=toy_translators(),
    )
    out = aug.transform(RECORDS)
    assert len(out) == len(RECORDS) * 3
    for i, record in enumerate(RECORDS):
        original, *copies = out[3 * i : 3 * i + 3]
        assert original == record | {"augmentation": "original"}
        assert len(copies) == 2
        for c in copies:
            assert (c["label"], c["id"]) == (record["label"], record["id"])
            assert c["augmentation"] in METHODS
            assert isinstance(c["text"], str) and c["text"]
    assert any(c["text"] != r["text"] for c, r in zip(out[1::3] + out[2::3], RECORDS * 2))
    assert RECORDS[0]["text"].startswith("The quick")  # the input was not modified
    assert "augmentation" not in RECORDS[0]


def test_strings_in_strings_out_and_keep_original():
    texts = ["one two three four five", "six seven\neight nine"]
    out = TextAugmenter(["random_swap"], prob=0.5, n_aug=3).transform(texts)
    assert len(out) == 8 and all(isinstance(t, str) for t in out)
    assert out[0] == texts[0] and out[4] == texts[1]
    for t in out[5:8]:  # swapped words, same whitespace between them
        assert sorted(t.split()) == sorted(texts[1].split()) and t.count("\n") == 1
    only = TextAugmenter(["random_swap"], prob=0.5, n_aug=3, keep_original=False).transform(texts)
    assert only == out[1:4] + out[5:8]


def test_same_seed_same_output_different_seed_differs():
    texts = [r["text"] for r in RECORDS] * 3
    a = TextAugmenter(EDA, prob=0.3, n_aug=4, seed=7)
    first = a.transform(texts)
    assert TextAugmenter(EDA, prob=0.3, n_aug=4, seed=7).transform(texts) == first
    assert a.transform(texts) == first  # a second call on the same augmenter: no state carried over
    assert TextAugmenter(EDA, prob=0.3, n_aug=4, seed=8).transform(texts) != first
    # a record's copies depend on its index, not on the records before it: a shard augments like the whole
    assert a.transform(texts[:2]) == first[:10]


def test_replacements_are_wordnet_synonyms_and_stop_words_stay():
    text = "The happy dog watched a movie."
    # the edit itself, on a word list, so each position can be compared (a synonym may be two words: "watch over")
    for seed in range(5):
        lead, words, seps = augment._split(text)
        augment.synonym_replacement(words, seps, 1.0, random.Random(seed))
        assert augment._join(lead, words, seps).startswith("The ") and " a " in augment._join(lead, words, seps)
        assert words[0] == "The" and words[4] == "a"  # stop-words: never replaced
        assert words[-1].endswith(".")  # punctuation stays on its word
        for old, new in zip(text.split(), words):
            core, repl = old.rstrip("."), new.rstrip(".")
            if core.lower() in STOP_WORDS:
                continue
            assert repl != core  # prob=1: every word with a synonym is replaced
            assert repl.lower() in lemma_set(core), (core, repl)
        # the WordNet 3.0 synset of "movie", written out by hand so the test does not only agree with itself
        movie = {"film", "picture", "moving picture", "moving-picture show", "motion picture", "motion-picture show"}
        assert words[5].rstrip(".") in movie | {"picture show", "pic", "flick"}
    # and through transform
    copies = TextAugmenter(["synonym_replacement"], prob=1.0, n_aug=3, keep_original=False).transform([text])
    assert all(c.startswith("The ") and " a " in c and c != text for c in copies)
    assert synonyms("the") == synonyms("A") == ()
    assert synonyms("xyzzy") == ()  # not in WordNet: nothing to replace with
    assert TextAugmenter(["synonym_replacement"], prob=1.0, n_aug=2).transform(["xyzzy"]) == ["xyzzy"] * 3


def test_insertion_inserts_synonyms_of_content_words_only():
    text = "it is on the table"
    allowed = set(synonyms("table"))
    assert allowed
    for copy_ in TextAugmenter(["random_insertion"], prob=0.2, n_aug=10, keep_original=False).transform([text]):
        # prob 0.2 of 5 words: one insertion, of a synonym of "table" (the only content word), before some word
        assert any(copy_.replace(s + " ", "", 1) == text for s in allowed), copy_
    for copy_ in TextAugmenter(["synonym_replacement"], prob=1.0, n_aug=5, keep_original=False).transform([text]):
        assert copy_.split()[:4] == ["it", "is", "on", "the"] and copy_.split()[4:] != ["table"]


def test_deletion_probability():
    text = "alpha beta gamma delta epsilon"
    assert TextAugmenter(["random_deletion"], prob=0.0, n_aug=3).transform([text]) == [text] * 4
    for copy_ in TextAugmenter(["random_deletion"], prob=1.0, n_aug=5, keep_original=False).transform([text]):
        assert len(copy_.split()) == 1 and copy_ in text.split()  # every word drawn for deletion: one stays
    kept = TextAugmenter(["random_deletion"], prob=0.5, n_aug=50, keep_original=False).transform([text])
    assert 0.3 < sum(len(t.split()) for t in kept) / (50 * 5) < 0.7


def test_chat_records_augment_only_user_turns():
    chat = {
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Please explain how a car engine works in simple words."},
            {"role": "assistant", "content": "An engine burns fuel to push pistons, which turn the wheels."},
            {"role": "user", "content": "What happens when the engine gets too hot?"},
            {"role": "assistant", "content": "Metal expands and oil thins, so parts wear quickly."},
        ],
        "source": "demo",
    }
    out = TextAugmenter(EDA, prob=0.5, n_aug=12).transform([chat])
    assert out[0] == chat | {"augmentation": "original"}
    user_changed = False
    for copy_ in out[1:]:
        assert copy_["source"] == "demo" and len(copy_["messages"]) == 5
        for old, new in zip(chat["messages"], copy_["messages"]):
            assert new["role"] == old["role"]
            if old["role"] == "user":
                user_changed |= new["content"] != old["content"]
            else:
                assert new == old  # the assistant's target (and the system prompt) never change
    assert user_changed

    to_pivot, from_pivot = toy_translators()
    TextAugmenter(["back_translation"], n_aug=1, translators=(to_pivot, from_pivot)).transform([chat])
    assert to_pivot.seen == [chat["messages"][1]["content"], chat["messages"][3]["content"]]


def test_back_translation_is_applied_and_recorded():
    to_pivot, from_pivot = toy_translators()
    aug = TextAugmenter(["back_translation"], n_aug=2, translators=(to_pivot, from_pivot))
    out = aug.transform([{"text": "i liked the film a lot", "label": 1}, "the film"])
    assert out[:3] == [
        {"text": "i liked the film a lot", "label": 1, "augmentation": "original"},
        {"text": "i liked the movie a lot", "label": 1, "augmentation": "back_translation"},
        {"text": "i liked the movie a lot", "label": 1, "augmentation": "back_translation"},
    ]
    assert out[3:] == ["the film", "the movie", "the movie"]
    assert to_pivot.seen == ["i liked the film a lot"] * 2 + ["the film"] * 2
    assert from_pivot.seen == ["je aimais le film un beaucoup"] * 2 + ["le film"] * 2

    bad = TextAugmenter(["back_translation"], n_aug=1, translators=(to_pivot, lambda t: [1, 2]))
    with pytest.raises(ValueError, match=r"translators\[1\] returned list, not str"):
        bad.transform(["the film"])


@pytest.mark.parametrize(
    "dataset, message",
    [
        (["fine", {"txt": "x", "label": 1}], r"record 1 has no 'text' key \(keys: 'txt', 'label'\).*text_field="),
        ([{"text": 3}], r"record 0: 'text' is a int, expected a str"),
        ([{"text": "ok"}, 42], r"record 1 is a int: expected a str or a dict"),
        ([{"messages": [{"role": "user", "content": None}]}], r"record 0: messages\[0\] \(user\) 'content' is a Non"),
        ([{"messages": "hello"}], r"record 0: 'messages' must be a list"),
        ([{"text": "x", "augmentation": "mine"}], r"record 0 already has the key 'augmentation'"),
        ("just one string", r"takes a list of records, got one str"),
    ],
)
def test_bad_records_name_the_index_and_key(dataset, message):
    with pytest.raises(ValueError, match=message):
        TextAugmenter(["random_swap"]).transform(dataset)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(methods=["synonym_swap"]),
            r"unknown augmentation method 'synonym_swap': choose from " + ", ".join(METHODS),
        ),
        (dict(methods=[]), r"methods is empty: choose one or more of synonym_replacement"),
        (dict(prob=1.5), r"prob=1.5: must be in \[0, 1\]"),
        (dict(prob=-0.1), r"prob=-0.1: must be in \[0, 1\]"),
        (dict(n_aug=0), r"n_aug=0: must be an integer >= 1"),
        (dict(n_aug=2.5), r"n_aug=2.5: must be an integer >= 1"),
        (dict(methods=["back_translation"]), r"pass translators=\(to_pivot, from_pivot\)"),
        (dict(methods=["back_translation"], translators=(str.upper,)), r"translators must be a pair"),
    ],
)
def test_bad_arguments_say_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextAugmenter(**kwargs)


def test_without_wordnet_synonym_methods_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(augment.WORDNET_ENV, raising=False)
    monkeypatch.setattr(augment, "WORDNET_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(ValueError, match=r"synonym_replacement need WordNet .*apt-get install wordnet-base"):
        TextAugmenter(["synonym_replacement", "random_swap"])
    with pytest.raises(ValueError, match=r"random_insertion need WordNet .*DEEPSAIL_WORDNET"):
        TextAugmenter(["random_insertion"])
    out = TextAugmenter(["random_swap", "random_deletion"], prob=0.5, n_aug=2).transform(["a b c d"])
    assert len(out) == 3 and out[0] == "a b c d"

    monkeypatch.setenv(augment.WORDNET_ENV, str(tmp_path))  # set, but not a WordNet folder
    with pytest.raises(ValueError, match=r"DEEPSAIL_WORDNET=.*: no WordNet there"):
        TextAugmenter(["synonym_replacement"])
