"""Data: corpora read as documents (corpus.py), prompt/answer pairs (pairs.py), token files and
batches (tokens.py), and the demo's Shakespeare corpus (shakespeare.py)."""

from .corpus import TEXT_SUFFIXES, DataError, find_files, read_documents
from .pairs import PAIR_FORMATS, detect_task, dialogue_pairs, encode_pairs, pair_batch, qa_pairs, write_pairs
from .tokens import TokenData, encode_documents, prepare, split_for_encoding, token_dtype

__all__ = ["DataError", "PAIR_FORMATS", "TEXT_SUFFIXES", "TokenData", "detect_task", "dialogue_pairs",
           "encode_documents", "encode_pairs", "find_files", "pair_batch", "prepare", "qa_pairs",
           "read_documents", "split_for_encoding", "token_dtype", "write_pairs"]
