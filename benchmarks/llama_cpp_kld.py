"""llama.cpp's formats of the same weights, scored on quality.py's token windows against its fp32.

`llama-perplexity --kl-divergence` reads a "base" file (normally written by its own
`--kl-divergence-base` run): the token windows, then the base model's log-probabilities at the
second half of each window. It evaluates its model on exactly those tokens and reports perplexity,
KL divergence from the base and top-1 agreement over those positions. quality.py writes that file
from llamaserve's fp32 logits, so every llama.cpp format is measured against the same reference,
on the same tokens and positions, as our own precisions (`scored` below).

The file layout follows tools/perplexity/perplexity.cpp (b11434): "_logits_", uint32 n_ctx,
int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx]; then per window, per scored position,
a row of nv = 2 * ceil(n_vocab / 2) + 4 uint16: float32 scale, float32 min_log_prob, then each
logit's log-probability as round((logit - min_logit) / scale), with min_logit clamped to 16 below
the maximum (lower logits stored as 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

MAGIC = b"_logits_"
# Every llama.cpp numeric line we read: "Mean PPL(Q) : 14.1 ± 0.3", "Same top p: 98.1 ± 0.5 %".
RESULTS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.eE+-]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.eE+-]+)",
    "kld": r"Mean\s+KLD:\s*([0-9.eE+-]+)",
    "top1": r"Same top p:\s*([0-9.eE+-]+)",
}


def scored(window: int) -> slice:
    """Positions whose logits llama-perplexity scores: the second half of the window, each
    predicting the next token (the model always has at least window/2 tokens of context)."""
    return slice(window // 2, window - 1)


def row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def write_header(f, windows: list[torch.Tensor], n_vocab: int) -> None:
    n_ctx = windows[0].numel()
    if any(w.numel() != n_ctx for w in windows):
        raise ValueError("llama-perplexity needs every window the same length")
    f.write(MAGIC)
    f.write(np.array([n_ctx], "<u4").tobytes())
    f.write(np.array([n_vocab, len(windows)], "<i4").tobytes())
    f.write(torch.cat(windows).numpy().astype("<i4").tobytes())


def write_window(f, logits: torch.Tensor) -> None:
    """One window's base rows from its logits (window x vocab, all positions)."""
    lg = logits[scored(logits.shape[0])].float()
    top = lg.max(-1, keepdim=True).values
    low = torch.maximum(lg.min(-1, keepdim=True).values, top - 16)
    log_sum_exp = (lg - top).exp().sum(-1, keepdim=True).log()
    scale = (top - low) / 65535
    q = torch.where(lg > low, torch.round((lg - low) / scale.clamp_min(1e-30)), torch.zeros_like(lg))
    rows = np.zeros((lg.shape[0], row_width(lg.shape[1])), "<u2")
    rows[:, :4] = np.ascontiguousarray(torch.cat([scale, low - top - log_sum_exp], -1).numpy().astype("<f4")).view("<u2")
    rows[:, 4:4 + lg.shape[1]] = q.numpy().astype("<u2")
    f.write(rows.tobytes())


def parse(output: str) -> dict[str, float]:
    found = {}
    for name, pattern in RESULTS.items():
        m = re.search(pattern, output)
        if m is None:
            raise RuntimeError(f"llama-perplexity printed no {name!r} ({pattern}); its output ends:\n{output[-2000:]}")
        found[name] = float(m.group(1)) / (100 if name == "top1" else 1)
    return found


def source_dir(bin_dir: Path) -> Path:
    """The llama.cpp checkout a build's bin/ came from (it holds convert_hf_to_gguf.py)."""
    for d in bin_dir.resolve().parents:
        if (d / "convert_hf_to_gguf.py").exists():
            return d
    raise FileNotFoundError(f"no convert_hf_to_gguf.py in any folder above {bin_dir}")


def ggufs(bin_dir: Path, checkpoint: Path, formats: list[str]) -> dict[str, Path]:
    """checkpoint converted to GGUF F32 by llama.cpp's converter, then llama-quantize'd to each
    format; kept next to the checkpoint (`<checkpoint>-gguf/`) and reused."""
    out = checkpoint.parent / f"{checkpoint.name}-gguf"
    out.mkdir(exist_ok=True)
    f32 = out / "model-F32.gguf"
    if not f32.exists():
        # transformers leaves "architectures" empty for a GGUF-loaded model; the converter needs it.
        with tempfile.TemporaryDirectory() as staged:
            for file in checkpoint.iterdir():
                if file.name != "config.json":
                    os.symlink(file.resolve(), Path(staged) / file.name)
            config = json.loads((checkpoint / "config.json").read_text())
            config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
            (Path(staged) / "config.json").write_text(json.dumps(config))
            src = source_dir(bin_dir)
            _run([sys.executable, str(src / "convert_hf_to_gguf.py"), staged, "--outtype", "f32", "--outfile", str(f32)],
                 env=dict(os.environ, PYTHONPATH=str(src / "gguf-py")))
    paths = {}
    for fmt in formats:
        paths[fmt] = out / f"model-{fmt}.gguf"
        if not paths[fmt].exists():
            _run([str(bin_dir / "llama-quantize"), str(f32), str(paths[fmt]), fmt])
    return paths


def _run(cmd: list[str], env=None) -> str:
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return run.stdout + run.stderr


def score(bin_dir: Path, gguf: Path, base: Path, window: int, threads: int) -> dict[str, float]:
    """llama-perplexity's KL divergence run: llama.cpp's defaults otherwise (f16 KV cache)."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "--kl-divergence", "--kl-divergence-base", str(base),
           "-c", str(window), "-b", str(window), "-t", str(threads)]
    return parse(_run(cmd))
