"""EngineArgs: the one description of an engine, for every entry point.

`serve`, `generate`, `demo`, `demo-alpaca`, `LLM(...)` and the tensor-parallel followers all
describe the engine they run with an EngineArgs, and `engine/build.py` builds it. The command-line
flags are defined here only (`add_cli_args`), and the environment variables that stand in for
them are mapped here only (`ENV_VARS`, read by `from_cli_args`: a flag given wins).

Torch-free on purpose: the server process parses its arguments and starts the engine process
before anything imports torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields, replace

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # aliases: devices.to_dtype
QUANTIZE_CHOICES = ("none", "int8", "int4", "fp8")
KV_CACHE_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "fp8")  # model/kv_cache.py: apply_kv_cache_dtype
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default

# EngineArgs field -> the environment variable used when its flag is not given.
ENV_VARS = {
    "model": "MODEL_WEIGHTS_PATH",
    "cache_root": "CACHE_ROOT",
    "mock": "MOCK_MODEL",
}


def env_bool(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EngineArgs:
    """Frozen and picklable: it travels to the engine process and keys its prestart."""

    model: str | None = None  # checkpoint directory; None = the built-in random model
    mock: bool = False  # fake model on the same engine path (model, if set, names the tokenizer)
    mock_step_delay: float = 0.0  # seconds the mock sleeps per step
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (devices.resolve_dtype)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (devices.resolve_device)
    quantize: str | None = None  # None, "int8", "int4" (weight-only) or "fp8" (weights/quant.py, weights/fp8.py)
    tensor_parallel: int = 1  # ranks the model is split over (spawned here, or torchrun's)
    max_users: int = 32  # user slots decoding together
    max_seq_len: int = 4096  # prompt + output limit per user
    prefill_chunk: int = 512  # prompt tokens per prefill call
    max_prefill_tokens: int | None = None  # prompt tokens per engine step, whole chunks (None: one chunk)
    max_queued: int = 256  # waiting requests beyond the slots before the engine refuses more
    min_decode_rows: int | None = None  # decode batches padded to this many rows (None: runner's choice)
    cache_root: str | None = None  # converted-weight cache under CACHE_ROOT/llamaserve_weights
    weight_cache: bool = True  # False: never use the converted-weight cache
    chat_template: str | None = None  # a Jinja file used for chats instead of the checkpoint's own format
    kv_cache_memory: float | None = None  # GiB of KV blocks (None: max_seq_len for every user)
    prefix_cache: bool = True  # reuse the KV blocks of prompt prefixes seen before
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # on a GPU without kv_cache_memory: share of its memory to fill
    kv_cache_dtype: str = "auto"  # what the KV cache stores (Transformer.kv_cache_dtype)

    @property
    def weight_cache_root(self) -> str | None:
        """Where converted weights are cached, or None."""
        return self.cache_root if self.weight_cache else None

    def replace(self, **changes) -> "EngineArgs":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, cli: bool = False) -> "EngineArgs":
        """ValueError naming the first bad field (as its flag when `cli`)."""

        def name(f: str) -> str:
            return "--" + f.replace("_", "-") if cli else f

        for f in ("max_users", "max_seq_len", "prefill_chunk", "tensor_parallel"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name(f)} must be a positive integer, got {v!r}" if f == "tensor_parallel"
                                 else f"{name(f)} must be >= 1, got {v!r}")
        if self.max_prefill_tokens is not None and (
                isinstance(self.max_prefill_tokens, bool) or not isinstance(self.max_prefill_tokens, int)
                or self.max_prefill_tokens < self.prefill_chunk):
            raise ValueError(f"{name('max_prefill_tokens')} must be an integer >= {name('prefill_chunk')} "
                             f"({self.prefill_chunk}), got {self.max_prefill_tokens!r}")
        if self.max_queued < 0:
            raise ValueError(f"{name('max_queued')} must be >= 0, got {self.max_queued}")
        if self.dtype not in DTYPE_CHOICES and self.dtype not in ("fp32", "bf16", "fp16", "half", "float"):
            raise ValueError(f"{name('dtype')} must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            raise ValueError(f"{name('kv_cache_dtype')} must be one of {', '.join(KV_CACHE_DTYPE_CHOICES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and not self.kv_cache_memory > 0:
            raise ValueError(f"{name('kv_cache_memory')} must be a positive number of GiB, got {self.kv_cache_memory!r}")
        if isinstance(self.gpu_memory_utilization, bool) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{name('gpu_memory_utilization')} must be a fraction in (0, 1], "
                             f"got {self.gpu_memory_utilization!r}")
        if self.quantize not in (None, *QUANTIZE_CHOICES[1:]):
            raise ValueError(f"{name('quantize')} must be int8, int4, fp8 or none, got {self.quantize!r}")
        if self.quantize == "fp8" and self.dtype in ("float16", "fp16", "half"):
            raise ValueError(f"{name('quantize')} fp8 computes in bfloat16 or float32, not float16; "
                             f"use {name('dtype')} bfloat16 (or auto)")
        return self

    # ---- command line -------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, *, max_users: int = 32) -> argparse._ArgumentGroup:
        """Every engine flag, in one group. `max_users` is the command's default slot count."""
        d = EngineArgs()
        g = parser.add_argument_group("model and engine")
        a = g.add_argument
        a("--model", "--weights", dest="model", default=None, metavar="DIR|builtin|mock",
          help="checkpoint directory (Meta, repacked or Hugging Face); 'builtin' = small random model whose "
          "output is gibberish (the default); 'mock' = fake model (env MODEL_WEIGHTS_PATH)")
        a("--mock", action="store_true", default=None, help="fake model, same engine path (env MOCK_MODEL=1)")
        a("--mock-step-delay", type=float, default=d.mock_step_delay, help="seconds the mock sleeps per step")
        a("--dtype", default=d.dtype, choices=list(DTYPE_CHOICES),
          help="compute dtype (auto: bfloat16 on CUDA, and on CPUs with bf16 arithmetic "
          "(bf16 weights and matmul inputs, fp32 elsewhere); else float32)")
        a("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: cuda if available, else cpu)")
        a("--quantize", choices=list(QUANTIZE_CHOICES), default="none",
          help="weight quantisation: int8 (per channel) or int4 (groups of 64), weight-only; fp8 (e4m3 per "
          "channel, activations per row: FP8 tensor cores on GPUs of compute capability 9.0+, emulated and slow "
          "elsewhere)")
        a("--tensor-parallel", type=int, default=d.tensor_parallel, metavar="N",
          help="split the model over N ranks (started here; under torchrun: the job's ranks)")
        a("--max-users", type=int, default=max_users, help=f"concurrent user slots (default {max_users})")
        a("--max-seq-len", type=int, default=d.max_seq_len,
          help=f"prompt + output limit per user (default {d.max_seq_len})")
        a("--prefill-chunk", type=int, default=d.prefill_chunk,
          help=f"prompt tokens per prefill call; with fp32 weights or off the CPU kernels the prefix cache "
          f"reuses whole chunks only, so a smaller chunk reuses more of a shared prompt there (default {d.prefill_chunk})")
        a("--max-prefill-tokens", type=int, default=None, metavar="N",
          help="prompt tokens one engine step may prefill, in whole chunks, over one or several prompts: "
          "how long a step with prefill may stall decoding users (default: --prefill-chunk)")
        a("--max-queued", type=int, default=d.max_queued,
          help=f"waiting requests beyond the slots before new ones are refused (default {d.max_queued})")
        a("--kv-cache-memory", type=float, default=None, metavar="GIB",
          help="GiB for the KV cache's block pool: how many tokens all users hold together "
          "(default: --max-seq-len tokens for each of --max-users)")
        a("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization, metavar="FRACTION",
          help="on a GPU, when --kv-cache-memory is not given: the share of the GPU's memory this server may "
          "fill; the KV cache gets what the weights and an activation reserve leave of it "
          f"(default {d.gpu_memory_utilization}; no effect on CPU)")
        a("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPE_CHOICES),
          help="what the KV cache stores (auto: bfloat16 where bf16 or quantised weights run on the CPU kernels and "
          "the CPU has AVX512-BF16 (half the memory, faster attention), else the compute dtype); float32 keeps "
          "full-precision keys and values; fp8 (e4m3, for GPUs) stores one byte a number, twice bf16's tokens "
          "(on a CPU it runs on the slower torch path)")
        a("--no-prefix-cache", action="store_true",
          help="do not reuse the KV cache of prompt prefixes seen before (on by default; outputs are the same)")
        a("--cache-root", default=None,
          help="converted-weight cache under CACHE_ROOT/llamaserve_weights; serve also logs to CACHE_ROOT/logs "
          "(env CACHE_ROOT)")
        a("--chat-template", default=None, metavar="FILE",
          help="Jinja chat template for chats (--chat, /v1/chat/completions, /chat/...); default: the "
          "checkpoint's own (chat_template.jinja or tokenizer_config.json), else the Llama 3 / Llama 2 format")
        a("--no-weight-cache", action="store_true",
          help="do not cache converted weights under CACHE_ROOT/llamaserve_weights (on when CACHE_ROOT is set)")
        return g

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace, env: dict[str, str] | None = None) -> "EngineArgs":
        """The flags of `add_cli_args`, with ENV_VARS standing in for flags not given."""
        env = dict(os.environ) if env is None else env
        model = ns.model if ns.model is not None else (env.get(ENV_VARS["model"]) or None)
        mock = bool(ns.mock) or env_bool(env, ENV_VARS["mock"])
        if model == "mock":
            mock, model = True, None
        if model == "builtin":
            model = None
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in vars(ns).items() if k in names}
        given.update(
            model=model,
            mock=mock,
            quantize=None if ns.quantize in (None, "none") else ns.quantize,
            cache_root=ns.cache_root if ns.cache_root is not None else (env.get(ENV_VARS["cache_root"]) or None),
            weight_cache=not getattr(ns, "no_weight_cache", False),
            prefix_cache=not getattr(ns, "no_prefix_cache", False),
        )
        return cls(**given)

    # ---- derived descriptions ------------------------------------------------------------------
    def load_spec(self):
        """What every tensor-parallel rank loads (parallel.LoadSpec), device and dtype resolved."""
        from llamaserve.devices import dtype_name, resolve_device, resolve_dtype
        from llamaserve.parallel.group import LoadSpec

        device = resolve_device(self.device)
        return LoadSpec(
            source=self.model, dtype=dtype_name(resolve_dtype(self.dtype, device)), device=device.type,
            quantize=self.quantize, cache_root=self.weight_cache_root if self.model else None,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def engine_config(self):
        """The limits the Engine itself enforces (engine.EngineConfig)."""
        from llamaserve.engine.engine import EngineConfig

        return EngineConfig(max_users=self.max_users, max_seq_len=self.max_seq_len, prefill_chunk=self.prefill_chunk,
                            max_prefill_tokens=self.max_prefill_tokens,
                            max_queued=self.max_queued, min_decode_rows=self.min_decode_rows,
                            kv_cache_memory=self.kv_cache_memory, prefix_cache=self.prefix_cache,
                            gpu_memory_utilization=self.gpu_memory_utilization)
