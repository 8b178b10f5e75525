"""The CPU's default dtype follows its capabilities: bf16 weights where it has bf16 arithmetic
(AVX512-BF16 or AMX) and the kernels build, fp32 elsewhere; LLAMASERVE_CPU_BF16=0 forces the
fp32 path, which must still work end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llamaserve import kernels
from llamaserve.kernels import qmatmul
from llamaserve.llm import resolve_dtype

CPU = torch.device("cpu")


def test_forcing_no_bf16_gives_fp32(monkeypatch):
    monkeypatch.setenv("LLAMASERVE_CPU_BF16", "0")
    assert not kernels.cpu_has_bf16()
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16  # an explicit choice stays
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("LLAMASERVE_CPU_BF16", raising=False)
    for flags, want in (("flags : fpu avx2 avx512f", False), ("flags : avx512f avx512_bf16", True),
                        ("flags : amx_tile amx_bf16", True)):
        monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: flags)
        assert kernels.cpu_has_bf16() is want
        expected = torch.bfloat16 if want and qmatmul.available() else torch.float32
        assert resolve_dtype("auto", CPU) == expected


@pytest.mark.parametrize("force_off", [True, False])
def test_default_dtype_generates_in_a_fresh_process(force_off, monkeypatch):
    """The whole default path (LLM with dtype auto on the built-in model) in a fresh process, with
    the bf16 path forced off and left to the CPU."""
    code = (
        "import torch\n"
        "from llamaserve.llm import LLM, SamplingParams\n"
        "llm = LLM('builtin', max_users=2, max_seq_len=64, progress=False)\n"
        "out = llm.generate(['hello'], SamplingParams(max_tokens=4, temperature=0))[0]\n"
        "m = llm.model\n"
        "print(len(out.token_ids), m.dtype, m.layers[0].feed_forward.w2.weight.dtype)\n"
    )
    env = dict(os.environ)
    if force_off:
        env["LLAMASERVE_CPU_BF16"] = "0"
    else:
        env.pop("LLAMASERVE_CPU_BF16", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    count, dtype, weight_dtype = run.stdout.split()[-3:]
    assert count == "4" and dtype == "torch.float32"  # activations are fp32 on CPU either way
    monkeypatch.delenv("LLAMASERVE_CPU_BF16", raising=False)  # conftest.py sets it for the suite
    bf16 = not force_off and kernels.cpu_has_bf16() and qmatmul.available()
    assert weight_dtype == ("torch.bfloat16" if bf16 else "torch.float32")
