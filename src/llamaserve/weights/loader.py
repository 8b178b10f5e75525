"""Load a Llama model from a checkpoint directory (format detected) or the built-in weights.

The model is built on the meta device and receives its tensors with `assign=True`: each tensor
is read, converted to the target dtype and placed on the target device one at a time, so peak
memory is the model in the target dtype plus one copy chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from llamaserve.config import ModelArgs
from llamaserve.devices import to_dtype
from llamaserve.model.llama import Transformer
from llamaserve.model.parallel import SINGLE, TensorParallel
from llamaserve.progress import Progress
from llamaserve.progress import min_bytes as progress_min_bytes
from llamaserve.tokenizer.loader import find_tokenizer_dir  # noqa: F401 - re-exported
from llamaserve.weights.builtin import BUILTIN_NAME, BUILTIN_WARNING, builtin_state_dict
from llamaserve.weights.errors import WeightsError
from llamaserve.weights.gguf import GGUFReader, find_gguf
from llamaserve.weights.hf import HFReader
from llamaserve.weights.layout import expected_shapes
from llamaserve.weights.meta import MetaReader, shard_files
from llamaserve.weights.reader import Part, StateDictReader, TensorReader
from llamaserve.weights.repacked import RepackedReader, chunk_files

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    tokenizer_dir: Path | None
    format: str  # "builtin" | "meta" | "repacked" | "hf" | "gguf"
    name: str
    is_builtin: bool
    path: Path | None = None  # the checkpoint directory or .gguf file (None for the built-in model)


# ---- format detection ---------------------------------------------------------------------


def detect_format(directory: str | Path) -> str:
    """"meta", "repacked", "hf" or "gguf" for a checkpoint directory (or .gguf file); WeightsError otherwise."""
    path = Path(directory)
    if not path.exists():
        raise WeightsError(f"{path}: checkpoint directory not found")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if not path.is_dir():
        raise WeightsError(f"{path}: not a directory (pass the directory that holds the checkpoint files, "
                           "or a .gguf file)")
    # Repacked chunks are what our own `repack` writes, usually next to nothing else; prefer them.
    if chunk_files(path):
        return "repacked"
    if shard_files(path):
        return "meta"
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return "hf"
    if find_gguf(path) is not None:
        return "gguf"
    present = sorted(p.name for p in path.iterdir())
    shown = ", ".join(present[:8]) + (" ..." if len(present) > 8 else "") if present else "nothing"
    raise WeightsError(
        f"{path}: no recognised checkpoint files (looked for consolidated.NN.pth + params.json, "
        f"layers_A-B.pth + params.json, *.safetensors + config.json, or one .gguf; found {shown})"
    )


def open_checkpoint(directory: str | Path, cache_root: str | Path | None = None) -> TensorReader:
    """Open a checkpoint for per-tensor reading, after checking every name and shape.
    `cache_root`: where a GGUF file's config and tokenizer are written (weights/gguf.py)."""
    path = Path(directory)
    fmt = detect_format(path)
    if fmt == "gguf":
        reader: TensorReader = GGUFReader(path, cache_root)
    else:
        reader = {"meta": MetaReader, "repacked": RepackedReader, "hf": HFReader}[fmt](path)
    try:
        check_tensors(reader)
    except BaseException:
        reader.close()
        raise
    return reader


def check_tensors(reader: TensorReader) -> None:
    """Every expected tensor present with the shape the config implies, nothing else."""
    args = reader.args
    have = reader.shapes()
    # The config's layer count is held against the tensors before anything is sized from it.
    have_layers = {int(m.group(1)) for n in have if (m := _LAYER_RE.match(n))}
    if have_layers and max(have_layers) + 1 != args.n_layers:
        raise WeightsError(
            f"{reader.config_file}: says n_layers={args.n_layers} but the checkpoint "
            f"({reader.where(f'layers.{max(have_layers)}.x')}) holds layers 0-{max(have_layers)}"
        )
    expected = expected_shapes(args)
    extra = [n for n in have if n not in expected]
    missing = [n for n in expected if n not in have]
    if extra:
        raise WeightsError(f"{reader.where(extra[0])}: unexpected tensor {reader.display_name(extra[0])}" + _more(extra))
    if missing:
        raise WeightsError(f"{reader.where(missing[0])}: missing tensor {reader.display_name(missing[0])}" + _more(missing))
    for name, shape in expected.items():
        if tuple(have[name]) != tuple(shape):
            raise WeightsError(
                f"{reader.where(name)}: tensor {reader.display_name(name)} has shape {tuple(have[name])}, but "
                f"{reader.config_file} ({_describe_args(args)}) implies {tuple(shape)}"
            )


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _describe_args(a: ModelArgs) -> str:
    return (
        f"dim={a.dim}, n_layers={a.n_layers}, n_heads={a.n_heads}, n_kv_heads={a.n_kv_heads}, "
        f"vocab_size={a.vocab_size}, ffn width={a.hidden_dim}"
    )


# ---- tensor-parallel slices ---------------------------------------------------------------


