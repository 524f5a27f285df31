"""Data: corpus sources, the BPE tokenizer, token shards and deterministic batches.

    from piformer.data import prepare, TokenData
    prepare("builtin", "data/builtin")           # stdlib .py files -> tokenizer + shards
    data = TokenData("data/builtin")
    x, y = data.get_batch("train", 16, 128, step=0)
"""

from .prepare import prepare
from .shards import TokenData, read_meta, token_dtype
from .sources import Corpus, open_corpus
from .tokenizer import EOT, load_tokenizer, train_tokenizer

__all__ = ["prepare", "TokenData", "read_meta", "token_dtype", "Corpus", "open_corpus",
           "EOT", "load_tokenizer", "train_tokenizer"]
