"""Hugging Face `tokenizer.json` (what HF model directories ship), through the `tokenizers` library.

bos/eos/stop ids come from the files next to it (`tokenizer_config.json`,
`generation_config.json`, `config.json`) when present, else from well-known token names.
The per-token byte table is derived from the decoder the file declares: byte-level (Llama 3) or
sentencepiece-style "▁" + byte fallback (Llama 2); other decoders are not Llama's and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import tokenizers

from llamaserve.tokenizer.base import Tokenizer, TokenizerError

_SPACE = "\u2581"
_BOS_NAMES = ("<|begin_of_text|>", "<s>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|eot_id|>")
# Tokens that end a turn whenever the vocabulary has them, whatever the configs say.
_ALWAYS_STOP_NAMES = ("<|end_of_text|>", "<|eot_id|>")


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
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


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
        except Exception as e:  # JSON errors and the library's own parse errors
            raise TokenizerError(f"tokenizer file {self.path} is not a valid Hugging Face tokenizer.json: {e}") from e
        # Text typed by a user must stay text even when it spells "<|eot_id|>".
        tok.encode_special_tokens = True
        self._tok = tok

        vocab = tok.get_vocab(with_added_tokens=False)
        added = tok.get_added_tokens_decoder()
        size = max([*vocab.values(), *added.keys(), -1]) + 1
        if size == 0:
            raise TokenizerError(f"tokenizer file {self.path} has an empty vocabulary")
        self.vocab_size = size
        self._token_bytes = self._build_table(decoder_spec, vocab, added, size)
        self.special_tokens = MappingProxyType({t.content: i for i, t in added.items() if t.special})
        self.chat_template = "llama3" if self._id("<|start_header_id|>") is not None else "llama2"
        self._resolve_special_ids()

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

    def _resolve_special_ids(self) -> None:
        folder = self.path.parent
        tok_cfg = _read_json_if_present(folder / "tokenizer_config.json")
        gen_cfg = _read_json_if_present(folder / "generation_config.json")
        model_cfg = _read_json_if_present(folder / "config.json")

        def named(key: str) -> int | None:
            value = tok_cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                token_id = self._id(value)
                if token_id is None:
                    raise TokenizerError(
                        f"{folder / 'tokenizer_config.json'} names {key}={value!r}, which is not in {self.path}"
                    )
                return token_id
            return None

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

        bos = named("bos_token")
        if bos is None:
            bos = (from_configs("bos_token_id") or [None])[0]
        if bos is None:
            bos = by_name(_BOS_NAMES)
        eos = named("eos_token")
        config_eos = from_configs("eos_token_id")
        if eos is None:
            eos = config_eos[0] if config_eos else by_name(_EOS_NAMES)
        if bos is None or eos is None:
            raise TokenizerError(
                f"cannot tell the bos/eos tokens of {self.path}: no tokenizer_config.json/generation_config.json/"
                f"config.json names them and the vocabulary has none of {_BOS_NAMES + _EOS_NAMES}"
            )
        for what, token_id in (("bos", bos), ("eos", eos), *(("eos", i) for i in config_eos)):
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{what} token id {token_id} for {self.path} is outside its vocabulary")
        self.bos_id, self.eos_id = bos, eos
        stops = {eos, *config_eos}
        stops.update(i for i in map(self._id, _ALWAYS_STOP_NAMES) if i is not None)
        self.stop_token_ids = frozenset(stops)

    # ---- interface ------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def first_token_bytes(self, token_id: int) -> bytes:
        b = self.token_bytes(token_id)
        return b[1:] if b.startswith(b" ") else b
