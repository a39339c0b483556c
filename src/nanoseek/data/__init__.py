"""Tokenizer and data pipeline: sources -> byte-level BPE -> token shards -> deterministic, resumable batches.

    tokenizer.py   train_tokenizer, Tokenizer (DeepSeek-V3 special tokens, chat template), token_tax_report
    corpora.py     iter_documents: files, folders, JSON Lines, built-ins (python-stdlib, chatterbot)
    shards.py      prepare (`nanoseek data prepare`), TokenStream / open_split over the checked shards
    loader.py      Batches (training), eval_batches (validation)
    commands.py    the `nanoseek tokenizer` and `nanoseek data` commands
"""

from nanoseek.data.corpora import BUILTINS, Document, Report, iter_documents
from nanoseek.data.loader import Batches, eval_batches
from nanoseek.data.shards import Summary, TokenStream, open_split, prepare, read_index
from nanoseek.data.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    USER,
    DataError,
    TaxRow,
    Tokenizer,
    token_tax_report,
    train_tokenizer,
)

__all__ = [
    "ASSISTANT",
    "BOS",
    "BUILTINS",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "USER",
    "Batches",
    "DataError",
    "Document",
    "Report",
    "Summary",
    "TaxRow",
    "TokenStream",
    "Tokenizer",
    "eval_batches",
    "iter_documents",
    "open_split",
    "prepare",
    "read_index",
    "token_tax_report",
    "train_tokenizer",
]
