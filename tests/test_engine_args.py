"""EngineArgs (engine/args.py): one description of an engine for every entry point, its flags
defined once, its environment variables mapped once; and the one dtype / device helper."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
import torch

from llamaserve.devices import dtype_name, resolve_device, resolve_dtype, to_dtype
from llamaserve.engine.args import ENV_VARS, EngineArgs


def parse(argv: list[str], env: dict[str, str]) -> EngineArgs:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(argv), env)


def test_defaults_env_and_flags():
    assert parse([], {}) == EngineArgs()
    env = {"MODEL_WEIGHTS_PATH": "/w", "CACHE_ROOT": "/c", "MOCK_MODEL": "yes"}
    a = parse([], env)
    assert (a.model, a.cache_root, a.mock, a.weight_cache_root) == ("/w", "/c", True, "/c")
    a = parse(["--model", "/x", "--cache-root", "/d", "--no-weight-cache", "--quantize", "int8", "--dtype", "bfloat16",
               "--max-users", "3", "--max-seq-len", "99", "--prefill-chunk", "7", "--max-queued", "0",
               "--tensor-parallel", "2", "--device", "cpu"], env)
    assert a == EngineArgs(model="/x", mock=True, dtype="bfloat16", device="cpu", quantize="int8", tensor_parallel=2,
                           max_users=3, max_seq_len=99, prefill_chunk=7, max_queued=0, cache_root="/d",
                           weight_cache=False)
    assert a.weight_cache_root is None
    assert parse(["--model", "mock"], {}).mock and parse(["--model", "mock"], {}).model is None
    assert parse(["--weights", "builtin"], {"MODEL_WEIGHTS_PATH": "/w"}).model is None
    assert set(ENV_VARS) <= {f.name for f in fields(EngineArgs)}


def test_every_command_that_runs_an_engine_has_the_same_engine_flags():
    from llamaserve.cli import build_parser

    want = {opt for action in _engine_actions() for opt in action.option_strings}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("serve", "generate", "demo", "demo-alpaca"):
        have = set(sub.choices[command]._option_string_actions)
        assert want <= have, (command, want - have)


def _engine_actions():
    parser = argparse.ArgumentParser(add_help=False)
    EngineArgs.add_cli_args(parser)
    return parser._actions


@pytest.mark.parametrize("args, message", [
    (EngineArgs(max_users=0), "max_users must be >= 1"),
    (EngineArgs(tensor_parallel=True), "tensor_parallel must be a positive integer"),
    (EngineArgs(max_queued=-1), "max_queued must be >= 0"),
    (EngineArgs(dtype="int3"), "dtype must be one of"),
    (EngineArgs(quantize="int2"), "quantize must be int8, int4, fp8 or none"),
])
def test_validate_names_the_bad_field(args, message):
    with pytest.raises(ValueError, match=message):
        args.validate()
    with pytest.raises(ValueError, match="--max-seq-len must be >= 1"):
        EngineArgs(max_seq_len=0).validate(cli=True)


def test_one_dtype_and_device_helper():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert [to_dtype(n) for n in ("bf16", "fp16", "float32", torch.bfloat16)] == [
        torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="dtype must be one of"):
        to_dtype("float8")
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_spec_and_engine_config_follow_the_args():
    a = EngineArgs(model="/m", dtype="bf16", device="cpu", quantize="int8", cache_root="/c", max_users=5,
                   max_seq_len=64, prefill_chunk=8, max_queued=3, min_decode_rows=4)
    spec = a.load_spec()
    assert (spec.source, spec.dtype, spec.device, spec.quantize, spec.cache_root) == ("/m", "bfloat16", "cpu", "int8", "/c")
    assert EngineArgs(cache_root="/c").load_spec().cache_root is None  # the built-in model is not cached
    c = a.engine_config()
    assert (c.max_users, c.max_seq_len, c.prefill_chunk, c.max_queued, c.min_decode_rows) == (5, 64, 8, 3, 4)


def test_llm_takes_engine_args_or_their_fields():
    from llamaserve.llm import LLM

    llm = LLM(args=EngineArgs(mock=True, max_users=2, max_seq_len=64), progress=False)
    assert llm.name == "llamaserve-mock" and llm.config.max_users == 2 and llm.config.max_seq_len == 64
    llm = LLM(mock=True, max_users=3, max_seq_len=32, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    assert llm.args == EngineArgs(mock=True, max_users=3, max_seq_len=32, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="max_users must be >= 1"):
        LLM(mock=True, max_users=0, progress=False)
