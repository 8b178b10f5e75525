"""`llamaserve generate`: one prompt through the engine, text streamed to stdout (or --json)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable

# Errors that mean "bad input", reported as one line instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def add_model_args(parser: argparse.ArgumentParser, max_users: int = 1) -> None:
    """The engine's flags (EngineArgs), for the commands that run the engine in-process."""
    from llamaserve.engine.args import EngineArgs

    EngineArgs.add_cli_args(parser, max_users=max_users)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    g.add_argument("--top-k", type=int, default=0, help="only the K most likely tokens (0 = off, the default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top token's probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits of tokens already seen (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: none)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop on the tokenizer's stop tokens")


def sampling_params(ns: argparse.Namespace):
    from llamaserve.engine.request import SamplingParams

    return SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, min_p=ns.min_p,
        repetition_penalty=ns.repetition_penalty, seed=ns.seed, stop=list(ns.stop), ignore_eos=ns.ignore_eos,
    ).validate()


def build_llm(ns: argparse.Namespace):
    """Load the engine the flags (and CACHE_ROOT / MODEL_WEIGHTS_PATH / MOCK_MODEL) describe into
    an LLM; the built-in model warns on stderr."""
    from llamaserve.engine.args import EngineArgs
    from llamaserve.llm import LLM

    args = EngineArgs.from_cli_args(ns).validate(cli=True)
    # The loader says through logging when it serves the built-in random model; show that.
    logging.basicConfig(level=logging.WARNING, format="llamaserve: %(levelname)s: %(message)s", stream=sys.stderr)
    # Progress of a large load: a bar in a terminal, else lines on stderr (llamaserve.progress).
    return LLM(args=args, progress=True)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text for one prompt",
        description="Generate for one prompt with the engine in this process. Greedy unless "
        "--temperature > 0. Text streams to stdout; --json prints one JSON object instead.",
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat format")
    parser.add_argument("--system", default=None, help="system message (implies --chat)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: prompt_token_ids, token_ids, text, finish_reason, usage")
    add_sampling_args(parser, max_tokens=128)
    add_model_args(parser)
    parser.set_defaults(func=reporting_user_errors("generate", _run))


def reporting_user_errors(command: str, body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that bad input ends in one clear line and exit code 1, not a traceback."""

    def run(ns: argparse.Namespace) -> int:
        try:
            return body(ns)
        except USER_ERRORS as exc:
            print(f"llamaserve {command}: error: {exc}", file=sys.stderr)
            return 1

    return run


def _run(ns: argparse.Namespace) -> int:
    if not ns.prompt:
        # An empty prompt would silently generate from BOS alone.
        raise ValueError('--prompt is empty: give the text to start from, e.g. --prompt "Tell me a joke"')
    params = sampling_params(ns)
    with build_llm(ns) as llm:  # closing stops tensor-parallel ranks, if any
        return _generate(ns, llm, params)


def _generate(ns: argparse.Namespace, llm, params) -> int:
    chat = ns.chat or ns.system is not None
    prompt_ids = llm.encode(ns.prompt, chat=chat, system=ns.system)

    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    text: list[str] = []
    final = None
    for out in llm.stream(prompt_ids, params):
        if first is None and out.new_token_ids:
            first = time.perf_counter() - t0
        ids += out.new_token_ids
        text.append(out.text_delta)
        if not ns.json and out.text_delta:
            sys.stdout.write(out.text_delta)
            sys.stdout.flush()
        if out.finished:
            final = out
    elapsed = time.perf_counter() - t0
    decode_rate = (len(ids) - 1) / (elapsed - first) if first is not None and len(ids) > 1 and elapsed > first else None

    if ns.json:
        print(json.dumps({
            "model": llm.name,
            "builtin_random_model": llm.is_builtin,
            "prompt": ns.prompt,
            "prompt_token_ids": prompt_ids,
            "token_ids": ids,
            "text": "".join(text),
            "finish_reason": final.finish_reason.value,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                      "total_tokens": len(prompt_ids) + len(ids)},
            "time_to_first_token_s": first,
            "decode_tokens_per_s": decode_rate,
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        rate = f", {decode_rate:.1f} tokens/s" if decode_rate else ""
        print(f"[{final.finish_reason.value}: {len(prompt_ids)} prompt + {len(ids)} generated tokens, "
              f"first token {first * 1000:.0f} ms{rate}]", file=sys.stderr)
    return 0
