"""build_engine(args): EngineArgs -> a running Engine, for every entry point.

The serve command's engine process, `LLM(...)` (and through it generate / demo) call this; the
tensor-parallel followers load their shard from `args.load_spec()`. The mock replaces only the
Transformer: the engine around it is the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.args import EngineArgs
from llamaserve.engine.engine import Engine

log = logging.getLogger(__name__)



@dataclass
class BuiltEngine:
    engine: Engine
    model: Any
    tokenizer: Any
    # name, format, is_builtin, is_mock, tokenizer_dir, family, max_seq_len, max_users, pid
    info: dict[str, Any] = field(default_factory=dict)


def build_engine(
    args: EngineArgs,
    *,
    model=None,
    tokenizer=None,
    decode_only_tokenizer: bool = False,
    progress: bool = False,
    exit_on_rank_death: bool = False,
) -> BuiltEngine:
    """model: an already-built model object instead of args.model's checkpoint. tokenizer: a
    Tokenizer or a path instead of the checkpoint's. decode_only_tokenizer: a process that only
    decodes (the server's engine) takes the cached token table instead of the full tokenizer.
    exit_on_rank_death: a tensor-parallel rank that dies takes this process down (so a
    supervisor restarts the group) instead of raising in the next model call."""
    args.validate()
    if model is not None:
        info = {"name": type(model).__name__, "format": "object", "is_builtin": False, "is_mock": False}
        tokenizer_dir = None
    elif args.mock:
        model, info, tokenizer, tokenizer_dir = _mock_model(args, tokenizer)
    else:
        model, info, tokenizer_dir = _load_model(args, progress, exit_on_rank_death)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else tokenizer_dir, args, decode_only_tokenizer)
    if args.chat_template and not decode_only_tokenizer:
        tokenizer = tokenizer.with_chat_template(args.chat_template)  # a copy: the shared one is unchanged
    args = _within_trained_context(args, model)
    engine = Engine(model, tokenizer, args.engine_config())
    info.update(tokenizer_dir=tokenizer_dir, family=tokenizer.family, vocab_size=engine.vocab_size,
                max_seq_len=engine.scheduler.max_seq_len, max_users=args.max_users,
                kv_tokens=engine.scheduler.pool_tokens, pid=os.getpid())
    return BuiltEngine(engine, model, tokenizer, info)


def _within_trained_context(args: EngineArgs, model) -> EngineArgs:
    """The context limit never exceeds what the model was trained for (config.json's
    max_position_embeddings): the default 4096 becomes e.g. 2048 for a model that says so, and a
    larger --max-seq-len is lowered with a warning, as positions beyond it give garbage."""
    trained = getattr(getattr(model, "args", None), "max_positions", None)
    if not isinstance(trained, int) or args.max_seq_len <= trained:
        return args
    if args.max_seq_len != EngineArgs().max_seq_len:
        log.warning("max_seq_len %d is beyond the model's max_position_embeddings %d: using %d",
                    args.max_seq_len, trained, trained)
    return args.replace(max_seq_len=trained)


def _load_tokenizer(source, args: EngineArgs, decode_only: bool):
    if decode_only and not args.mock:
        from llamaserve.tokenizer.table import load_decode_tokenizer

        return load_decode_tokenizer(None if source is None else str(source), args.weight_cache_root)
    from llamaserve.tokenizer import load_tokenizer

    return load_tokenizer(source)


def _mock_model(args: EngineArgs, tokenizer):
    import torch

    from llamaserve.config import BUILTIN_MODEL_ARGS
    from llamaserve.model.mock import MOCK_NAME, MockTransformer
    from llamaserve.tokenizer import load_tokenizer

    # The mock's tensors are small copies: extra threads only fight the server for cores.
    torch.set_num_threads(1)
    tokenizer_dir = args.model  # the mock has no weights; a directory given names its tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_dir)
    eot = 128009 if 128009 < tokenizer.vocab_size else tokenizer.eos_id
    model = MockTransformer(BUILTIN_MODEL_ARGS.replace(vocab_size=tokenizer.vocab_size),
                            step_delay=args.mock_step_delay, eot_id=eot)
    info = {"name": MOCK_NAME, "format": "mock", "is_builtin": False, "is_mock": True}
    return model, info, tokenizer, tokenizer_dir


def _load_model(args: EngineArgs, progress: bool, exit_on_rank_death: bool):
    from llamaserve.parallel import torchrun_rank

    if args.tensor_parallel > 1 or torchrun_rank() is not None:
        from llamaserve.parallel import load_parallel_model, maybe_follow

        spec = args.load_spec()
        code = maybe_follow(spec, args.tensor_parallel)
        if code is not None:  # a torchrun rank other than 0 has followed rank 0 to the end
            raise SystemExit(code)
        loaded = load_parallel_model(spec, args.tensor_parallel, progress=progress,
                                     exit_on_rank_death=exit_on_rank_death)
    else:
        from llamaserve.devices import resolve_device, resolve_dtype
        from llamaserve.model.kv_cache import apply_kv_cache_dtype
        from llamaserve.weights import load_model

        device = resolve_device(args.device)
        loaded = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device, progress=progress,
                            quantize=args.quantize,
                            cache_root=args.weight_cache_root if args.model else None)  # built-in: not worth it
        apply_kv_cache_dtype(loaded.model, args.kv_cache_dtype)
    info = {"name": loaded.name, "format": loaded.format, "is_builtin": loaded.is_builtin, "is_mock": False}
    tokenizer_dir = str(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
    return loaded.model, info, tokenizer_dir
