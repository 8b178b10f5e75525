"""Converted-weight cache: convert once (dtype, int8, tensor-parallel slice), mmap afterwards.

Layout: `{CACHE_ROOT}/llamaserve_weights/<entry>/` with `weights.safetensors` (this rank's
tensors, already in the engine's format) and `manifest.json` (written last). An entry's name ends
in a key: the sha256 of the source fingerprint (every file's name, size and mtime, the sha256 of
params.json / config.json) and the conversion settings (dtype, quantisation, tp size and rank).

A load checks the manifest against the source and the files against the manifest (size, sha256
of the header, sha256 of sampled blocks; the full sha256 for files up to FULL_HASH_MAX_BYTES).
`verify` always hashes everything. A stale, partial or corrupted entry is reported with a
warning, deleted and rebuilt; it is never loaded. Entries are built in a temp dir and renamed
into place, so a crash mid-build leaves no entry that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaserve.config import BUILTIN_MODEL_ARGS, BUILTIN_SEED, ModelArgs
from llamaserve.devices import dtype_name  # noqa: F401 - the one dtype helper, re-exported
from llamaserve.devices import to_dtype as parse_dtype  # noqa: F401
from llamaserve.model.parallel import SINGLE, TensorParallel
from llamaserve.progress import Progress, phase
from llamaserve.progress import min_bytes as progress_min_bytes
from llamaserve.umask import as_if_created
from llamaserve.weights.quant import build_quantized_model, check_mode, quantize_state_dict, tie_output
from llamaserve.weights.safetensors_io import SafetensorsError, mmap_safetensors, write_safetensors

log = logging.getLogger(__name__)

# 2: config.json dialects read anew (entries of 1 may hold a transformers-5 config's wrong rope_theta)
CACHE_VERSION = 2
CACHE_SUBDIR = "llamaserve_weights"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
# Full sha256 on every load up to this size; above it, the header and sampled blocks.
FULL_HASH_MAX_BYTES = 64 << 20
_SAMPLE_BLOCKS = 32
_SAMPLE_BYTES = 64 << 10
_CONFIG_FILES = ("params.json", "config.json")


class CacheError(RuntimeError):
    """A cache entry is stale, partial or corrupted (the message says which and why)."""


@dataclass(frozen=True)
class Settings:
    dtype: str  # "float32", "bfloat16", ...
    quantize: str | None
    tp_size: int
    tp_rank: int

    @property
    def label(self) -> str:
        return f"{self.dtype}-{self.quantize or 'noquant'}-tp{self.tp_size}r{self.tp_rank}"


def cache_dir(cache_root: str | Path) -> Path:
    return Path(cache_root).expanduser() / CACHE_SUBDIR


def _is_builtin(source) -> bool:
    return source is None or str(source) == "builtin"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, Progress(f"sha256 of {path}", size, "B", shown=size >= progress_min_bytes()) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            bar.update(len(block), count=0)
    return h.hexdigest()


def source_fingerprint(source) -> dict:
    """What identifies the source weights: every file's name, size, mtime; the config's hash."""
    if _is_builtin(source):
        return {"kind": "builtin", "seed": BUILTIN_SEED, "args": dataclasses.asdict(BUILTIN_MODEL_ARGS)}
    path = Path(source).expanduser().resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        st = path.stat()
        return {"kind": "file", "path": str(path), "files": [[path.name, st.st_size, st.st_mtime_ns]]}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    files = []
    for p in sorted(path.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    configs = {name: _sha256_file(path / name) for name in _CONFIG_FILES if (path / name).is_file()}
    return {"kind": "dir", "path": str(path), "files": files, "config_sha256": configs}


def entry_key(fingerprint: dict, settings: Settings) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "source": fingerprint, "settings": dataclasses.asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def entry_name(source, settings: Settings, key: str) -> str:
    base = "builtin" if _is_builtin(source) else Path(source).expanduser().resolve().name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:60] or "model"
    return f"{base}-{settings.label}-{key}"


# ---- file checks -----------------------------------------------------------------------------


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the header and blocks spread over the file (cheap, catches most damage)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            h.update(f.read(int.from_bytes(head, "little")))
        step = max(1, size // _SAMPLE_BLOCKS)
        for off in list(range(0, size, step)) + [max(0, size - _SAMPLE_BYTES)]:
            f.seek(off)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(n)).hexdigest()


def describe_file(path: Path, full: bool = True) -> dict:
    size = path.stat().st_size
    info = {"size": size, "header_sha256": _header_sha256(path), "sample_sha256": _sampled_sha256(path, size)}
    if full:
        info["sha256"] = _sha256_file(path)
    return info


def check_file(path: Path, want: dict, full: bool) -> str | None:
    """None if the file matches its manifest record, else what is wrong with it."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != want.get("size"):
        return f"{path.name} has {size} bytes, the manifest says {want.get('size')} (truncated or partial)"
    if _header_sha256(path) != want.get("header_sha256"):
        return f"{path.name}: header checksum mismatch (corrupted)"
    if _sampled_sha256(path, size) != want.get("sample_sha256"):
        return f"{path.name}: data checksum mismatch (corrupted)"
    if (full or size <= FULL_HASH_MAX_BYTES) and _sha256_file(path) != want.get("sha256"):
        return f"{path.name}: sha256 mismatch (corrupted)"
    return None


