"""Llama 2 tokenizer: a sentencepiece `tokenizer.model` (bos 1, eos 2 in Meta's file)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import sentencepiece as spm

from llamaserve.tokenizer.base import Tokenizer, TokenizerError

_SPACE = "\u2581"  # sentencepiece's visible space
# What sentencepiece prints for an unknown piece (" ⁇ "); kept so decode matches it exactly.
_UNK_SURFACE = " \u2047 ".encode()


class Llama2Tokenizer(Tokenizer):
    family = "llama2"
    chat_template = "llama2"

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with its own words
            raise TokenizerError(f"tokenizer file {self.path} is not a valid sentencepiece model: {e}") from e
        self._sp = sp
        self.vocab_size = sp.vocab_size()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"sentencepiece model {self.path} defines no bos/eos token (bos={self.bos_id}, eos={self.eos_id})"
            )
        self.stop_token_ids = frozenset({self.eos_id})
        # A model trained with add_dummy_prefix (Llama 2 is) starts every encoding with "▁" and
        # its decoder removes it again; the python binding does not expose the flag, so ask.
        first = sp.encode("a", out_type=str)
        self.strips_leading_space = bool(first) and first[0].startswith(_SPACE)

        table: list[bytes] = []
        # Only a normal piece loses its leading "▁" when it comes first; byte pieces and the
        # unknown piece are printed as they are (this is what sentencepiece's decoder does).
        self._strippable = bytearray(self.vocab_size)
        special: dict[str, int] = {}
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i):
                table.append(b"")
                special[piece] = i
            elif sp.is_unknown(i):
                table.append(_UNK_SURFACE)
                special[piece] = i
            elif sp.is_byte(i):
                table.append(bytes([int(piece[3:5], 16)]))  # "<0x0A>"
            else:
                table.append(piece.replace(_SPACE, " ").encode())
                self._strippable[i] = piece.startswith(_SPACE)
        self._token_bytes = table
        self.special_tokens = MappingProxyType(special)

    def _encode_text(self, text: str) -> list[int]:
        # sentencepiece never turns "<s>" typed in text into the control token, so user text
        # is always plain text here.
        return self._sp.encode(text)

    def first_token_bytes(self, token_id: int) -> bytes:
        b = self.token_bytes(token_id)
        return b[1:] if self._strippable[token_id] else b
