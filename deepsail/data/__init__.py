"""deepsail.data: tokenizer, the embedded default corpus, token shards and the loaders that batch them."""

from deepsail.data.augment import TextAugmenter
from deepsail.data.corpus import CorpusInfo, Document, SkipCounts, default_corpus, default_corpus_info, iter_documents
from deepsail.data.loader import (
    BucketBatcher,
    PackedLoader,
    PaddedBatch,
    TokenStream,
    eval_batches,
    length_buckets,
    read_manifest,
)
from deepsail.data.prepare import prepare
from deepsail.data.tokenizer import SPECIAL_TOKENS, Tokenizer, data_tokenizer, token_byte_lengths

__all__ = [
    "BucketBatcher",
    "CorpusInfo",
    "Document",
    "PackedLoader",
    "PaddedBatch",
    "SPECIAL_TOKENS",
    "SkipCounts",
    "TokenStream",
    "TextAugmenter",
    "Tokenizer",
    "data_tokenizer",
    "default_corpus",
    "default_corpus_info",
    "eval_batches",
    "iter_documents",
    "length_buckets",
    "prepare",
    "read_manifest",
    "token_byte_lengths",
]