def tp_part(name: str, shape: tuple[int, ...], args: ModelArgs, tp: TensorParallel) -> Part | None:
    """The slice of a full tensor that rank `tp.rank` holds (None: the whole tensor)."""
    if tp.size == 1 or name == "tok_embeddings.weight" or name.endswith("norm.weight"):
        return None
    kind = "output" if name == "output.weight" else name.rsplit(".", 2)[-2]
    if kind in ("wk", "wv") and tp.size > args.n_kv_heads:
        # More ranks than KV heads: keep the one KV head this rank's query heads attend with.
        q_per_rank = args.n_heads // tp.size
        kv_head = (tp.rank * q_per_rank) // (args.n_heads // args.n_kv_heads)
        return Part(0, kv_head * args.head_dim, (kv_head + 1) * args.head_dim)
    dim = 1 if kind in ("wo", "w2") else 0
    width = shape[dim] // tp.size
    return Part(dim, tp.rank * width, (tp.rank + 1) * width)


# ---- loading ------------------------------------------------------------------------------


def read_state_dict(
    reader: TensorReader,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel = SINGLE,
    progress: bool = True,
    desc: str = "loading weights",
) -> dict[str, torch.Tensor]:
    """Read every tensor (this rank's slice of it) converted to `dtype` on `device`."""
    args = reader.args
    shapes = reader.shapes()
    plan = {name: tp_part(name, shape, args, tp) for name, shape in shapes.items()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {n: _numel(shapes[n] if p is None else p.shape_of(shapes[n])) * itemsize for n, p in plan.items()}
    total = sum(sizes.values())
    # One report per process group: with tensor parallelism the ranks load side by side.
    bar = Progress(desc, total, "B", count_total=len(plan),
                   shown=progress and total >= progress_min_bytes() and tp.rank == 0)
    sd: dict[str, torch.Tensor] = {}
    try:
        for name, part in plan.items():
            sd[name] = reader.read(name, dtype, device, part)
            bar.update(sizes[name], detail=name)
    finally:
        bar.close()
    if args.tie_word_embeddings:
        emb = sd["tok_embeddings.weight"]
        part = tp_part("output.weight", tuple(emb.shape), args, tp)
        # The same storage serves both: tying costs no memory.
        sd["output.weight"] = emb if part is None else emb.narrow(0, part.start, part.stop - part.start)
    return sd


class _Skeleton(TorchFunctionMode):
    """Builds a module tree whose weights take no memory and no time: uninitialised allocations
    (`torch.empty`: every Linear and Embedding weight) land on the meta device and their random
    init is skipped; tensors made with values (norm weights, rope frequencies: kilobytes) are
    computed on the CPU. Under `torch.device("meta")` those few ops would run torch's Python meta
    kernels instead, whose first call imports torch._dynamo: ~1.5 s of every engine start."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UNINITIALISED and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif func in _RANDOM_INIT or getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


_UNINITIALISED = frozenset({torch.empty, torch.empty_strided})
_RANDOM_INIT = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_})


def build_model(
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    tp: TensorParallel = SINGLE,
    swap_modules: Callable[[Transformer], None] | None = None,
) -> Transformer:
    """A Transformer whose parameters are exactly the tensors of `sd` (no copies);
    `swap_modules` replaces layers (int8 ones, say) before the tensors are assigned."""
    with _Skeleton():
        model = Transformer(args, tp)
        if swap_modules is not None:
            swap_modules(model)
    model.load_state_dict(sd, strict=True, assign=True)
    device = sd["tok_embeddings.weight"].device
    model.inv_freq = model.inv_freq.to(device)  # non-persistent: not in sd
    model.requires_grad_(False)
    model.eval()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"model tensors left on the meta device after loading: {leftover}")
    return model


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel = SINGLE,
    progress: bool = True,
    quantize: str | None = None,
    cache_root: str | Path | None = None,
) -> LoadedModel:
    """Load the model in `source` (a checkpoint directory; None or "builtin": built-in weights).

    quantize="int8" / "int4": weight-only (weights/quant.py). cache_root: go through the
    converted-weight cache under it (weights/cache.py): convert once, mmap afterwards.
    `dtype` may be a torch dtype or its name ("float32", "bfloat16", "float16").
    """
    dtype = to_dtype(dtype)
    if cache_root is not None:
        from llamaserve.weights.cache import load_model_cached

        return load_model_cached(source, dtype, device, tp, quantize, cache_root, progress)
    if quantize not in (None, "", "none"):
        from llamaserve.weights.quant import check_mode, quantize_model

        mode = check_mode(quantize, dtype)
        loaded = load_model(source, dtype, device, tp, progress)
        loaded.model = quantize_model(loaded.model, mode)
        return loaded
    if source is None or str(source) == "builtin":
        log.warning(BUILTIN_WARNING)
        args, tensors = builtin_state_dict()
        with StateDictReader(args, tensors) as reader:
            sd = read_state_dict(reader, dtype, device, tp, progress=False)
        return LoadedModel(build_model(args, sd, tp), args, None, "builtin", BUILTIN_NAME, True)

    path = Path(source).expanduser()
    with open_checkpoint(path) as reader:
        args = reader.args
        sd = read_state_dict(reader, dtype, device, tp, progress, desc=f"loading {path.name}")
        fmt = reader.format
        tokenizer_dir = getattr(reader, "sidecar", None) or find_tokenizer_dir(path)
    model = build_model(args, sd, tp)
    log.info("loaded %s checkpoint %s (%s, %.1fM parameters)", fmt, path, dtype, args.num_parameters() / 1e6)
    return LoadedModel(model, args, tokenizer_dir, fmt, model_name(path), False, path)


def model_name(path: Path) -> str:
    """The served name of a checkpoint: its directory's name, or a GGUF file's name less .gguf."""
    path = path.resolve()
    return path.stem if path.is_file() and path.suffix.lower() == ".gguf" else path.name


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
