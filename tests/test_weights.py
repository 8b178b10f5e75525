"""Checkpoint formats load to the same model; every bad input gets a WeightsError naming the file."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf, write_meta, write_repacked
from llamaserve.model.parallel import TensorParallel
from llamaserve.weights import WeightsError, build_model, load_model, open_checkpoint, read_state_dict
from llamaserve.weights.builtin import BUILTIN_NAME, builtin_state_dict


def _state(lm) -> dict[str, torch.Tensor]:
    return dict(lm.model.state_dict())


def _logits(lm, tokens: torch.Tensor) -> torch.Tensor:
    cache = lm.model.new_cache(n_slots=1, max_seq_len=32)
    prefill = lm.model(tokens, torch.tensor([0]), torch.tensor([0]), cache, all_logits=True)
    step = lm.model(tokens[:, :1], torch.tensor([tokens.shape[1]]), torch.tensor([0]), cache)
    return torch.cat([prefill[0], step])


def _all_formats(root: Path, args, sd) -> dict[str, Path]:
    return {
        "meta-8-shards": write_meta(root / "meta8", args, sd, n_shards=8),
        "repacked": write_repacked(root / "repacked", args, sd, chunk_size=1),
        "hf-single": write_hf(root / "hf1", args, sd, n_files=1),
        "hf-sharded": write_hf(root / "hf3", args, sd, n_files=3),
    }


@pytest.mark.parametrize("kind", ["llama3", "llama2"])
def test_all_formats_load_identical_tensors_and_logits(tmp_path, kind):
    args = tiny_args(kind)
    sd = random_weights(args, seed=4)
    tokens = torch.randint(0, args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    loaded = {fmt: load_model(d, progress=False) for fmt, d in _all_formats(tmp_path, args, sd).items()}

    for fmt, lm in loaded.items():
        assert lm.format == fmt.split("-")[0] and not lm.is_builtin
        state = _state(lm)
        for name, t in sd.items():
            assert torch.equal(state[name], t), f"{fmt}: {name} differs from the written weights"
        assert torch.equal(state["output.weight"], sd["output.weight"])
    reference = _logits(loaded["meta-8-shards"], tokens)
    for fmt, lm in loaded.items():
        assert torch.equal(_logits(lm, tokens), reference), f"{fmt}: logits differ from the Meta checkpoint's"


def test_llama2_download_layout(tmp_path):
    """Meta's Llama 2 files: params.json says vocab_size -1, shards carry a `rope.freqs` table."""
    args = tiny_args("llama2")
    sd = random_weights(args)
    d = write_meta(tmp_path / "l2", args, sd, n_shards=2, llama2_vocab_minus_one=True, extra={"rope.freqs": torch.ones(8)})
    lm = load_model(d, progress=False)
    assert lm.args.vocab_size == 32000 and lm.args.rope_theta == 10000.0
    assert all(torch.equal(_state(lm)[k], v) for k, v in sd.items())


def test_progress_only_for_large_checkpoints(tmp_path, monkeypatch, caplog):
    from llamaserve.progress import INTERVAL_ENV, MIN_BYTES_ENV

    args = tiny_args("llama3", small_vocab=True)
    d = write_hf(tmp_path / "hf", args, random_weights(args))
    caplog.set_level(logging.INFO, logger="llamaserve.progress")
    monkeypatch.setattr(logging.getLogger("llamaserve.progress"), "propagate", True)  # the CLI may have unset it
    load_model(d)
    assert "loading hf" not in caplog.text
    monkeypatch.setenv(MIN_BYTES_ENV, "0")
    monkeypatch.setenv(INTERVAL_ENV, "0")
    load_model(d)
    # Not a terminal here: log lines with bytes and tensors instead of a bar.
    assert "loading hf: " in caplog.text and "1/21 tensors" in caplog.text and "KiB" in caplog.text
    assert re.search(r"loading hf: [\d.]+ KiB, \d+ tensors in [\d.]+ s", caplog.text)
    caplog.clear()
    load_model(d, progress=False)
    assert "loading hf" not in caplog.text


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_loaded_model_keeps_no_checkpoint_file_mapped(tmp_path):
    """Weights are copies: replacing or deleting the checkpoint later cannot crash a server."""
    args = tiny_args("llama3", small_vocab=True)
    sd = random_weights(args)
    dirs = [write_meta(tmp_path / "m", args, sd, n_shards=2), write_hf(tmp_path / "h", args, sd, n_files=2),
            write_repacked(tmp_path / "r", args, sd)]
    models = [load_model(d, progress=False) for d in dirs]
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    assert not mapped, mapped
    assert len(models) == 3


