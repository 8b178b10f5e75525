"""`load_tokenizer`: find the tokenizer file of a model and pick the right implementation."""

from __future__ import annotations

import importlib.util
import stat
import threading
from pathlib import Path

from llamaserve.tokenizer.base import Tokenizer, TokenizerError
from llamaserve.tokenizer.hf import HFTokenizer
from llamaserve.tokenizer.llama2 import Llama2Tokenizer
from llamaserve.tokenizer.llama3 import Llama3Tokenizer, looks_like_tiktoken

# Looked for in this order inside a model directory. Meta downloads have tokenizer.model; HF
# downloads have tokenizer.json (and, for Llama 3, Meta's file under original/).
DIR_CANDIDATES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")

# Building the Llama 3 tokenizer parses 128k ranks (~0.3 s); tokenizers are read-only after
# construction, so one instance per file (and file version) is shared.
_cache: dict[tuple, Tokenizer] = {}
_loading: dict[tuple, threading.Event] = {}
_cache_lock = threading.Lock()
_HF_CONFIGS = ("tokenizer_config.json", "generation_config.json", "config.json", "chat_template.jinja")


def default_tokenizer_path() -> Path:
    """The real Llama 3 `tokenizer.model` shipped inside the `llama-models` package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the built-in Llama 3 tokenizer comes from the 'llama-models' package, which is not installed "
            "(pip install llama-models)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"the llama-models package has no Llama 3 tokenizer at {path}")
    return path


def find_tokenizer_file(path: str | Path | None) -> Path:
    if path is None:
        return default_tokenizer_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        for name in DIR_CANDIDATES:
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"no tokenizer in directory {path}: looked for {', '.join(DIR_CANDIDATES)}")
    return path


def _open(path: Path) -> Tokenizer:
    try:
        # A FIFO would block the open forever and a device never ends: plain files only.
        if not stat.S_ISREG(path.stat().st_mode):
            raise TokenizerError(f"tokenizer file {path} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
    if not head.strip():
        raise TokenizerError(f"tokenizer file {path} is empty")
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    if looks_like_tiktoken(head):
        return Llama3Tokenizer(path)
    try:
        return Llama2Tokenizer(path)
    except TokenizerError as e:
        raise TokenizerError(
            f"tokenizer file {path} is not recognised: it is neither a tiktoken BPE file (Llama 3), a "
            f"sentencepiece model (Llama 2) nor a Hugging Face tokenizer.json ({e.__cause__ or e})"
        ) from e


def find_tokenizer_dir(checkpoint: str | Path) -> Path | None:
    """The checkpoint dir, or its parent (Meta's Llama 2 layout), if it holds a tokenizer."""
    path = Path(checkpoint).expanduser()
    for d in (path, path.parent):
        if (d / "tokenizer.model").is_file() or (d / "tokenizer.json").is_file():
            return d
    return None


def tokenizer_key(file: Path) -> tuple:
    """What identifies a tokenizer file's contents without reading them: its path, size and
    mtime, and those of the configs a tokenizer.json takes its bos/eos/stop ids from."""
    try:
        st = file.stat()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {file}: {e}") from e
    key: tuple = (str(file), st.st_size, st.st_mtime_ns)
    for name in _HF_CONFIGS:
        cfg = file.parent / name
        if cfg.is_file():
            cst = cfg.stat()
            key += (name, cst.st_size, cst.st_mtime_ns)
    return key


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer from a file or a model directory; None means the built-in Llama 3 one.

    Raises TokenizerError (a ValueError) naming the file for a missing, unrecognised or corrupt
    tokenizer. Callers that ask for the same file while it loads (the server prefetches it at
    start) wait for that load instead of starting a second one.
    """
    file = find_tokenizer_file(path).resolve()
    key = tokenizer_key(file)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        loading = _loading.get(key)
        owner = loading is None
        if owner:
            loading = _loading[key] = threading.Event()
    if not owner:
        loading.wait()
        with _cache_lock:
            tok = _cache.get(key)
        return tok if tok is not None else _open(file)  # that load failed: fail here with its error
    try:
        tok = _open(file)
        with _cache_lock:
            _cache[key] = tok
    finally:
        with _cache_lock:
            del _loading[key]
        loading.set()
    return tok


def prefetch_tokenizer(path: str | Path | None) -> threading.Thread:
    """Load the tokenizer in a background thread; a later `load_tokenizer` of the same file
    waits for it. A failure is left for that later call to raise."""

    def run() -> None:
        try:
            load_tokenizer(path)
        except Exception:  # noqa: BLE001 - reported by the load that needs the tokenizer
            pass

    thread = threading.Thread(target=run, name="tokenizer-prefetch", daemon=True)
    thread.start()
    return thread
