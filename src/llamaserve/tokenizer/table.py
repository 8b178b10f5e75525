"""The engine's tokenizer: a decode-only table, cached in a form that loads in milliseconds.

The engine process never encodes (the server does); it turns generated ids into bytes and reads
the stop ids. A full tokenizer costs every engine start 0.2-0.6 s (parsing a 17 MB tokenizer.json
or 128k tiktoken ranks) for that; its decode table alone, stored as one flat file under
`CACHE_ROOT/llamaserve_tokenizers/`, loads in ~20 ms. The first start builds the full tokenizer
and writes the file (atomically); later starts read it.

The file is keyed by the tokenizer file's path, size and mtime (and those of the configs next to
it, see `tokenizer_key`) and carries a sha256 of its body: a stale, truncated or corrupted file is
reported with a warning and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from array import array
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from llamaserve.tokenizer.base import Tokenizer, TokenizerError
from llamaserve.tokenizer.loader import find_tokenizer_file, load_tokenizer, tokenizer_key
from llamaserve.umask import as_if_created

log = logging.getLogger(__name__)

CACHE_SUBDIR = "llamaserve_tokenizers"
_MAGIC = b"llamaserve token table 1\n"


class TokenTableError(ValueError):
    """A cached token table is stale, truncated or corrupted (the message says which)."""


class DecodeOnlyTokenizer(Tokenizer):
    """Ids -> bytes and the special ids of a tokenizer, without its encoder."""

    def __init__(self, meta: Mapping, table: list[bytes], strip_first: frozenset[int]) -> None:
        self.family = meta["family"]
        self.chat_template = meta["chat_template"]
        self.path = Path(meta["path"])
        self.bos_id = meta["bos_id"]
        self.eos_id = meta["eos_id"]
        self.stop_token_ids = frozenset(meta["stop_token_ids"])
        self.vocab_size = meta["vocab_size"]
        self.special_tokens = MappingProxyType(dict(meta["special_tokens"]))
        self.strips_leading_space = meta["strips_leading_space"]
        self._token_bytes = table
        self._strip_first = strip_first

    def _encode_text(self, text: str) -> list[int]:
        raise TokenizerError(f"the token table of {self.path} only decodes; encode with load_tokenizer()")

    def first_token_bytes(self, token_id: int) -> bytes:
        b = self.token_bytes(token_id)
        return b[1:] if token_id in self._strip_first else b


def table_path(cache_root: str | Path, file: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", file.parent.name)[:60] or "tokenizer"
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:16]
    return Path(cache_root).expanduser() / CACHE_SUBDIR / f"{name}-{file.name}-{digest}.table"


def write_table(dest: Path, tok: Tokenizer, key: tuple) -> None:
    table = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    strip_first = []
    if tok.strips_leading_space:
        for i, b in enumerate(table):
            first = tok.first_token_bytes(i)
            if first != b:
                if first != b[1:]:
                    raise TokenTableError(f"{tok.path}: token {i} decodes first as {first!r}, not {b!r} less a byte")
                strip_first.append(i)
    offsets = array("Q", [0])
    for b in table:
        offsets.append(offsets[-1] + len(b))
    body = array("I", strip_first).tobytes() + offsets.tobytes() + b"".join(table)
    meta = {
        "key": list(key), "family": tok.family, "chat_template": tok.chat_template, "path": str(tok.path),
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "stop_token_ids": sorted(tok.stop_token_ids),
        "vocab_size": tok.vocab_size, "special_tokens": dict(tok.special_tokens),
        "strips_leading_space": tok.strips_leading_space, "n_strip_first": len(strip_first),
        "body_bytes": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    header = json.dumps(meta).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header + body)
        as_if_created(tmp, directory=False)  # not mkstemp's 0600: the cache may be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table(path: Path, key: tuple) -> DecodeOnlyTokenizer:
    data = path.read_bytes()
    start = len(_MAGIC) + 8
    if not data.startswith(_MAGIC) or len(data) < start:
        raise TokenTableError(f"{path} is not a token table (partial or corrupted)")
    n = int.from_bytes(data[len(_MAGIC):start], "little")
    try:
        meta = json.loads(data[start:start + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenTableError(f"{path}: unreadable header ({e}; truncated or corrupted)") from None
    if not isinstance(meta, dict):
        raise TokenTableError(f"{path}: header is not an object (corrupted)")
    if meta.get("key") != json.loads(json.dumps(list(key))):
        raise TokenTableError(f"{path} is stale: {key[0]} or its configs changed since it was written")
    body = data[start + n:]
    if len(body) != meta["body_bytes"]:
        raise TokenTableError(f"{path} has {len(body)} bytes of table, its header says {meta['body_bytes']} (truncated)")
    if hashlib.sha256(body).hexdigest() != meta["body_sha256"]:
        raise TokenTableError(f"{path}: checksum mismatch (corrupted)")
    n_strip, vocab = meta["n_strip_first"], meta["vocab_size"]
    strip_first = array("I")
    strip_first.frombytes(body[:4 * n_strip])
    offsets = array("Q")
    offsets.frombytes(body[4 * n_strip:4 * n_strip + 8 * (vocab + 1)])
    blob = body[4 * n_strip + 8 * (vocab + 1):]
    table = [blob[offsets[i]:offsets[i + 1]] for i in range(vocab)]
    return DecodeOnlyTokenizer(meta, table, frozenset(strip_first))


def load_decode_tokenizer(path: str | Path | None, cache_root: str | Path | None) -> Tokenizer:
    """What the engine process decodes with: the cached token table of the tokenizer at `path`
    (a file or model directory; None: the built-in one) when it is current, else the full
    tokenizer, whose table is then written for the next start. No cache_root: the full one."""
    if cache_root is None:
        return load_tokenizer(path)
    file = find_tokenizer_file(path).resolve()
    key = tokenizer_key(file)
    dest = table_path(cache_root, file)
    if dest.exists():
        try:
            return read_table(dest, key)
        except (OSError, KeyError, TypeError, TokenTableError) as e:
            log.warning("tokenizer cache is unusable, rebuilding: %s", e)
    tok = load_tokenizer(file)
    try:
        write_table(dest, tok, key)
    except (OSError, TokenTableError) as e:  # a read-only or full cache costs speed, not service
        log.warning("could not cache the token table of %s: %s", file, e)
    return tok
