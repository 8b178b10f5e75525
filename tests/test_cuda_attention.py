"""The Triton paged decode attention of CUDA (model/cuda_attention.py), run on the CPU by Triton's
interpreter (TRITON_INTERPRET=1, in a fresh process: the setting is read when triton is
imported): it equals torch's attention over the gathered blocks, for every cache dtype and GQA
group, reads nothing past a row's own position, gives a row the same bits alone or in any batch,
and the device decode step through it gives the tokens of the step through torch's attention.
On a GPU, benchmarks/cuda_checks.sh runs the CUDA tests with the compiled kernel."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import math, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from llamaserve.model import cuda_attention

    def reference(q, keys, values, tables, positions):
        rows, heads, hd = q.shape
        kv_heads = keys.shape[1]
        out = torch.empty(rows, heads, hd)
        for b in range(rows):
            n = int(positions[b]) + 1
            k = keys[tables[b]].transpose(0, 1).reshape(kv_heads, -1, hd)[:, :n].float()
            v = values[tables[b]].transpose(0, 1).reshape(kv_heads, -1, hd)[:, :n].float()
            k = k.repeat_interleave(heads // kv_heads, 0)
            v = v.repeat_interleave(heads // kv_heads, 0)
            w = torch.softmax((q[b].float()[:, None, :] @ k.transpose(1, 2))[:, 0] / math.sqrt(hd), -1)
            out[b] = (w[:, None, :] @ v)[:, 0]
        return out

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        for heads, kv_heads, hd in ((4, 4, 32), (8, 2, 64), (6, 2, 48)):
            per_row, positions = 6, torch.tensor([0, 15, 16, 40, 95])
            rows = len(positions)
            blocks = rows * per_row + 1  # rows own disjoint blocks (block 0: nobody's)
            keys = torch.randn(blocks, kv_heads, 16, hd, generator=g).to(dtype)
            values = torch.randn(blocks, kv_heads, 16, hd, generator=g).to(dtype)
            tables = (torch.randperm(blocks - 1, generator=g) + 1).view(rows, per_row)
            q = torch.randn(rows, heads, hd, generator=g)
            got = cuda_attention.decode(q, keys, values, tables, positions)
            want = reference(q, keys, values, tables, positions)
            err = float((got - want).abs().max())
            assert err < 1e-5, (dtype, heads, kv_heads, hd, err)
            # Keys past a row's position are never read: poisoning them changes nothing.
            poisoned_k, poisoned_v = keys.clone(), values.clone()
            for b in range(rows):
                n = int(positions[b]) + 1
                for i, blk in enumerate(tables[b].tolist()):
                    if i * 16 >= n:
                        poisoned_k[blk], poisoned_v[blk] = float("nan"), float("nan")
                    elif i * 16 + 16 > n:
                        poisoned_k[blk, :, n - i * 16:], poisoned_v[blk, :, n - i * 16:] = float("nan"), float("nan")
            assert torch.equal(cuda_attention.decode(q, poisoned_k, poisoned_v, tables, positions), got)
            # A row alone has the bits it has in the batch.
            for b in range(rows):
                alone = cuda_attention.decode(q[b:b + 1], keys, values, tables[b:b + 1], positions[b:b + 1])
                assert torch.equal(alone[0], got[b]), (dtype, b)
    print("kernel ok")

    # The device decode step (what CUDA captures) through the kernel, against torch's attention.
    from llamaserve.config import ModelArgs
    from llamaserve.model.llama import Transformer
    from llamaserve.weights.builtin import random_state_dict
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, 1, 0.5))
    model.eval()
    model.decode_kernels_fit = lambda: False

    def run(use_kernel):
        cuda_attention.applies = lambda q, keys: use_kernel
        cache = model.new_cache(3, 64)
        for slot, n in enumerate((5, 21, 33)):
            model(torch.arange(1, n + 1).view(1, -1) % 256, torch.tensor([0]), torch.tensor([slot]), cache)
        tokens, positions, slots = torch.tensor([[7], [8], [9]]), torch.tensor([5, 21, 33]), torch.arange(3)
        steps = []
        for _ in range(4):
            logits = model.decode_step(tokens, positions, slots, cache.tables.on_device(), cache.keys, cache.values)
            steps.append(logits)
            tokens, positions = logits.argmax(-1).view(-1, 1), positions + 1
        return torch.stack(steps)

    through_kernel, through_torch = run(True), run(False)
    assert torch.equal(through_kernel.argmax(-1), through_torch.argmax(-1))
    err = float((through_kernel - through_torch).norm() / through_torch.norm())
    assert 0 < err < 1e-5, err
    print("decode step ok", err)
''')


def test_paged_decode_attention_in_the_triton_interpreter(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(script), src], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "kernel ok" in run.stdout and "decode step ok" in run.stdout
