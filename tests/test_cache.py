"""Converted-weight cache: hit, miss, stale source, truncated / corrupted / partial entry, settings."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf, write_meta
from llamaserve.cli import main as cli_main
from llamaserve.weights import cache as cache_mod
from llamaserve.weights import load_model
from llamaserve.weights.cache import WEIGHTS_FILE, list_entries, load_model_cached
from llamaserve.weights.quant import QuantLinear

ARGS = tiny_args("llama3", small_vocab=True)


@pytest.fixture
def meta_dir(tmp_path):
    return write_meta(tmp_path / "meta", ARGS, random_weights(ARGS), n_shards=2)


def logits(model, n=12):
    tokens = torch.arange(3, 3 + n)[None] % model.args.vocab_size
    return model(tokens, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), model.new_cache(1, 32), all_logits=True)


class ConvertCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = cache_mod.convert_state_dict

        def counting(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(cache_mod, "convert_state_dict", counting)


def test_miss_then_hit_mmaps_the_converted_tensors(meta_dir, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    counter = ConvertCounter(monkeypatch)
    ref = logits(load_model(meta_dir, progress=False).model)

    first = load_model_cached(meta_dir, cache_root=root, progress=False)
    assert counter.calls == 1
    [entry] = list_entries(root)
    assert (entry / WEIGHTS_FILE).is_file() and (entry / "manifest.json").is_file()
    assert torch.equal(logits(first.model), ref)

    second = load_model_cached(meta_dir, cache_root=root, progress=False)
    assert counter.calls == 1  # no conversion on a hit
    assert second.format == "meta" and second.name == "meta" and second.args == first.args
    assert torch.equal(logits(second.model), ref)
    # The parameters are views of the cache file's memory map, not private copies.
    maps = open("/proc/self/maps").read()
    assert str(entry / WEIGHTS_FILE) in maps


def test_stale_source_is_detected_and_rebuilt(meta_dir, tmp_path, caplog, monkeypatch):
    root = tmp_path / "cache"
    load_model_cached(meta_dir, cache_root=root, progress=False)
    [old] = list_entries(root)
    # Different weights in the same place: new shard files (size/mtime change).
    new_sd = random_weights(ARGS, seed=7)
    write_meta(meta_dir, ARGS, new_sd, n_shards=2)
    st = (meta_dir / "consolidated.00.pth").stat()
    os.utime(meta_dir / "consolidated.00.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    counter = ConvertCounter(monkeypatch)
    with caplog.at_level(logging.WARNING):
        loaded = load_model_cached(meta_dir, cache_root=root, progress=False)
    assert counter.calls == 1
    assert "stale" in caplog.text
    [new] = list_entries(root)
    assert new != old and not old.exists()
    assert torch.equal(logits(loaded.model), logits(load_model(meta_dir, progress=False).model))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-manifest"])
def test_damaged_entry_is_rebuilt_with_a_warning(meta_dir, tmp_path, caplog, monkeypatch, damage):
    root = tmp_path / "cache"
    ref = logits(load_model_cached(meta_dir, cache_root=root, progress=False).model)
    [entry] = list_entries(root)
    weights = entry / WEIGHTS_FILE
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size - 1000)
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 + 3] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    counter = ConvertCounter(monkeypatch)
    with caplog.at_level(logging.WARNING):
        loaded = load_model_cached(meta_dir, cache_root=root, progress=False)
    assert counter.calls == 1
    expected = {"truncate": "truncated", "flip": "mismatch", "no-manifest": "partial", "bad-manifest": "unreadable"}
    assert "unusable, rebuilding" in caplog.text and expected[damage] in caplog.text
    assert torch.equal(logits(loaded.model), ref)
    assert cache_mod.verify(root)[0][1] is None


def test_settings_change_makes_a_new_entry(meta_dir, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    counter = ConvertCounter(monkeypatch)
    fp32 = load_model_cached(meta_dir, cache_root=root, progress=False)
    q = load_model_cached(meta_dir, cache_root=root, quantize="int8", progress=False)
    bf16 = load_model_cached(meta_dir, cache_root=root, dtype=torch.bfloat16, progress=False)
    assert counter.calls == 3
    entries = list_entries(root)
    assert len(entries) == 3
    assert bf16.model.dtype == torch.bfloat16
    assert isinstance(q.model.layers[0].attention.wq, QuantLinear)

    # int8 loads back from its own entry with identical logits, and is ~1/4 of fp32 on disk.
    again = load_model_cached(meta_dir, cache_root=root, quantize="int8", progress=False)
    assert counter.calls == 3
    assert isinstance(again.model.output, QuantLinear)
    assert torch.equal(logits(again.model), logits(q.model))
    sizes = {e.name.split("-")[2]: (e / WEIGHTS_FILE).stat().st_size for e in entries}
    assert 0.25 <= sizes["int8"] / sizes["noquant"] < 0.3, sizes
    err = (logits(q.model) - logits(fp32.model)).norm() / logits(fp32.model).norm()
    assert 0 < err < 0.05


def test_tp_slices_and_hf_tied_source(tmp_path):
    args = tiny_args("llama3", small_vocab=True, tied=True)
    sd = random_weights(args)
    hf = write_hf(tmp_path / "hf", args, sd, n_files=2)
    root = tmp_path / "cache"
    from llamaserve.model.parallel import TensorParallel

    for rank in range(2):
        tp = TensorParallel(2, rank)
        direct = load_model(hf, tp=tp, progress=False).model.state_dict()
        cached = load_model_cached(hf, cache_root=root, tp=tp, progress=False).model.state_dict()
        again = load_model_cached(hf, cache_root=root, tp=tp, progress=False).model.state_dict()
        assert set(direct) == set(cached) == set(again)
        for k in direct:
            assert torch.equal(direct[k], cached[k]) and torch.equal(direct[k], again[k]), k
    assert len(list_entries(root)) == 2
    # Tied: the cache stores the embedding once; the output head is its vocab slice.
    assert "output.weight" not in cache_mod.mmap_safetensors(list_entries(root)[0] / WEIGHTS_FILE)[0]


def test_builtin_model_through_the_cache(tmp_path):
    root = tmp_path / "cache"
    a = load_model_cached(None, cache_root=root, quantize="int8", progress=False)
    b = load_model_cached("builtin", cache_root=root, quantize="int8", progress=False)
    assert a.is_builtin and b.is_builtin and b.format == "builtin"
    assert len(list_entries(root)) == 1
    assert torch.equal(logits(a.model), logits(b.model))


def test_cli_build_verify_clear(meta_dir, tmp_path, capsys):
    root = tmp_path / "cache"
    assert cli_main(["cache", "build", "--cache-root", str(root), "--model", str(meta_dir), "--tensor-parallel", "2",
                     "--quantize", "int8", "--no-progress"]) == 0
    assert len(list_entries(root)) == 2
    assert cli_main(["cache", "verify", "--cache-root", str(root)]) == 0
    assert "2 ok, 0 bad" in capsys.readouterr().out
    assert cli_main(["cache", "list", "--cache-root", str(root)]) == 0
    listed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert set(listed) == {e.name for e in list_entries(root)}
    for entry in list_entries(root):
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        assert listed[entry.name] == f"{size / 2**20:.1f} MiB" and size > 0

    entry = list_entries(root)[0]
    data = bytearray((entry / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 1
    (entry / WEIGHTS_FILE).write_bytes(bytes(data))
    assert cli_main(["cache", "verify", "--cache-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "1 ok, 1 bad" in out and "mismatch" in out

    (meta_dir / "params.json").write_text((meta_dir / "params.json").read_text() + " ")
    assert cli_main(["cache", "verify", "--cache-root", str(root)]) == 1
    assert "changed since it was built (stale)" in capsys.readouterr().out

    assert cli_main(["cache", "clear", "--cache-root", str(root)]) == 0
    assert list_entries(root) == []


def test_cli_needs_a_cache_root(monkeypatch, capsys):
    monkeypatch.delenv("CACHE_ROOT", raising=False)
    from llamaserve.commands import cache as cmd
    import argparse

    ns = argparse.Namespace(action="verify", cache_root=None)
    assert cmd.run(ns) == 2
    assert "CACHE_ROOT" in capsys.readouterr().err


def test_load_model_hooks(meta_dir, tmp_path, monkeypatch):
    counter = ConvertCounter(monkeypatch)
    root = tmp_path / "cache"
    a = load_model(meta_dir, progress=False, cache_root=root)
    b = load_model(meta_dir, progress=False, cache_root=root)
    assert counter.calls == 1 and len(list_entries(root)) == 1
    assert torch.equal(logits(a.model), logits(b.model))
    q = load_model(meta_dir, progress=False, quantize="int8")
    assert counter.calls == 1 and isinstance(q.model.layers[1].feed_forward.w1, QuantLinear)
    cached_q = load_model(meta_dir, progress=False, quantize="int8", cache_root=root)
    assert torch.equal(logits(q.model), logits(cached_q.model))


def test_safetensors_writer_round_trip_and_interop(tmp_path):
    from safetensors import safe_open

    from llamaserve.weights.safetensors_io import SafetensorsError, mmap_safetensors, write_safetensors

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "i8": torch.randint(-127, 128, (4, 3), dtype=torch.int8),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "view": torch.arange(20.0).view(4, 5)[:, 1],  # non-contiguous
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"producer": "test"})
    back, meta = mmap_safetensors(path)
    assert meta == {"producer": "test"}
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:  # the reference reader agrees
        assert f.metadata() == {"producer": "test"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(SafetensorsError, match="truncated or corrupted"):
        mmap_safetensors(path)


_HIT_IN_CHILD = """
import sys
from llamaserve.weights.cache import load_model_cached
loaded = load_model_cached(sys.argv[1], cache_root=sys.argv[2], progress=False)
assert loaded.model.inv_freq.device.type == "cpu" and not loaded.model.inv_freq.is_meta
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""


