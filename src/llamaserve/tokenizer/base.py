"""The `Tokenizer` interface shared by the Llama 3, Llama 2 and Hugging Face tokenizers.

Every tokenizer is reduced to one table: the bytes each token id stands for. Decoding is then a
join over that table, which is what lets `IncrementalDetokenizer` turn one new token into text in
O(1) instead of re-decoding the whole output. The only irregularity is sentencepiece's "dummy
prefix": the space it puts in front of the text when encoding is dropped again from the first
piece when decoding, so the first non-empty token may decode differently (`first_token_bytes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer file is missing, unrecognised or corrupt, or a token id is invalid."""


class Tokenizer:
    """Base class; subclasses fill in the attributes below in their constructor.

    Instances are shared between callers by `load_tokenizer` and must be treated as read-only.
    """

    #: "llama3" (tiktoken), "llama2" (sentencepiece) or "hf" (tokenizer.json)
    family: str
    #: the chat format `encode_chat` uses: "jinja" (the checkpoint's template), "llama3" or "llama2"
    chat_template: str
    #: the checkpoint's own template (`llamaserve.tokenizer.template.ChatTemplate`), if any
    template = None
    path: Path
    bos_id: int | None  # None: the model has no BOS token
    #: whether a prompt starts with BOS (Hugging Face tokenizers say so in their configs)
    add_bos: bool = True
    eos_id: int
    stop_token_ids: frozenset[int]
    vocab_size: int
    #: name -> id of the tokens that text can never produce (Llama 3's <|...|>, "<s>", ...)
    special_tokens: Mapping[str, int]

    # _token_bytes[i] is what token i decodes to anywhere but in first position.
    _token_bytes: list[bytes]
    # True when the first non-empty token of a decode may lose a leading space.
    strips_leading_space: bool = False

    # ---- encoding -------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        """Plain-text encoding: text that looks like a special token stays plain text."""
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a dialog in this model's chat format: its own template when it has one
        (`llamaserve.tokenizer.template`), else the built-in Llama 3 / Llama 2 format."""
        from llamaserve.tokenizer.chat import encode_chat

        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt)

    def special_pattern(self):
        """A regex matching any special token's spelling, longest first (None: there are none)."""
        import re

        cached = self.__dict__.get("_special_re", False)
        if cached is False:
            names = sorted(self.special_tokens, key=len, reverse=True)
            cached = re.compile("|".join(map(re.escape, names))) if names else None
            self.__dict__["_special_re"] = cached
        return cached

    def encode_with_specials(self, text: str) -> list[int]:
        """Encode text in which special-token spellings ARE the special tokens: only for text a
        chat template produced itself, never for text from a user."""
        pattern = self.special_pattern()
        if pattern is None:
            return self._encode_text(text)
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            ids += self._encode_text(text[pos:m.start()])
            ids.append(self.special_tokens[m.group(0)])
            pos = m.end()
        return ids + self._encode_text(text[pos:])

    def with_chat_template(self, path: str | Path) -> "Tokenizer":
        """A copy of this tokenizer that renders chats with the template in the file at path
        (`--chat-template`); the shared instance is left as it is."""
        import copy

        from llamaserve.tokenizer.template import ChatTemplate, read_template_file

        twin = copy.copy(self)
        variables = {k: v for k, v in (("bos_token", self._token_text(self.bos_id)),
                                       ("eos_token", self._token_text(self.eos_id))) if v is not None}
        variables.update(getattr(self, "template_variables", {}))
        twin.template = ChatTemplate(read_template_file(path), str(path), variables)
        twin.chat_template = "jinja"
        return twin

    def _token_text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        return self._token_bytes[token_id].decode("utf-8", errors="replace")

    def cover_vocab(self, model_vocab_size: int) -> None:
        """Let ids up to the model's vocabulary decode: models often pad their embedding beyond
        the tokenizer (a multiple of 64 or 128); those ids decode to nothing, as in transformers.
        Only ever grows the table, so sharing the tokenizer between engines stays safe."""
        missing = model_vocab_size - len(self._token_bytes)
        if missing > 0:
            self._token_bytes = self._token_bytes + [b""] * missing

    def special_token_id(self, name: str) -> int | None:
        return self.special_tokens.get(name)

    # ---- decoding -------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids:
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= len(self._token_bytes):
                bad = lo if lo < 0 else hi
                raise TokenizerError(
                    f"token id {bad} is out of range for the tokenizer {self.path} "
                    f"(valid ids are 0..{len(self._token_bytes) - 1})"
                )

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token when it is not the first thing decoded."""
        if not 0 <= token_id < len(self._token_bytes):
            self._check_ids([token_id])
        return self._token_bytes[token_id]

    def first_token_bytes(self, token_id: int) -> bytes:
        """Bytes of the first token that decodes to anything (differs only for sentencepiece)."""
        return self.token_bytes(token_id)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        self._check_ids(ids)
        table = self._token_bytes
        if self.strips_leading_space:
            for k, token_id in enumerate(ids):
                if table[token_id]:  # everything before position k decoded to nothing
                    rest = b"".join(map(table.__getitem__, ids[k + 1:]))
                    return self.first_token_bytes(token_id) + rest
        return b"".join(map(table.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        # "replace" so that a model that emits half a character still gets a string back; the
        # incremental detokenizer uses the same rule, so both agree to the character.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, vocab_size={self.vocab_size}, path={str(self.path)!r})"