def read_manifest(entry: Path) -> dict:
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CacheError(f"{entry}: no {MANIFEST_FILE} (partial entry)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{entry}: {MANIFEST_FILE} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION:
        raise CacheError(f"{entry}: manifest version {manifest.get('version') if isinstance(manifest, dict) else '?'} "
                         f"is not {CACHE_VERSION}")
    return manifest


def check_entry(entry: Path, full: bool = False, key: str | None = None) -> dict:
    """The entry's manifest if the entry is complete and intact; CacheError otherwise."""
    manifest = read_manifest(entry)
    if key is not None and manifest.get("key") != key:
        raise CacheError(f"{entry}: manifest key {manifest.get('key')} does not match {key} (stale)")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CacheError(f"{entry}: manifest lists no {WEIGHTS_FILE}")
    for name, want in files.items():
        problem = check_file(entry / name, want, full)
        if problem:
            raise CacheError(f"{entry}: {problem}")
    return manifest


# ---- building and loading ---------------------------------------------------------------------


def convert_state_dict(source, dtype: torch.dtype, tp: TensorParallel, quantize: str | None, progress: bool,
                       cache_root: str | Path | None = None):
    """(args, this rank's tensors in the engine's format, info about the source)."""
    from llamaserve.weights.builtin import BUILTIN_NAME, builtin_state_dict
    from llamaserve.weights.loader import model_name, open_checkpoint, read_state_dict
    from llamaserve.weights.reader import StateDictReader

    if _is_builtin(source):
        args, tensors = builtin_state_dict()
        with StateDictReader(args, tensors) as reader:
            sd = read_state_dict(reader, dtype, "cpu", tp, progress=False)
        info = {"format": "builtin", "name": BUILTIN_NAME, "is_builtin": True, "path": None}
    else:
        path = Path(source).expanduser()
        with open_checkpoint(path, cache_root) as reader:
            args = reader.args
            sd = read_state_dict(reader, dtype, "cpu", tp, progress, desc=f"converting {path.name}")
            info = {"format": reader.format, "name": model_name(path), "is_builtin": False, "path": str(path.resolve())}
    if args.tie_word_embeddings:
        sd.pop("output.weight", None)  # rebuilt from the embedding at load time: no duplicate bytes
    if quantize:
        sd = quantize_state_dict(sd, quantize)
    return args, sd, info


def _write_entry(root: Path, name: str, manifest: dict, sd: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    as_if_created(tmp, directory=True)  # not mkdtemp's 0700: the cache may be shared (a container's user)
    final = root / name
    try:
        with phase(f"writing the converted weights to {final}"):
            write_safetensors(tmp / WEIGHTS_FILE, sd, {"format": "pt", "producer": "llamaserve cache"})
        manifest = dict(manifest, files={WEIGHTS_FILE: describe_file(tmp / WEIGHTS_FILE)})
        mtmp = tmp / f".{MANIFEST_FILE}.tmp"
        mtmp.write_text(json.dumps(manifest, indent=1))
        os.replace(mtmp, tmp / MANIFEST_FILE)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale(root: Path, fingerprint: dict, settings: Settings, key: str) -> None:
    """Delete other entries for the same source path and settings: the source changed."""
    if fingerprint.get("kind") not in ("dir", "file") or not root.is_dir():
        return
    for entry in root.iterdir():
        if not entry.is_dir() or entry.name.startswith(".") or entry.name.endswith(key):
            continue
        try:
            manifest = json.loads((entry / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        same_source = manifest.get("source", {}).get("path") == fingerprint["path"]
        if same_source and manifest.get("settings") == dataclasses.asdict(settings):
            log.warning("weight cache %s is stale (the files in %s changed since it was built); rebuilding",
                        entry, fingerprint["path"])
            shutil.rmtree(entry, ignore_errors=True)


def ensure_entry(
    source,
    cache_root: str | Path,
    dtype: torch.dtype = torch.float32,
    tp: TensorParallel = SINGLE,
    quantize: str | None = None,
    progress: bool = True,
) -> tuple[Path, dict, dict[str, torch.Tensor] | None, ModelArgs | None]:
    """(entry dir, manifest, converted tensors if just built, args if just built)."""
    quantize = check_mode(quantize)
    settings = Settings(dtype_name(dtype), quantize, tp.size, tp.rank)
    fingerprint = source_fingerprint(source)
    key = entry_key(fingerprint, settings)
    root = cache_dir(cache_root)
    entry = root / entry_name(source, settings, key)
    if entry.exists():
        try:
            return entry, check_entry(entry, key=key), None, None
        except CacheError as exc:
            log.warning("weight cache entry is unusable, rebuilding: %s", exc)
            shutil.rmtree(entry, ignore_errors=True)
    _remove_stale(root, fingerprint, settings, key)
    t0 = time.perf_counter()
    args, sd, info = convert_state_dict(source, dtype, tp, quantize, progress, cache_root)
    manifest = {
        "version": CACHE_VERSION,
        "key": key,
        "source": fingerprint,
        "settings": dataclasses.asdict(settings),
        "args": dataclasses.asdict(args),
        "model": info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    entry = _write_entry(root, entry.name, manifest, sd)
    log.info("weight cache built in %.1fs: %s", time.perf_counter() - t0, entry)
    return entry, read_manifest(entry), sd, args


def build_from_tensors(args: ModelArgs, sd: dict[str, torch.Tensor], tp: TensorParallel, dtype: torch.dtype,
                       quantize: str | None, device: torch.device | str):
    from llamaserve.weights.loader import build_model

    if str(device) != "cpu":
        sd = {k: v.to(device) for k, v in sd.items()}
    if quantize:
        return build_quantized_model(args, sd, tp, compute_dtype=dtype)
    return build_model(args, tie_output(sd, args, tp), tp)


def load_model_cached(
    source=None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel = SINGLE,
    quantize: str | None = None,
    cache_root: str | Path | None = None,
    progress: bool = True,
):
    """`load_model` through the cache: convert on a miss, mmap the converted tensors on a hit."""
    from llamaserve.weights.builtin import BUILTIN_WARNING
    from llamaserve.tokenizer.loader import find_tokenizer_dir
    from llamaserve.weights.loader import LoadedModel

    quantize = check_mode(quantize, dtype)
    if cache_root is None:
        raise ValueError("load_model_cached needs a cache_root (or set CACHE_ROOT)")
    entry, manifest, sd, args = ensure_entry(source, cache_root, dtype, tp, quantize, progress)
    if sd is None:
        try:
            sd, _ = mmap_safetensors(entry / WEIGHTS_FILE)
        except SafetensorsError as exc:  # damaged between the check and the map: rebuild once
            log.warning("weight cache entry is unusable, rebuilding: %s", exc)
            shutil.rmtree(entry, ignore_errors=True)
            entry, manifest, sd, args = ensure_entry(source, cache_root, dtype, tp, quantize, progress)
        log.info("weight cache hit: %s", entry)
    if args is None:
        args = ModelArgs(**manifest["args"])
    model = build_from_tensors(args, sd, tp, dtype, quantize, device)
    info = manifest["model"]
    if info["is_builtin"]:
        log.warning(BUILTIN_WARNING)
    path = Path(info["path"]) if info.get("path") else None
    if info["format"] == "gguf":
        from llamaserve.weights.gguf import find_gguf, sidecar_dir

        tokenizer_dir = sidecar_dir(find_gguf(path), cache_root)  # rebuilt if it was deleted
    else:
        tokenizer_dir = find_tokenizer_dir(path) if path else None
    return LoadedModel(model, args, tokenizer_dir, info["format"], info["name"], info["is_builtin"], path)


# ---- maintenance (the `llamaserve cache` command) ---------------------------------------------


def list_entries(cache_root: str | Path) -> list[Path]:
    root = cache_dir(cache_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def verify(cache_root: str | Path) -> list[tuple[Path, str | None]]:
    """(entry, None if intact else the problem) for every entry, with full sha256 checks."""
    out = []
    for entry in list_entries(cache_root):
        try:
            manifest = check_entry(entry, full=True)
        except CacheError as exc:
            out.append((entry, str(exc)))
            continue
        src = manifest.get("source", {})
        if src.get("kind") in ("dir", "file"):
            try:
                current = source_fingerprint(src["path"])
            except FileNotFoundError:
                out.append((entry, f"{entry}: source {src['path']} no longer exists (stale)"))
                continue
            if current != src:
                out.append((entry, f"{entry}: the files in {src['path']} changed since it was built (stale)"))
                continue
        out.append((entry, None))
    return out


def clear(cache_root: str | Path) -> int:
    """Delete every entry (and leftover temp dirs), and the engine's token tables, which are
    derived from the same checkpoints; returns the number of weight entries removed."""
    from llamaserve.tokenizer.table import CACHE_SUBDIR as TOKENIZER_SUBDIR
    from llamaserve.weights.gguf import SIDECAR_SUBDIR

    for derived in (TOKENIZER_SUBDIR, SIDECAR_SUBDIR):
        shutil.rmtree(Path(cache_root).expanduser() / derived, ignore_errors=True)
    root = cache_dir(cache_root)
    if not root.is_dir():
        return 0
    n = 0
    for p in root.iterdir():
        if p.is_dir():
            n += not p.name.startswith(".")
            shutil.rmtree(p, ignore_errors=True)
    return n
