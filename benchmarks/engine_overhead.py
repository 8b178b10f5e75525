"""Cost of the engine around the model: scheduler + sampler + stops per decode step at N users.

    python benchmarks/engine_overhead.py                      # benchmark shape, 32 users
    python benchmarks/engine_overhead.py --shape builtin --steps 20 --threads 1

All users are prefilled first (128-token prompts); then `--steps` decode steps are timed. The
engine's own counters split each step into the model forward (runner) and everything else
(scheduling, tensor building, sampling, detokenising, stop checks, output objects). Reported per
sampling mode as medians over `--repeats` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llamaserve.config import BUILTIN_MODEL_ARGS, ModelArgs
from llamaserve.engine.engine import Engine, EngineConfig
from llamaserve.engine.request import SamplingParams
from llamaserve.model.llama import Transformer
from llamaserve.tokenizer import load_tokenizer
from llamaserve.weights.builtin import random_state_dict

SHAPES = {
    "builtin": BUILTIN_MODEL_ARGS,
    # The benchmark model: Llama-3-shaped, ~270M parameters.
    "bench": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=128256, explicit_hidden_dim=2048),
}

MODES = {
    "greedy": dict(temperature=0.0),
    "top-k 10 / top-p 0.9 / T 1.0 (demo sampling)": dict(temperature=1.0, top_k=10, top_p=0.9),
    "temperature 0.8 (full vocabulary)": dict(temperature=0.8),
    "top-p 0.9 only": dict(temperature=1.0, top_p=0.9),
    "greedy + repetition/frequency penalties": dict(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.2),
}


def build(shape: str) -> Transformer:
    args = SHAPES[shape]
    model = Transformer(args)
    # std 0.02 everywhere, like the built-in model
    model.load_state_dict(random_state_dict(args, seed=0))
    return model.eval()


def measure(model, tokenizer, users: int, steps: int, params: dict) -> tuple[float, float, float]:
    """Per decode step: model ms, sampler ms, everything else ms (scheduler, stops, outputs)."""
    engine = Engine(model, tokenizer, EngineConfig(max_users=users, max_seq_len=512, prefill_chunk=512))
    gen = torch.Generator().manual_seed(0)
    for i in range(users):
        prompt = torch.randint(0, 128000, (128,), generator=gen).tolist()
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=steps + 100, ignore_eos=True, seed=i, **params))
    while any(not s.prefill_done for s in engine.scheduler.running.values()) or engine.scheduler.waiting:
        engine.step()
    engine.step()  # first all-users decode step (warm-up)
    engine.reset_counters()
    for _ in range(steps):
        engine.step()
    st = engine.stats()
    assert st["decode_steps"] == steps and st["num_running"] == users
    sample = st["sample_s"]
    return 1000 * st["forward_s"] / steps, 1000 * sample / steps, 1000 * (st["other_s"] - sample) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--modes", default=None, help="comma-separated words; run only modes whose name has one")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    t = time.perf_counter()
    model = build(ns.shape)
    tokenizer = load_tokenizer(None)
    print(f"model {ns.shape}: {SHAPES[ns.shape].num_parameters() / 1e6:.1f}M parameters, built in "
          f"{time.perf_counter() - t:.1f} s; {ns.users} users, {ns.steps} decode steps x {ns.repeats} runs, "
          f"{torch.get_num_threads()} threads")
    print("| sampling | model ms/step | sampler ms/step | scheduler+stops ms/step | engine share of step |")
    print("|---|---|---|---|---|")
    for name, params in MODES.items():
        if ns.modes and not any(w.strip() in name for w in ns.modes.split(",")):
            continue
        runs = [measure(model, tokenizer, ns.users, ns.steps, params) for _ in range(ns.repeats)]
        f, smp, rest = (statistics.median(col) for col in zip(*runs))
        share = 100 * (smp + rest) / (f + smp + rest)
        print(f"| {name} | {f:.1f} | {smp:.2f} | {rest:.2f} | {share:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