def test_a_hit_builds_the_model_without_importing_dynamo(meta_dir, tmp_path):
    # Computing anything on the meta device runs torch's Python meta kernels, whose first call
    # imports torch._dynamo: ~1.5 s of every engine start on a 2-core box.
    import subprocess
    import sys

    root = tmp_path / "cache"
    load_model_cached(meta_dir, cache_root=root, progress=False)
    out = subprocess.run([sys.executable, "-c", _HIT_IN_CHILD, str(meta_dir), str(root)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no dynamo"


# ---- the engine's token table, and `serve` restarting on both caches ----------------------------


def _tokenizer_dir(tmp_path):
    from llamaserve.tokenizer import default_tokenizer_path

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(default_tokenizer_path().read_bytes())
    return folder


@pytest.mark.parametrize("damage", ["stale", "truncate", "flip", "garbage"])
def test_token_table_damaged_or_stale_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    from llamaserve.tokenizer import load_tokenizer
    from llamaserve.tokenizer.table import DecodeOnlyTokenizer, load_decode_tokenizer, table_path

    folder = _tokenizer_dir(tmp_path)
    root = tmp_path / "cache"
    full = load_decode_tokenizer(folder, root)
    table = table_path(root, (folder / "tokenizer.model").resolve())
    assert table.is_file() and isinstance(load_decode_tokenizer(folder, root), DecodeOnlyTokenizer)
    if damage == "stale":  # the tokenizer was replaced: same path, new mtime
        st = (folder / "tokenizer.model").stat()
        os.utime(folder / "tokenizer.model", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif damage == "truncate":
        os.truncate(table, table.stat().st_size - 100)
    elif damage == "flip":
        data = bytearray(table.read_bytes())
        data[-50] ^= 0x20
        table.write_bytes(bytes(data))
    else:
        table.write_bytes(b"not a table")
    with caplog.at_level(logging.WARNING):
        again = load_decode_tokenizer(folder, root)
    expected = {"stale": "stale", "truncate": "truncated", "flip": "checksum mismatch", "garbage": "not a token table"}
    assert "tokenizer cache is unusable, rebuilding" in caplog.text and expected[damage] in caplog.text
    assert not isinstance(again, DecodeOnlyTokenizer)  # the full tokenizer, then the table rewritten
    rebuilt = load_decode_tokenizer(folder, root)
    assert isinstance(rebuilt, DecodeOnlyTokenizer)
    assert rebuilt._token_bytes == load_tokenizer(folder)._token_bytes == full._token_bytes


def test_serve_restart_hits_both_caches_and_its_server_process_never_loads_torch(tmp_path):
    import httpx

    from server_fixtures import start_server

    folder = _tokenizer_dir(tmp_path)
    args = tiny_args("llama3")  # the tokenizer's vocabulary
    write_meta(folder, args, random_weights(args), n_shards=1)
    root = tmp_path / "cache"
    texts = []
    for run in ("cold", "warm"):
        (tmp_path / run).mkdir()
        server = start_server(tmp_path / run, "--weights", str(folder), "--no-auth", "--max-users", "2",
                              "--max-seq-len", "64", env={"CACHE_ROOT": str(root)}, secret=None)
        try:
            engine_pid = server.status()["engine_pid"]
            assert "libtorch" not in open(f"/proc/{server.proc.pid}/maps").read()
            assert "libtorch" in open(f"/proc/{engine_pid}/maps").read()
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": "Hello there", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
            log = server.log_text()
        finally:
            server.stop()
        # The engine process was started before the server's web imports, then adopted.
        assert f"engine process adopted (pid {engine_pid})" in log
        assert ("weight cache hit" in log) == (run == "warm")
    assert texts[0] == texts[1]
    assert len(list((root / "llamaserve_tokenizers").iterdir())) == 1
    assert cli_main(["cache", "clear", "--cache-root", str(root)]) == 0
    assert not (root / "llamaserve_tokenizers").exists() and list_entries(root) == []


@pytest.mark.slow
def test_serve_no_weight_cache_neither_reads_nor_writes_the_cache(tmp_path):
    """README: `serve --no-weight-cache` turns the weight cache off (CACHE_ROOT still set for logs)."""
    import httpx

    from server_fixtures import start_server

    folder = _tokenizer_dir(tmp_path)
    args = tiny_args("llama3")
    write_meta(folder, args, random_weights(args), n_shards=1)
    root = tmp_path / "cache"
    server = start_server(tmp_path, "--weights", str(folder), "--no-auth", "--max-users", "2", "--max-seq-len", "64",
                          "--no-weight-cache", env={"CACHE_ROOT": str(root)}, secret=None)
    try:
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        log = server.log_text()
    finally:
        server.stop()
    assert list_entries(root) == [] and not (root / "llamaserve_tokenizers").exists()
    assert "weight cache" not in log
    assert list((root / "logs").glob("*.log"))  # CACHE_ROOT itself was in use
