"""Write the benchmark model: Llama-3-shaped, ~272M parameters, random weights, f32.

Output directory holds what a Hugging Face download holds (config.json, model.safetensors,
tokenizer.json converted from the real Llama 3 tokenizer.model) so that every system under test
reads the same weights. With --gguf it also writes model-f32.gguf through llama.cpp's converter.

    python benchmarks/make_model.py bench-out/model [--gguf LLAMA_CPP_DIR]
    python benchmarks/make_model.py bench-out/model --meta-shards 8   # + bench-out/model-meta8 (bf16)

--meta-shards N also writes the same weights as a Meta download: N tensor-parallel
consolidated.NN.pth shards in bf16 with params.json and tokenizer.model, the layout the
converted-weight cache exists for (merge, convert to the compute dtype, slice per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llamaserve.config import ModelArgs
from llamaserve.weights.builtin import random_state_dict
from llamaserve.weights.layout import meta_to_hf_state_dict

BENCH_ARGS = ModelArgs(
    dim=768,
    n_layers=12,
    n_heads=12,
    n_kv_heads=4,
    vocab_size=128256,
    explicit_hidden_dim=2048,
    rope_theta=500000.0,
)


def write_tokenizer(out: Path) -> None:
    import llama_models.llama3 as llama3_pkg
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(llama3_pkg.__file__).parent / "tokenizer.model"
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    specials += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(specials))]
    tok = TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=specials).converted()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128009]}))


def write_meta_shards(out: Path, n_shards: int, seed: int) -> None:
    import shutil

    import llama_models.llama3 as llama3_pkg

    out.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(BENCH_ARGS, seed)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        t = t.to(torch.bfloat16)
        if name.endswith("norm.weight"):
            pieces = [t] * n_shards  # replicated
        elif name.endswith(("wo.weight", "w2.weight")):
            pieces = t.chunk(n_shards, dim=1)
        else:  # wq wk wv w1 w3, and Llama 3's tok_embeddings / output: split on dim 0
            pieces = t.chunk(n_shards, dim=0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(BENCH_ARGS.to_meta_params(), indent=2))
    shutil.copy(Path(llama3_pkg.__file__).parent / "tokenizer.model", out / "tokenizer.model")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", type=Path, metavar="LLAMA_CPP_DIR", help="also write model-f32.gguf")
    parser.add_argument("--meta-shards", type=int, metavar="N", help="also write OUT-metaN: N bf16 Meta shards")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file

    if not (ns.out / "model.safetensors").exists():
        sd = meta_to_hf_state_dict(random_state_dict(BENCH_ARGS, ns.seed), BENCH_ARGS)
        save_file(sd, str(ns.out / "model.safetensors"), metadata={"format": "pt"})
        (ns.out / "config.json").write_text(json.dumps(BENCH_ARGS.to_hf_config(), indent=2))
        write_tokenizer(ns.out)
    print(f"{ns.out}: {BENCH_ARGS.num_parameters() / 1e6:.1f}M parameters")

    if ns.meta_shards:
        meta_dir = ns.out.with_name(f"{ns.out.name}-meta{ns.meta_shards}")
        if not (meta_dir / "params.json").exists():
            write_meta_shards(meta_dir, ns.meta_shards, ns.seed)
        print(f"{meta_dir}: {ns.meta_shards} bf16 Meta shards")

    if ns.gguf and not (ns.out / "model-f32.gguf").exists():
        env = dict(os.environ, PYTHONPATH=str(ns.gguf / "gguf-py"))
        subprocess.run(
            [sys.executable, str(ns.gguf / "convert_hf_to_gguf.py"), str(ns.out), "--outtype", "f32",
             "--outfile", str(ns.out / "model-f32.gguf")],
            check=True, env=env,
        )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
