"""`llamaserve repack`: Meta shards -> layers_{a}-{b} chunks (SPEC section 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamaserve.cli import main as cli_main
from llamaserve.config import ModelArgs
from llamaserve.weights import repack as repack_mod
from llamaserve.weights.builtin import random_state_dict
from llamaserve.weights.repack import RepackError, load_chunk, repack

LLAMA3 = ModelArgs(dim=64, n_layers=7, n_heads=8, n_kv_heads=8, vocab_size=256, multiple_of=32, rope_theta=500000.0)
LLAMA2 = ModelArgs(dim=64, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=320, multiple_of=32, rope_theta=10000.0)


def split_for_shard(name: str, t: torch.Tensor, n: int, llama2: bool) -> list[torch.Tensor]:
    """How Meta's model-parallel layers shard a tensor (the inverse of the merge under test)."""
    if name.endswith("norm.weight") or name == "rope.freqs":
        return [t.clone() for _ in range(n)]
    if name.endswith(("wo.weight", "w2.weight")) or (llama2 and name == "tok_embeddings.weight"):
        return [c.clone() for c in t.chunk(n, dim=1)]
    return [c.clone() for c in t.chunk(n, dim=0)]


def write_meta_checkpoint(d: Path, args: ModelArgs, n_shards: int, llama2: bool = False, seed: int = 0):
    d.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(args, seed)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    if llama2:
        sd["rope.freqs"] = torch.arange(args.head_dim // 2, dtype=torch.bfloat16)
    shards = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        for i, piece in enumerate(split_for_shard(name, t, n_shards, llama2)):
            shards[i][name] = piece
    for i, shard in enumerate(shards):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    params = args.to_meta_params()
    if llama2:
        params["vocab_size"] = -1  # what Meta's Llama 2 params.json says
        del params["rope_theta"], params["use_scaled_rope"]
    (d / "params.json").write_text(json.dumps(params))
    (d / "tokenizer.model").write_bytes(b"tokenizer-bytes")
    return sd


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_llama3_eight_shards_merge_exactly(tmp_path, fmt):
    src, out = tmp_path / "meta", tmp_path / "out"
    full = write_meta_checkpoint(src, LLAMA3, 8)
    written = repack(src, out, 3, fmt=fmt, progress=False)

    names = [f"layers_0-2.{fmt}", f"layers_3-5.{fmt}", f"layers_6-6.{fmt}"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["params.json", "tokenizer.model"])
    assert (out / "tokenizer.model").read_bytes() == b"tokenizer-bytes"
    assert json.loads((out / "params.json").read_text()) == json.loads((src / "params.json").read_text())

    chunks = [load_chunk(out / n) for n in names]
    first_layer_keys = {k for k in full if k.startswith(("layers.0.", "layers.1.", "layers.2."))}
    assert set(chunks[0]) == first_layer_keys | {"tok_embeddings.weight", "norm.weight", "output.weight"}
    assert set(chunks[2]) == {k for k in full if k.startswith("layers.6.")}
    merged = {k: v for c in chunks for k, v in c.items()}
    assert set(merged) == set(full)
    for k, t in full.items():
        assert merged[k].dtype == torch.bfloat16
        assert torch.equal(merged[k], t), k


def test_llama2_embedding_split_on_dim1_and_rope_freqs_dropped(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    full = write_meta_checkpoint(src, LLAMA2, 8, llama2=True)
    repack(src, out, 4, progress=False)
    merged = load_chunk(out / "layers_0-3.pth")
    assert "rope.freqs" in full and set(merged) == set(full) - {"rope.freqs"}
    for k, t in merged.items():
        assert torch.equal(t, full[k]), k
    assert merged["tok_embeddings.weight"].shape == (320, 64)


@pytest.mark.parametrize("llama2", [False, True], ids=["llama3", "llama2"])
def test_repacked_output_loads_with_the_loader(tmp_path, llama2):
    from llamaserve.weights import load_model

    # Llama 2's params.json says vocab_size -1, which readers take as Llama 2's 32000.
    args = LLAMA2.replace(vocab_size=32000) if llama2 else LLAMA3
    full = write_meta_checkpoint(tmp_path / "meta", args, 4, llama2=llama2)
    repack(tmp_path / "meta", tmp_path / "out", 3, fmt="safetensors" if llama2 else "pth", progress=False)
    loaded = load_model(tmp_path / "out", progress=False)
    assert loaded.format == "repacked" and loaded.args.vocab_size == args.vocab_size
    sd = loaded.model.state_dict()
    for k, t in full.items():
        if k != "rope.freqs":
            assert torch.equal(sd[k], t.float()), k


def test_single_shard_and_default_chunk_via_cli(tmp_path, capsys):
    src, out = tmp_path / "meta", tmp_path / "out"
    args = LLAMA3.replace(n_layers=12)
    full = write_meta_checkpoint(src, args, 1)
    assert cli_main(["repack", str(src), str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("layers_*")) == ["layers_0-4.pth", "layers_10-11.pth", "layers_5-9.pth"]
    assert torch.equal(load_chunk(out / "layers_10-11.pth")["layers.11.feed_forward.w2.weight"],
                       full["layers.11.feed_forward.w2.weight"])


def test_cli_positional_chunk_size_and_force(tmp_path, capsys):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 2)
    assert cli_main(["repack", str(src), str(out), "7", "--no-progress"]) == 0
    assert [p.name for p in out.glob("layers_*")] == ["layers_0-6.pth"]
    assert cli_main(["repack", str(src), str(out), "2", "--no-progress"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["repack", str(src), str(out), "--chunk-size", "4", "--force", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("layers_*")) == ["layers_0-3.pth", "layers_4-6.pth"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _no_output_left(tmp_path: Path, out: Path) -> bool:
    return not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_shard_is_named(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 4)
    (src / "consolidated.02.pth").unlink()
    with pytest.raises(RepackError, match=r"missing shard\(s\) consolidated\.02\.pth"):
        repack(src, out, 2, progress=False)
    assert _no_output_left(tmp_path, out)


def test_mixed_shapes_are_named(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 2)
    other = tmp_path / "other"
    write_meta_checkpoint(other, LLAMA3.replace(dim=128, n_heads=8, n_kv_heads=8), 2)
    os.replace(other / "consolidated.01.pth", src / "consolidated.01.pth")
    with pytest.raises(RepackError, match=r"mixed shapes"):
        repack(src, out, 2, progress=False)
    assert _no_output_left(tmp_path, out)


def test_shards_disagreeing_with_params_json(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 2)
    params = json.loads((src / "params.json").read_text())
    params["n_layers"] = 9
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(RepackError, match=r"layers\.7\..*missing"):
        repack(src, out, 2, progress=False)


@pytest.mark.parametrize("bad", [0, -1, 8])
def test_wrong_chunk_size(tmp_path, bad):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 1)
    with pytest.raises(RepackError, match=r"chunk size must be between 1 and the model's 7 layers"):
        repack(src, out, bad, progress=False)
    assert _no_output_left(tmp_path, out)


def test_non_empty_output_without_force(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 1)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RepackError, match="not empty"):
        repack(src, out, 2, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 2)
    real_save = repack_mod._save_chunk
    calls = []

    def failing_save(path, tensors, fmt):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, tensors, fmt)

    monkeypatch.setattr(repack_mod, "_save_chunk", failing_save)
    with pytest.raises(OSError, match="disk full"):
        repack(src, out, 2, progress=False)
    assert _no_output_left(tmp_path, out)


def test_corrupt_shard_is_named(tmp_path):
    src, out = tmp_path / "meta", tmp_path / "out"
    write_meta_checkpoint(src, LLAMA3, 2)
    (src / "consolidated.01.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RepackError, match=r"consolidated\.01\.pth: cannot be read"):
        repack(src, out, 2, progress=False)


# A layer-dominated 8-shard checkpoint of ~0.93 GB: each layer is ~104 MB, the first chunk (layer 0
# plus embeddings and output head) ~205 MB, so holding the whole model would break the bound.
BIG = ModelArgs(dim=1536, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=8192, multiple_of=256)

# Peak RSS from VmHWM after a reset, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so
# a child of a large pytest process would report the parent's size.
_MEASURE = """
import sys
from llamaserve.weights.repack import repack
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
repack(sys.argv[1], sys.argv[2], 1, progress=False)
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
def test_peak_rss_bounded_by_largest_chunk(tmp_path):
    from llamaserve.weights.layout import expected_shapes

    src, out = tmp_path / "meta", tmp_path / "out"
    src.mkdir()
    n = 8
    shapes = expected_shapes(BIG)
    for i in range(n):
        shard = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                piece = shape
            elif name.endswith(("wo.weight", "w2.weight")):
                piece = (shape[0], shape[1] // n)
            else:
                piece = (shape[0] // n, shape[1])
            shard[name] = torch.full(piece, 0.01 * (i + 1))
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
        del shard
    (src / "params.json").write_text(json.dumps(BIG.to_meta_params()))
    total = sum(p.stat().st_size for p in src.glob("*.pth"))
    try:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(out)], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        peak = int(proc.stdout.split()[-1])
        largest = max(p.stat().st_size for p in out.glob("layers_*.pth"))
        assert len(list(out.glob("layers_*.pth"))) == 8
        assert largest < total / 4  # the bound below is then far from "whole model in RAM"
        print(f"peak RSS {peak / 2**20:.0f} MiB, largest chunk {largest / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB")
        assert peak < 2 * largest + 300 * 2**20
    finally:
        import shutil

        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
