"""Data for training: tokenizers, corpora, a cached token array, a train/val split and deterministic batches.

* ``tokenizers``: the ``Tokenizer`` interface, ``CharTokenizer``, byte-level ``BPETokenizer``, save/load;
* ``corpus``: a UTF-8 text file or the built-in corpus (the Python standard library), token ids cached on disk;
* ``chat``: chat fine-tuning data (assistant-only loss mask, a JSONL reader, packing with a document mask);
* ``batches``: the train/val split, batches drawn from ``(seed, step)``, exact whole-split windows, ``load_dataset``.

Every name is re-exported here: ``from ftransformer.data import X`` is the way in.
"""

from ftransformer.data.batches import (
    Dataset,
    Prefetcher,
    SplitWindows,
    fixed_batches,
    load_dataset,
    min_tokens,
    sample_batch,
    split_ids,
    to_device,
    unpack_batch,
)
from ftransformer.data.chat import ChatData, Example, Packed, pack, read_chat_jsonl, render_with_mask
from ftransformer.data.corpus import (
    BUILTIN_CORPUS,
    BUILTIN_MAX_CHARS,
    builtin_corpus,
    cache_key,
    load_corpus,
    read_text_file,
    stdlib_files,
    tokenize_cached,
)
from ftransformer.data.tokenizers import (
    TOKENIZER_FILE,
    TOKENIZER_KINDS,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)

# Kept for the callers that wrote files through ``data`` before ``ftransformer.io`` existed.
from ftransformer.io import atomic_write, temp_sibling

__all__ = [
    "BUILTIN_CORPUS", "BUILTIN_MAX_CHARS", "BPETokenizer", "CharTokenizer", "ChatData", "Dataset", "Example",
    "Packed", "Prefetcher", "SplitWindows", "TOKENIZER_FILE", "TOKENIZER_KINDS", "Tokenizer", "atomic_write",
    "build_tokenizer", "builtin_corpus", "cache_key", "fixed_batches", "load_corpus", "load_dataset",
    "load_tokenizer", "min_tokens", "pack", "read_chat_jsonl", "read_text_file", "render_with_mask", "sample_batch",
    "split_ids", "stdlib_files", "temp_sibling", "to_device", "tokenize_cached", "tokenizer_from_json",
    "unpack_batch",
]
