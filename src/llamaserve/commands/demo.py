"""`llamaserve demo` and `llamaserve demo-alpaca`: the original's demo scripts, on our engine.

demo: 32 prompts (chat or plain text, or a JSON file) decoded together; prints each user's
output and a performance summary (time to first token, tokens/s/user, tokens/s).
demo-alpaca: instructions (AlpacaEval when the `datasets` library has it cached, otherwise the
set shipped with the package) in batches of 32 users, slots kept full as users finish; each
answer is appended to demo_user_output_{timestamp}.txt as
    batch: B user: U
    prompt: ...
    output: ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from llamaserve.clients.instructions import (  # noqa: F401 - demo.<name> is part of the command's surface
    alpaca_eval_instructions,
    load_instructions,
    read_json_list,
    shipped_instructions,
)
from llamaserve.commands.generate import add_model_args, build_llm, reporting_user_errors

# The original demo's sampling setting.
SAMPLING = dict(temperature=1.0, top_k=10, top_p=0.9)

CHAT_PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Explain how a rainbow forms.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning to cook.",
    "What is the difference between a list and a set in Python?",
    "Tell me a short story about a brave mouse.",
    "How do airplanes stay in the air?",
    "Suggest a name for a coffee shop by the sea.",
    "Why is exercise good for the brain?",
    "Explain photosynthesis in two sentences.",
    "What are the three states of matter?",
    "Write a limerick about a cat who loves rain.",
    "How do I make a good first impression at a new job?",
    "What is machine learning, in simple words?",
    "Describe the taste of chocolate to an alien.",
    "What causes earthquakes?",
    "Give me a packing list for a beach holiday.",
    "Translate 'good morning, friends' into Italian.",
    "What is the tallest mountain in the world?",
    "How can I save money on groceries?",
    "Write a two-line poem about the moon.",
    "Explain what a black hole is to a child.",
    "What are some good habits for a productive morning?",
    "Who invented the telephone?",
    "How does the internet work, briefly?",
    "Recommend three classic books and say why.",
    "What is the boiling point of water at sea level?",
    "Give me a fun fact about octopuses.",
    "How do I start a vegetable garden on a balcony?",
    "What is the difference between weather and climate?",
    "Write a short thank-you note to a teacher.",
    "Why do we dream?",
)

TEXT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the mountains,",
    "The three most important inventions of the twentieth century are",
    "def fibonacci(n):\n    ",
    "A recipe for pancakes: first,",
    "The quick brown fox",
    "In physics, energy is defined as",
    "My favourite season is autumn because",
    "The history of the printing press begins",
    "To be or not to be,",
    "The best way to learn a new language is",
    "Dear diary, today I",
    "The largest ocean on Earth is",
    "Photosynthesis is the process by which",
    "Ten tips for better sleep: 1.",
    "The city at night was",
    "import numpy as np\n# compute the mean of an array\n",
    "Breaking news: scientists have discovered",
    "The rules of chess are simple:",
    "A haiku about the sea:\n",
    "Water boils at",
    "The French Revolution began in",
    "Here is a short poem about friendship:\n",
    "The main difference between cats and dogs is",
    "SELECT name, email FROM users WHERE",
    "The human heart has four chambers:",
    "Mount Everest is located",
    "The recipe calls for two cups of flour,",
    "In the year 2050, cities will",
    "The speed of light is approximately",
    "Good morning! Today's weather forecast",
    "The moral of the story is",
)


# ---- shared ------------------------------------------------------------------------------------
def _decoding_params(ns: argparse.Namespace):
    from llamaserve.engine.request import SamplingParams

    extra = SAMPLING if ns.decoding == "sampling" else dict(temperature=0.0)
    return SamplingParams(max_tokens=ns.max_tokens, seed=ns.seed, ignore_eos=ns.ignore_eos, **extra).validate()


def _add_common(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--decoding", choices=["greedy", "sampling"], default="greedy",
                        help="greedy, or sampling with top-k 10, top-p 0.9, temperature 1.0 (as the original)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per user at most (default {max_tokens})")
    parser.add_argument("--seed", type=int, default=None, help="seed for --decoding sampling (every user gets it)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    add_model_args(parser, max_users=32)


def summarize(results, wall_s: float) -> dict:
    """Latency and throughput of finished CompletionOutputs (timestamps since submission)."""
    ttft = [r.first_token_s for r in results if r.first_token_s is not None]
    itl = []
    decode_tokens = 0
    firsts, lasts = [], []
    for r in results:
        n = len(r.token_times_s)
        if n:
            firsts.append(r.first_token_s)
            lasts.append(r.token_times_s[-1])
        if n > 1 and r.token_times_s[-1] > r.first_token_s:
            itl.append((r.token_times_s[-1] - r.first_token_s) / (n - 1))
            decode_tokens += n - 1
    total_tokens = sum(len(r.token_ids) for r in results)
    decode_span = (max(lasts) - min(firsts)) if firsts else 0.0
    mean_itl = statistics.fmean(itl) if itl else None
    e2e_user = [len(r.token_ids) / r.token_times_s[-1] for r in results if r.token_times_s and r.token_times_s[-1] > 0]
    return {
        "users": len(results),
        "generated_tokens": total_tokens,
        "wall_s": wall_s,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_max_s": max(ttft) if ttft else None,
        "decode_itl_mean_s": mean_itl,
        "decode_tokens_per_s_per_user": 1.0 / mean_itl if mean_itl else None,
        "decode_tokens_per_s": decode_tokens / decode_span if decode_span > 0 else None,
        "e2e_tokens_per_s_per_user": statistics.fmean(e2e_user) if e2e_user else None,
        "e2e_tokens_per_s": total_tokens / wall_s if wall_s > 0 else None,
    }


def _fmt(v, scale=1.0, unit="", digits=1) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}{unit}"


def print_summary(s: dict, stats: dict, title: str, out=None) -> None:
    out = out or sys.stdout
    print(f"\n=== {title} ===", file=out)
    print(f"users: {s['users']}, generated tokens: {s['generated_tokens']}, wall time: {s['wall_s']:.2f} s", file=out)
    print(f"time to first token: mean {_fmt(s['ttft_mean_s'], 1000, ' ms', 0)}, "
          f"median {_fmt(s['ttft_median_s'], 1000, ' ms', 0)}, max {_fmt(s['ttft_max_s'], 1000, ' ms', 0)}", file=out)
    print(f"decode: {_fmt(s['decode_tokens_per_s_per_user'])} tokens/s/user "
          f"(inter-token latency {_fmt(s['decode_itl_mean_s'], 1000, ' ms')}), "
          f"{_fmt(s['decode_tokens_per_s'])} tokens/s", file=out)
    print(f"end to end: {_fmt(s['e2e_tokens_per_s_per_user'])} tokens/s/user, "
          f"{_fmt(s['e2e_tokens_per_s'])} tokens/s", file=out)
    step_s = stats["forward_s"] + stats["other_s"]
    if step_s > 0:
        print(f"engine: {stats['steps']} steps, {100 * stats['forward_s'] / step_s:.1f}% of step time in the model, "
              f"{100 * stats['other_s'] / step_s:.1f}% scheduling, sampling and stops", file=out)


# ---- demo --------------------------------------------------------------------------------------
def load_prompt_file(path: str) -> list:
    """A JSON list; each item a string, a dialog (list of {role, content}), or an object with
    "prompt" (text) or "messages" (dialog)."""
    data = read_json_list("--prompts", path, "prompts")
    items = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and "messages" in item:
            item = item["messages"]
        elif isinstance(item, dict) and "prompt" in item:
            item = item["prompt"]
        if not (isinstance(item, str) and item) and not (isinstance(item, list) and item and all(isinstance(m, dict) for m in item)):
            raise ValueError(f"--prompts {path}: item {i} is neither a prompt string nor a list of chat messages")
        items.append(item)
    return items


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="32 users decoding together: each user's output and tokens/s",
        description="Run a batch of prompts through the engine in this process and report time to "
        "first token, tokens/s/user and tokens/s for the decode phase and end to end.",
    )
    demo.add_argument("--prompts", default="chat", metavar="chat|text|FILE",
                      help="built-in chat prompts (default), built-in plain-text prompts, or a JSON file "
                      "(list of strings, dialogs, or {prompt}/{messages} objects)")
    demo.add_argument("--chat", action="store_true", help="treat plain strings of a prompts FILE as user turns")
    demo.add_argument("--num-prompts", type=int, default=32, help="users to run (prompts repeat if fewer; default 32)")
    _add_common(demo, max_tokens=128)
    demo.set_defaults(func=reporting_user_errors("demo", _run_demo))

    alpaca = subparsers.add_parser(
        "demo-alpaca",
        help="AlpacaEval instructions through the engine, answers appended to demo_user_output_*.txt",
        description="Instructions in batches of --max-users (800 = 25 batches of 32 by default) through "
        "the engine, keeping every slot busy; answers are appended to "
        "OUTPUT_DIR/demo_user_output_{timestamp}.txt as 'batch: B user: U / prompt: ... / output: ...'.",
    )
    alpaca.add_argument("--output-dir", default=".", help="where the output file goes (default: current directory)")
    alpaca.add_argument("--limit", type=int, default=800, help="number of instructions (default 800)")
    alpaca.add_argument("--instructions", default=None, metavar="FILE",
                        help="JSON list of instruction strings (default: AlpacaEval if cached, else the shipped set)")
    _add_common(alpaca, max_tokens=128)
    alpaca.set_defaults(func=reporting_user_errors("demo-alpaca", _run_alpaca))


def _run_demo(ns: argparse.Namespace) -> int:
    if ns.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {ns.num_prompts}")
    params = _decoding_params(ns)
    if ns.prompts == "chat":
        items, chat = list(CHAT_PROMPTS), True
    elif ns.prompts == "text":
        items, chat = list(TEXT_PROMPTS), False
    else:
        items, chat = load_prompt_file(ns.prompts), ns.chat
    items = [items[i % len(items)] for i in range(ns.num_prompts)]
    with build_llm(ns) as llm:
        return _demo(ns, llm, items, chat, params)


def _demo(ns, llm, items, chat, params) -> int:
    prompt_ids = [llm.encode(p, chat=chat) for p in items]

    llm.engine.reset_counters()
    t0 = time.perf_counter()
    # A bar in a terminal, else a line every few seconds with the live tokens/s (stderr).
    results = llm.generate_ids(prompt_ids, params, use_tqdm=True)
    wall = time.perf_counter() - t0

    for i, (item, r) in enumerate(zip(items, results)):
        shown = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
        print(f"--- user {i} ({len(r.prompt_token_ids)} prompt tokens, {len(r.token_ids)} generated, {r.finish_reason}) ---")
        print(f"prompt: {shown}")
        print(f"output: {r.text}")
    title = (f"{len(results)} users, {ns.decoding}, max {ns.max_tokens} tokens, model {llm.name}"
             + (" (built-in random weights: gibberish by construction)" if llm.is_builtin else ""))
    print_summary(summarize(results, wall), llm.engine.stats(), title)
    return 0


# ---- demo-alpaca -------------------------------------------------------------------------------
def _run_alpaca(ns: argparse.Namespace) -> int:
    if ns.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {ns.limit}")
    params = _decoding_params(ns)
    pool, source = load_instructions(ns.instructions)
    # Fewer instructions than asked for: go round again, as 800 from a shorter set.
    instructions = [pool[i % len(pool)] for i in range(ns.limit)]
    out_dir = Path(ns.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"demo_user_output_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.txt"
    print(f"instructions: {len(instructions)} from {source}", file=sys.stderr)

    with build_llm(ns) as llm:
        return _alpaca(ns, llm, instructions, out_path, params)


def _alpaca(ns, llm, instructions, out_path, params) -> int:
    batch = ns.max_users
    prompt_ids = [llm.encode(text, chat=True) for text in instructions]

    with out_path.open("a", encoding="utf-8") as f:
        def record(i, out, res):
            if out.finished:
                f.write(f"batch: {i // batch} user: {i % batch}\nprompt: {instructions[i]}\noutput: {res.text}\n\n")
                f.flush()

        llm.engine.reset_counters()
        t0 = time.perf_counter()
        results = llm.generate_ids(prompt_ids, params, on_output=record, use_tqdm=True)
        wall = time.perf_counter() - t0

    title = (f"demo-alpaca: {len(results)} instructions in batches of {batch}, {ns.decoding}, model {llm.name}"
             + (" (built-in random weights: gibberish by construction)" if llm.is_builtin else ""))
    print_summary(summarize(results, wall), llm.engine.stats(), title)
    print(f"answers appended to {out_path}")
    return 0
