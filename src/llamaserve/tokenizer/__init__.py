"""Tokenizers (Llama 3 tiktoken, Llama 2 sentencepiece, Hugging Face tokenizer.json), chat
formats, and the incremental detokenizer used for streaming."""

from llamaserve.tokenizer.base import Tokenizer, TokenizerError
from llamaserve.tokenizer.chat import encode_chat, normalize_messages
from llamaserve.tokenizer.detokenizer import IncrementalDetokenizer
from llamaserve.tokenizer.hf import HFTokenizer
from llamaserve.tokenizer.llama2 import Llama2Tokenizer
from llamaserve.tokenizer.llama3 import Llama3Tokenizer
from llamaserve.tokenizer.loader import default_tokenizer_path, load_tokenizer

__all__ = [
    "HFTokenizer",
    "IncrementalDetokenizer",
    "Llama2Tokenizer",
    "Llama3Tokenizer",
    "Tokenizer",
    "TokenizerError",
    "default_tokenizer_path",
    "encode_chat",
    "load_tokenizer",
    "normalize_messages",
]