def test_tied_output_shares_the_embedding(tmp_path):
    args = tiny_args("llama3", tied=True, small_vocab=True)
    sd = random_weights(args)
    for d in (write_hf(tmp_path / "hf", args, sd), write_meta(tmp_path / "meta", args, sd, n_shards=2)):
        model = load_model(d, progress=False).model
        assert model.args.tie_word_embeddings
        assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
        assert torch.equal(model.output.weight, sd["tok_embeddings.weight"])


def test_repacked_safetensors_chunks_load(tmp_path):
    from safetensors.torch import save_file

    args = tiny_args("llama3", small_vocab=True)
    sd = random_weights(args)
    src = write_repacked(tmp_path / "pth", args, sd, chunk_size=2)
    out = tmp_path / "st"
    out.mkdir()
    shutil.copy(src / "params.json", out / "params.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "layers_0-1.safetensors"))
    lm = load_model(out, progress=False)
    assert lm.format == "repacked"
    assert all(torch.equal(_state(lm)[k], v) for k, v in sd.items())


def test_dtype_is_converted_per_tensor(tmp_path):
    args = tiny_args("llama3", small_vocab=True)
    sd = random_weights(args)
    bf16_dir = write_meta(tmp_path / "bf16", args, sd, n_shards=2, dtype=torch.bfloat16)
    lm = load_model(bf16_dir, dtype=torch.float32, progress=False)
    for name, t in sd.items():
        got = _state(lm)[name]
        assert got.dtype == torch.float32 and torch.equal(got, t.to(torch.bfloat16).float()), name
    lm16 = load_model(write_hf(tmp_path / "hf", args, sd), dtype="bfloat16", progress=False)
    assert all(_state(lm16)[k].dtype == torch.bfloat16 and torch.equal(_state(lm16)[k], v.to(torch.bfloat16)) for k, v in sd.items())
    assert lm16.model.inv_freq.dtype == torch.float32  # RoPE stays exact


@pytest.mark.parametrize("size", [2, 4])
def test_tensor_parallel_slices_from_every_format(tmp_path, size):
    """Each rank reads only its slice; size 4 > n_kv_heads 2 keeps one shared KV head per rank."""
    args = tiny_args("llama3", small_vocab=True)
    sd = random_weights(args, seed=9)
    dirs = _all_formats(tmp_path, args, sd)
    hd, group = args.head_dim, args.n_heads // args.n_kv_heads
    for rank in range(size):
        tp = TensorParallel(size=size, rank=rank)
        q_rows = args.n_heads * hd // size
        kv_head = (rank * args.n_heads // size) // group
        kv_rows = slice(kv_head * hd, (kv_head + 1) * hd) if size > args.n_kv_heads else slice(rank * args.n_kv_heads * hd // size, (rank + 1) * args.n_kv_heads * hd // size)
        ffn = args.hidden_dim // size
        vocab = args.vocab_size // size
        want = {
            "tok_embeddings.weight": sd["tok_embeddings.weight"],
            "output.weight": sd["output.weight"][rank * vocab : (rank + 1) * vocab],
            "layers.1.attention.wq.weight": sd["layers.1.attention.wq.weight"][rank * q_rows : (rank + 1) * q_rows],
            "layers.1.attention.wk.weight": sd["layers.1.attention.wk.weight"][kv_rows],
            "layers.1.attention.wv.weight": sd["layers.1.attention.wv.weight"][kv_rows],
            "layers.1.attention.wo.weight": sd["layers.1.attention.wo.weight"][:, rank * q_rows : (rank + 1) * q_rows],
            "layers.1.feed_forward.w1.weight": sd["layers.1.feed_forward.w1.weight"][rank * ffn : (rank + 1) * ffn],
            "layers.1.feed_forward.w2.weight": sd["layers.1.feed_forward.w2.weight"][:, rank * ffn : (rank + 1) * ffn],
            "layers.1.ffn_norm.weight": sd["layers.1.ffn_norm.weight"],
        }
        for fmt, d in dirs.items():
            with open_checkpoint(d) as reader:
                got = read_state_dict(reader, tp=tp, progress=False)
            for name, t in want.items():
                assert torch.equal(got[name], t), f"{fmt}, rank {rank}/{size}: {name}"
            # Every slice has the shape the rank's model expects (strict load on the meta device).
            build_model(args, got, tp)


def test_builtin_model():
    args, sd = builtin_state_dict()
    for source in (None, "builtin"):
        lm = load_model(source)
        assert lm.is_builtin and lm.format == "builtin" and lm.name == BUILTIN_NAME and lm.tokenizer_dir is None
        assert lm.args == args
        assert all(torch.equal(_state(lm)[k], v) for k, v in sd.items())


def test_tokenizer_dir_is_the_checkpoint_dir_or_its_parent(tmp_path):
    args = tiny_args("llama2", small_vocab=True)
    sd = random_weights(args)
    d = write_meta(tmp_path / "llama-2-7b", args, sd)
    assert load_model(d, progress=False).tokenizer_dir is None
    (tmp_path / "tokenizer.model").write_bytes(b"x")  # Meta's Llama 2 download: one level up
    assert load_model(d, progress=False).tokenizer_dir == tmp_path
    (d / "tokenizer.model").write_bytes(b"x")
    assert load_model(d, progress=False).tokenizer_dir == d


# ---- bad input ----------------------------------------------------------------------------


def _tiny(tmp_path, fmt="meta", n_shards=1, **kw):
    args = tiny_args("llama3", small_vocab=True)
    sd = random_weights(args)
    d = tmp_path / fmt
    if fmt == "meta":
        write_meta(d, args, sd, n_shards=n_shards, **kw)
    elif fmt == "repacked":
        write_repacked(d, args, sd, chunk_size=1)
    else:
        write_hf(d, args, sd, n_files=n_shards)
    return d, args, sd


def _edit_pth(path: Path, edit) -> None:
    tensors = dict(torch.load(path, weights_only=True))
    edit(tensors)
    torch.save(tensors, path)


def _expect(d, *fragments):
    with pytest.raises(WeightsError) as info:
        load_model(d, progress=False)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message: {msg}"
    return msg


class NotATensor:
    pass


def test_missing_directory(tmp_path):
    _expect(tmp_path / "nope", str(tmp_path / "nope"), "not found")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.pth"
    f.write_bytes(b"")
    _expect(f, "model.pth", "not a directory")


def test_no_recognised_files(tmp_path):
    (tmp_path / "README.txt").write_text("hi")
    _expect(tmp_path, str(tmp_path), "no recognised checkpoint files", "README.txt")


def test_missing_params_json(tmp_path):
    d, _, _ = _tiny(tmp_path)
    (d / "params.json").unlink()
    _expect(d, "params.json", "not found")


def test_missing_tensor(tmp_path):
    d, _, _ = _tiny(tmp_path)
    _edit_pth(d / "consolidated.00.pth", lambda t: t.pop("layers.1.feed_forward.w3.weight"))
    _expect(d, "consolidated.00.pth", "missing tensor layers.1.feed_forward.w3.weight")


def test_unexpected_tensor(tmp_path):
    d, _, _ = _tiny(tmp_path)
    _edit_pth(d / "consolidated.00.pth", lambda t: t.update({"layers.0.attention.bias": torch.zeros(3)}))
    _expect(d, "consolidated.00.pth", "unexpected tensor layers.0.attention.bias")


def test_wrong_shape(tmp_path):
    d, _, _ = _tiny(tmp_path)
    _edit_pth(d / "consolidated.00.pth", lambda t: t.update({"layers.0.attention.wv.weight": torch.zeros(16, 64)}))
    _expect(d, "consolidated.00.pth", "layers.0.attention.wv.weight", "(16, 64)", "(32, 64)", "params.json")


def test_params_json_disagrees_with_tensors(tmp_path):
    d, _, _ = _tiny(tmp_path)
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    _expect(d, "params.json", "n_layers=3", "layers 0-1")
    (d / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    _expect(d, "consolidated.00.pth", "layers.0.attention.wk.weight", "params.json", "n_kv_heads=4")


def test_hf_config_disagrees_with_tensors(tmp_path):
    d, _, _ = _tiny(tmp_path, "hf")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    _expect(d, "model.safetensors", "config.json", "(100, 64)")


@pytest.mark.parametrize("fmt,name", [("meta", "consolidated.00.pth"), ("repacked", "layers_1-1.pth"), ("hf", "model.safetensors")])
def test_truncated_file(tmp_path, fmt, name):
    d, _, _ = _tiny(tmp_path, fmt)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    _expect(d, name, "truncated")


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    d, _, _ = _tiny(tmp_path)
    _edit_pth(d / "consolidated.00.pth", lambda t: t.update({"evil": NotATensor()}))
    _expect(d, "consolidated.00.pth", "refused")


def test_shards_with_different_counts_per_layer(tmp_path):
    d, _, _ = _tiny(tmp_path, n_shards=2)
    _edit_pth(d / "consolidated.01.pth", lambda t: t.pop("layers.1.feed_forward.w1.weight"))
    _expect(d, "consolidated.01.pth", "layer 1 has 8 tensors", "consolidated.00.pth has 9", "layers.1.feed_forward.w1.weight")


def test_shards_with_inconsistent_shapes(tmp_path):
    d, _, _ = _tiny(tmp_path, n_shards=2)
    _edit_pth(d / "consolidated.01.pth", lambda t: t.update({"layers.0.attention.wq.weight": torch.zeros(24, 64)}))
    _expect(d, "consolidated.01.pth", "layers.0.attention.wq.weight", "(24, 64)", "(32, 64)")


def test_missing_shard(tmp_path):
    d, _, _ = _tiny(tmp_path, n_shards=4)
    (d / "consolidated.02.pth").unlink()
    _expect(d, "consolidated.02.pth", "missing")


def test_repacked_gap_and_misplaced_tensor(tmp_path):
    args = tiny_args("llama3", small_vocab=True, n_layers=3)
    sd = random_weights(args)
    d = write_repacked(tmp_path / "r", args, sd, chunk_size=1)
    (d / "layers_1-1.pth").rename(tmp_path / "aside.pth")
    _expect(d, "layers_2-2.pth", "layers 1-1 in no chunk")
    (tmp_path / "aside.pth").rename(d / "layers_1-1.pth")
    _edit_pth(d / "layers_2-2.pth", lambda t: t.update({"layers.0.ffn_norm.weight": torch.ones(64)}))
    _expect(d, "layers_2-2.pth", "unexpected tensor layers.0.ffn_norm.weight")


def test_hf_missing_tensor_is_named_as_in_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    d, _, _ = _tiny(tmp_path, "hf")
    tensors = load_file(d / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(d / "model.safetensors"))
    _expect(d, "model.safetensors", "missing tensor model.layers.1.mlp.up_proj.weight")


def test_hf_index_and_names(tmp_path):
    d, _, _ = _tiny(tmp_path, "hf", n_shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    _expect(d, "model.safetensors.index.json", "model-00002-of-00002.safetensors")

    from safetensors.torch import save_file

    d2, _, _ = _tiny(tmp_path / "b", "hf")
    save_file({"vision_tower.weight": torch.zeros(2)}, str(d2 / "extra.safetensors"))
    _expect(d2, "extra.safetensors", "unexpected tensor vision_tower.weight")
    (d2 / "extra.safetensors").unlink()
    (d2 / "config.json").unlink()
    _expect(d2, "config.json", "not found")
