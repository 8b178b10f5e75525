"""Where int4's quality loss on the quality.py checkpoint comes from: fp32 models whose weights are
replaced by their int4 (or int8) round trip, layer kinds and group sizes varied one at a time.

    flock /tmp/bench.lock python benchmarks/quality_int4_parts.py --out bench-out/smollm2

Round trips through weights/quant.py's own quantisers (the served int4 is the first variant's
weights, multiplied by the kernel), scored like quality.py's second table: llama-perplexity's
positions (second half of each window), perplexity, KL divergence from fp32, top-1 agreement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from llamaserve.weights import load_model, quant  # noqa: E402

# name -> (int4 group of the linear layers or 0 for fp32, the embedding / tied head: "int8", an int4 group, None)
VARIANTS = {
    "fp32": (0, None),
    "int4 g64 everywhere (the served int4's weights)": (64, 64),
    "int4 g64, embedding/head int8": (64, "int8"),
    "int4 g64, embedding/head fp32": (64, None),
    "int4 g32, embedding/head int8": (32, "int8"),
    "linears fp32, embedding/head int4 g64": (0, 64),
}


def round_trip(w: torch.Tensor, how) -> torch.Tensor:
    if how == "int8":
        return quant.dequantize_tensor(*quant.quantize_tensor(w))
    return quant.dequantize_int4(*quant.quantize_int4(w, how), w.shape[1])


@torch.no_grad()
def model_with(out: Path, group: int, embedding):
    model = load_model(out, dtype="float32", progress=False).model
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:  # the tied head is the embedding's storage
            continue
        seen.add(p.data_ptr())
        if group and quant.is_quantized_name(name) and name not in ("tok_embeddings.weight", "output.weight"):
            p.copy_(round_trip(p, group))
        elif embedding and name in ("tok_embeddings.weight", "output.weight"):
            p.copy_(round_trip(p, embedding))
    model.pack_weights()
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="quality.py's converted checkpoint")
    parser.add_argument("--window", type=int, default=256)
    ns = parser.parse_args()
    models = {name: model_with(ns.out, *how) for name, how in VARIANTS.items()}
    half = quality.SecondHalf(list(models))
    for tokens in quality.windows(ns.out, ns.window):
        out = {name: quality.logits(m, tokens) for name, m in models.items()}
        half.add(out, out["fp32"], tokens)
    print(f"| weights ({half.count} predictions) | perplexity | KL divergence from fp32 | top-1 agrees with fp32 |")
    print("|---|---|---|---|")
    for name in models:
        print(half.row(name).replace("| llamaserve ", "| ", 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
