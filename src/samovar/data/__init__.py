"""Data: corpora read as documents (corpus.py), conversations in their formats and masked examples
(conversations.py), prompt/answer pairs (pairs.py), token files and batches (tokens.py), and the
demo's Shakespeare corpus (shakespeare.py)."""

from .conversations import (FORMATS, Conversation, ReadOptions, masked_batch, packed_batch, read_conversations,
                            split_by_group)
from .corpus import TEXT_SUFFIXES, DataError, document_pieces, find_files, read_documents, split_for_encoding
from .pairs import PAIR_FORMATS, detect_task, dialogue_pairs, pair_examples, qa_pairs
from .tokens import TokenData, conversation_examples, encode_documents, prepare, token_dtype

__all__ = ["Conversation", "DataError", "FORMATS", "PAIR_FORMATS", "ReadOptions", "TEXT_SUFFIXES", "TokenData",
           "conversation_examples", "detect_task", "dialogue_pairs", "document_pieces", "encode_documents", "find_files", "masked_batch",
           "packed_batch", "pair_examples", "prepare", "qa_pairs", "read_conversations", "read_documents",
           "split_by_group", "split_for_encoding", "token_dtype"]
