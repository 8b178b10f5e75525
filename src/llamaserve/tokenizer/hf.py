"""Hugging Face `tokenizer.json` (what HF model directories ship), through the `tokenizers` library.

bos/eos/stop ids come from the files next to it (`tokenizer_config.json`,
`generation_config.json`, `config.json`) when present, else from well-known token names.
The per-token byte table is derived from the decoder the file declares: byte-level (Llama 3) or
sentencepiece-style "▁" + byte fallback (Llama 2); other decoders are not Llama's and are refused.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import MappingProxyType

import tokenizers

from llamaserve.config import ConfigError, read_json
from llamaserve.tokenizer.base import Tokenizer, TokenizerError

_SPACE = "\u2581"
_BOS_NAMES = ("<|begin_of_text|>", "<s>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|eot_id|>")
# Tokens that end a turn whenever the vocabulary has them, whatever the configs say.
_ALWAYS_STOP_NAMES = ("<|end_of_text|>", "<|eot_id|>")


_UNSET = object()
_specials_lock = threading.Lock()


def _has_template(spec) -> bool:
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        return any(_has_template(p) for p in spec.get("processors", []))
    return spec.get("type") in ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable bytes stand for themselves, the other 68
    bytes are shifted to code points 256.. in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    kept = set(keep)
    chars = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in kept:
            chars[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in chars.items()}


def _flatten_decoders(spec) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        out = []
        for d in spec.get("decoders", []):
            out.extend(_flatten_decoders(d))
        return out
    return [spec]


def _read_json_if_present(path: Path) -> dict:
    # lexists: a FIFO or a dangling link is reported by the bounded read, not silently skipped.
    if not os.path.lexists(path):
        return {}
    try:
        return read_json(path)
    except ConfigError as e:
        raise TokenizerError(f"cannot read {e}") from None


def _as_id_list(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer(Tokenizer):
    family = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(self.path))
            decoder_spec = json.loads(tok.decoder.__getstate__()) if tok.decoder is not None else None
            processor = json.loads(tok.post_processor.__getstate__()) if tok.post_processor is not None else None
        except Exception as e:  # JSON errors and the library's own parse errors
            raise TokenizerError(f"tokenizer file {self.path} is not a valid Hugging Face tokenizer.json: {e}") from e
        # Text typed by a user must stay text even when it spells "<|eot_id|>".
        tok.encode_special_tokens = True
        self._tok = tok
        self._has_template_processor = _has_template(processor)

        vocab = tok.get_vocab(with_added_tokens=False)
        added = tok.get_added_tokens_decoder()
        size = max([*vocab.values(), *added.keys(), -1]) + 1
        if size == 0:
            raise TokenizerError(f"tokenizer file {self.path} has an empty vocabulary")
        self.vocab_size = size
        self._token_bytes = self._build_table(decoder_spec, vocab, added, size)
        self.special_tokens = MappingProxyType({t.content: i for i, t in added.items() if t.special})
        self.chat_template = "llama3" if self._id("<|start_header_id|>") is not None else "llama2"
        tok_cfg = _read_json_if_present(self.path.parent / "tokenizer_config.json")
        self._resolve_special_ids(tok_cfg)
        self._load_template(tok_cfg)

    def _load_template(self, tok_cfg: dict) -> None:
        from llamaserve.tokenizer.template import ChatTemplate, find_template

        # What transformers passes a template: the special tokens tokenizer_config.json names.
        variables = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = tok_cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                variables[key] = value
            elif key not in tok_cfg and key in ("bos_token", "eos_token"):
                token_id = self.bos_id if key == "bos_token" else self.eos_id
                if token_id is not None:
                    variables[key] = self._tok.id_to_token(token_id)
        self.template_variables = variables
        found = find_template(self.path.parent, tok_cfg)
        if found is not None:
            self.template = ChatTemplate(found[0], found[1], variables)
            self.chat_template = "jinja"

    # ---- construction helpers -------------------------------------------------------------
    def _build_table(self, decoder_spec, vocab: dict[str, int], added: dict, size: int) -> list[bytes]:
        decoders = _flatten_decoders(decoder_spec)
        kinds = {d.get("type") for d in decoders}
        table = [b""] * size
        if "ByteLevel" in kinds:
            # str.translate + latin-1 maps every symbol back to its byte at C speed (128k tokens).
            to_byte = {ord(c): b for c, b in _gpt2_byte_decoder().items()}
            for s, i in vocab.items():
                try:
                    table[i] = s.translate(to_byte).encode("latin-1")
                except UnicodeEncodeError:  # not a byte-level symbol: keep the text
                    table[i] = s.encode()
        elif "Metaspace" in kinds or any(
            d.get("type") == "Replace" and d.get("pattern", {}).get("String") == _SPACE for d in decoders
        ):
            byte_fallback = "ByteFallback" in kinds
            for s, i in vocab.items():
                if byte_fallback and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                    table[i] = bytes([int(s[3:5], 16)])
                else:
                    table[i] = s.replace(_SPACE, " ").encode()
            self.strips_leading_space = any(
                (d.get("type") == "Strip" and d.get("start", 0) >= 1)
                or (d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never"
                    and d.get("add_prefix_space", True))
                for d in decoders
            )
        else:
            raise TokenizerError(
                f"tokenizer file {self.path} uses decoder {sorted(k for k in kinds if k) or None}; "
                f"only Llama's byte-level and sentencepiece-style tokenizers are supported"
            )
        for i, t in added.items():
            table[i] = t.content.encode()
        return table

    def _id(self, name: str) -> int | None:
        return self._tok.token_to_id(name)

    def _resolve_special_ids(self, tok_cfg: dict) -> None:
        folder = self.path.parent
        gen_cfg = _read_json_if_present(folder / "generation_config.json")
        model_cfg = _read_json_if_present(folder / "config.json")

        def named(key: str):
            """The id tokenizer_config.json gives key; _UNSET if it does not say, None if it says null."""
            if key not in tok_cfg:
                return _UNSET
            value = tok_cfg[key]
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {key} must be a token string, got {value!r:.60}")
            token_id = self._id(value)
            if token_id is None:
                raise TokenizerError(
                    f"{folder / 'tokenizer_config.json'} names {key}={value!r}, which is not in {self.path}"
                )
            return token_id

        def from_configs(key: str) -> list[int]:
            for cfg in (gen_cfg, model_cfg):
                ids = _as_id_list(cfg.get(key))
                if ids:
                    return ids
            return []

        def by_name(names) -> int | None:
            for name in names:
                if self._id(name) is not None:
                    return self._id(name)
            return None

        # tokenizer_config.json decides when it names the token (null: the model has no BOS, as
        # transformers reads it); otherwise the model configs, then Llama's well-known names.
        bos = named("bos_token")
        if bos is _UNSET:
            bos = (from_configs("bos_token_id") or [None])[0]
            if bos is None:
                bos = by_name(_BOS_NAMES)
        eos = named("eos_token")
        config_eos = from_configs("eos_token_id")
        if eos is None or eos is _UNSET:
            eos = config_eos[0] if config_eos else by_name(_EOS_NAMES)
        if eos is None:
            raise TokenizerError(
                f"cannot tell the eos token of {self.path}: no tokenizer_config.json/generation_config.json/"
                f"config.json names it and the vocabulary has none of {_EOS_NAMES}"
            )
        for what, token_id in (("bos", bos), ("eos", eos), *(("eos", i) for i in config_eos)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{what} token id {token_id} for {self.path} is outside its vocabulary")
        self.bos_id, self.eos_id = bos, eos
        self.add_bos = self._adds_bos(tok_cfg, folder)
        stops = {eos, *config_eos}
        stops.update(i for i in map(self._id, _ALWAYS_STOP_NAMES) if i is not None)
        self.stop_token_ids = frozenset(stops)

    def _adds_bos(self, tok_cfg: dict, folder: Path) -> bool:
        """Whether a prompt starts with BOS: tokenizer_config.json's add_bos_token when it says;
        else what the tokenizer.json's post-processor does (as transformers encodes); a file with
        no post-processor template is a Meta-style Llama one when its BOS has a Llama name."""
        if self.bos_id is None:
            return False
        flag = tok_cfg.get("add_bos_token")
        if flag is not None:
            if not isinstance(flag, bool):
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: add_bos_token must be true or false, got {flag!r:.40}")
            return flag
        if self._has_template_processor:
            with_specials = self._tok.encode("a", add_special_tokens=True).ids
            return bool(with_specials) and with_specials[0] == self.bos_id
        return self._tok.id_to_token(self.bos_id) in _BOS_NAMES

    # ---- interface ------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        # The library's own matching of special tokens (lstrip/rstrip flags, where a Metaspace
        # "first" prefix goes) is what transformers gets; a second instance keeps the shared one
        # plain-text only. Built on first use: only chat templates need it.
        tok = self.__dict__.get("_specials_tok")
        if tok is None:
            with _specials_lock:
                tok = self.__dict__.get("_specials_tok")
                if tok is None:
                    tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
                    tok.encode_special_tokens = False
                    self.__dict__["_specials_tok"] = tok
        return tok.encode(text, add_special_tokens=False).ids

    def first_token_bytes(self, token_id: int) -> bytes:
        b = self.token_bytes(token_id)
        return b[1:] if b.startswith(b" ") else b
