"""Test helpers: tiny random Llama models written in every checkpoint format users have.

Plain functions (no pytest fixtures) so any test module can import them:

    args = tiny_args("llama3")
    sd = random_weights(args)
    write_meta(tmp / "meta", args, sd, n_shards=8)       # consolidated.NN.pth + params.json
    write_repacked(tmp / "rep", args, sd, chunk_size=1)   # layers_A-B.pth + params.json
    write_hf(tmp / "hf", args, sd, n_files=3)             # safetensors (+ index) + config.json

`sd` is always the full Meta-layout state dict (no `output.weight` when tied).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaserve.config import LLAMA3_VOCAB_SIZE, ModelArgs
from llamaserve.weights.layout import expected_shapes, meta_to_hf_state_dict


def tiny_args(kind: str = "llama3", tied: bool = False, **overrides) -> ModelArgs:
    """A 2-layer model of the given family's shape.

    llama2: n_kv_heads == n_heads, rope_theta 10000, vocab 32000 (Llama 2 shard rules);
    llama3: GQA, rope_theta 500000, vocab 128256 (Llama 3 shard rules); llama31: + scaled RoPE.
    `small_vocab=True` in overrides swaps in a 512-token vocab for speed where rules don't matter.
    """
    small = overrides.pop("small_vocab", False)
    if kind == "llama2":
        base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32000, multiple_of=32, rope_theta=10000.0)
    elif kind in ("llama3", "llama31"):
        base = dict(
            dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=LLAMA3_VOCAB_SIZE, multiple_of=32,
            ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=kind == "llama31",
        )
        if kind == "llama31":
            # A short original context so the scaling changes frequencies the test positions see.
            base.update(rope_original_max_positions=64, rope_scale_factor=8.0)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if small:
        base["vocab_size"] = 512
    base.update(overrides)
    return ModelArgs(tie_word_embeddings=tied, **base)


def random_weights(args: ModelArgs, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Meta-layout weights; norms are random around 1 so a mixed-up norm cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(args).items():
        noise = torch.randn(shape, generator=gen)
        sd[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise
    return sd


def meta_params(args: ModelArgs, llama2_vocab_minus_one: bool = False) -> dict:
    """params.json for args (Meta's format cannot express non-default RoPE scaling constants)."""
    params = args.to_meta_params()
    if llama2_vocab_minus_one:
        params["vocab_size"] = -1
        params.pop("rope_theta")
    return params


def _split_dim(name: str, llama3_vocab: bool) -> int | None:
    # Stated here independently of the loader so the tests are not circular (SPEC section 4).
    if name.endswith("_norm.weight") or name == "norm.weight":
        return None
    if name == "tok_embeddings.weight":
        return 0 if llama3_vocab else 1
    if name == "output.weight":
        return 0
    return {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}[name.split(".")[-2]]


def shard_tensor(name: str, t: torch.Tensor, n: int, llama3_vocab: bool) -> list[torch.Tensor]:
    """Split one full tensor into Meta's n tensor-parallel shards (the merge rules reversed)."""
    dim = _split_dim(name, llama3_vocab)
    if dim is None:
        return [t.clone() for _ in range(n)]
    if t.shape[dim] % n:
        raise ValueError(f"{name}: dim {dim} of {tuple(t.shape)} does not split into {n} shards")
    return [c.clone() for c in t.chunk(n, dim=dim)]


def write_meta(
    directory: Path,
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    n_shards: int = 1,
    dtype: torch.dtype | None = None,
    llama2_vocab_minus_one: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        t = t if dtype is None else t.to(dtype)
        for i, piece in enumerate(shard_tensor(name, t, n_shards, args.is_llama3_vocab)):
            shards[i][name] = piece
    for i, shard in enumerate(shards):
        shard.update(extra or {})
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    (directory / "params.json").write_text(json.dumps(meta_params(args, llama2_vocab_minus_one)))
    return directory


def write_repacked(directory: Path, args: ModelArgs, sd: dict[str, torch.Tensor], chunk_size: int = 1) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, args.n_layers, chunk_size):
        end = min(start + chunk_size, args.n_layers) - 1
        chunk = {
            k: v.clone() for k, v in sd.items()
            if (k.startswith("layers.") and start <= int(k.split(".")[1]) <= end) or (start == 0 and not k.startswith("layers."))
        }
        torch.save(chunk, directory / f"layers_{start}-{end}.pth")
    (directory / "params.json").write_text(json.dumps(meta_params(args)))
    return directory


def write_hf(directory: Path, args: ModelArgs, sd: dict[str, torch.Tensor], n_files: int = 1) -> Path:
    """config.json + model.safetensors (n_files=1) or model-0000i-of-0000n.safetensors + index."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = meta_to_hf_state_dict(sd, args)
    (directory / "config.json").write_text(json.dumps(args.to_hf_config()))
    if n_files == 1:
        save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(hf)
    weight_map = {}
    for i in range(n_files):
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {n: hf[n] for n in names[i::n_files]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory
