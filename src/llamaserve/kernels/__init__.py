"""CPU kernels of our own, compiled on first use with the machine's C++ compiler.

They are small C++ files built against torch's own headers and OpenMP runtime (so they share
torch's thread pool), cached by a hash of source, flags, torch version and CPU, and called
through ctypes on raw pointers. Without a compiler, or with LLAMASERVE_KERNELS=0, `load`
returns None and the model keeps its plain torch path: the kernels make decode faster, never
different in what it means.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from llamaserve.progress import phase

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
# No -ffast-math: the kernels' summation order is written out and must stay as written.
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | Path | None] = {}


def enabled() -> bool:
    return os.environ.get("LLAMASERVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("LLAMASERVE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamaserve" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX); LLAMASERVE_CPU_BF16=0
    says no whatever the CPU (tests and comparisons of the fp32 default)."""
    if os.environ.get("LLAMASERVE_CPU_BF16", "1") == "0":
        return False
    flags = set(_cpu_flags().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_cpu_dtype() -> torch.dtype:
    """The CPU compute default: bf16 weights (read by the qmatmul kernel, which rounds the fp32
    activations to bf16 at each matmul) where the CPU has bf16 arithmetic and the kernels build
    here, else fp32."""
    from llamaserve.kernels import qmatmul

    return torch.bfloat16 if cpu_has_bf16() and qmatmul.available() else torch.float32


def _torch_op_flags(torch_dir: Path) -> list[str]:
    """What a library that registers torch ops (torch/library.h) needs on top of FLAGS."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            "-ltorch", "-Wno-c++20-extensions"]


def _build(name: str, compiler: str, torch_op: bool = False) -> Path:
    source = SOURCE_DIR / f"{name}.cpp"
    torch_dir = Path(torch.__file__).parent
    flags = FLAGS + (_torch_op_flags(torch_dir) if torch_op else [])
    # Every file of the folder: a kernel may include another's source as well as the headers.
    sources = [f.read_text() for f in sorted(SOURCE_DIR.glob("*.h")) + sorted(SOURCE_DIR.glob("*.cpp"))]
    key = hashlib.sha256(
        "\n".join([*sources, " ".join(flags), torch.__version__, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so processes building at once never
    # load a half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [
        compiler, *flags, f"-I{torch_dir / 'include'}", str(source),
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", partial,
    ]
    # Seconds of silence on a first start otherwise (about 10 s for the all-layers op).
    what = f"compiling CPU decode kernels, first start only: {source.name} (cached in {target.parent})"
    try:
        with phase(what):
            subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, target)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"compiling {source.name} failed:\n{err.stderr[-2000:]}") from err
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


NO_COMPILER = (
    "no C++ compiler found ({cxx}): decode falls back to plain torch ops, which work but are slower. "
    "Install one and restart to build the CPU decode kernels (Debian/Ubuntu: apt-get install g++; "
    "Fedora/RHEL: dnf install gcc-c++; or set CXX to a compiler); LLAMASERVE_KERNELS=0 silences this"
)
_warned_no_compiler = False


def _warn_no_compiler() -> None:
    global _warned_no_compiler
    if not _warned_no_compiler:  # once per process, not once per kernel
        _warned_no_compiler = True
        log.warning(NO_COMPILER.format(cxx=os.environ.get("CXX", "g++")))


def _once(key: str, name: str, open_library):
    """open_library(compiler) the first time `key` is asked for in this process, and its result
    (None when kernels are off or it fails here, logged once) ever after."""
    with _lock:
        if key not in _loaded:
            loaded = None
            compiler = shutil.which(os.environ.get("CXX", "g++"))
            if not enabled():
                pass
            elif compiler is None:
                _warn_no_compiler()
            else:
                try:
                    loaded = open_library(compiler)
                except (RuntimeError, OSError) as err:
                    log.warning("kernel %s is off, decode uses plain torch ops: %s", name, err)
            _loaded[key] = loaded
        return _loaded[key]


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library `name` (a .cpp file in this package), or None when kernels are
    off or cannot be built here (logged once)."""
    return _once(name, name, lambda compiler: ctypes.CDLL(str(_build(name, compiler))))


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.llamaserve, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def load_torch_ops(name: str) -> bool:
    """Build and load kernel library `name`, which registers torch ops (torch.ops.llamaserve.*);
    False when kernels are off or it cannot be built here (logged once)."""

    def open_library(compiler: str) -> Path:
        if _registered(name):  # already in this process: registering the ops twice aborts it
            return Path(name)
        path = _build(name, compiler, torch_op=True)
        torch.ops.load_library(str(path))
        return path

    return _once(f"ops:{name}", name, open_library) is not None


def function(name: str, symbol: str, argtypes: list, restype=ctypes.c_int):
    """C function `symbol` of kernel library `name` with its signature set, or None when the
    library is off (see `load`)."""
    library = load(name)
    if library is None:
        return None
    found = getattr(library, symbol)
    if found.argtypes is None:
        found.argtypes, found.restype = argtypes, restype
    return found
