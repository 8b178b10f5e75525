"""Shared helpers for the engine tests: a tiny random Llama, a byte tokenizer, a scripted model."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from llamaserve.config import ModelArgs
from llamaserve.engine.engine import Engine, EngineConfig
from llamaserve.model.llama import Transformer
from llamaserve.tokenizer.base import Tokenizer
from llamaserve.weights.builtin import random_state_dict

TINY_VOCAB = 512
BOS, EOS = 256, 257


def tiny_args(vocab_size: int = TINY_VOCAB) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32)


def tiny_model(vocab_size: int = TINY_VOCAB, seed: int = 0, std: float = 0.5) -> Transformer:
    """A random Llama whose logits are peaked enough (std 0.5) for sampling tests to mean something."""
    args = tiny_args(vocab_size)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed, std))
    return model.eval()


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are single bytes (so multi-byte UTF-8 characters can be split across tokens),
    256 BOS, 257 EOS, 258.. two-letter pieces, the last three the Llama 3 chat tokens."""

    family = "fake"
    chat_template = "llama3"

    def __init__(self, vocab_size: int = TINY_VOCAB) -> None:
        self.path = Path("<byte tokenizer>")
        self.bos_id, self.eos_id = BOS, EOS
        self.vocab_size = vocab_size
        table = [bytes([i]) for i in range(256)] + [b"", b""]
        k = 0
        while len(table) < vocab_size - 3:
            table.append(bytes([97 + k % 26, 97 + (k // 26) % 26]))
            k += 1
        # The last three ids are the Llama 3 chat tokens, so the chat format works too.
        chat = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        table += [name.encode() for name in chat]
        self._token_bytes = table
        self.special_tokens = {"<bos>": BOS, "<eos>": EOS} | {n: vocab_size - 3 + i for i, n in enumerate(chat)}
        self.stop_token_ids = frozenset({EOS, vocab_size - 1})

    def _encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def make_engine(model=None, tokenizer=None, **config) -> Engine:
    config.setdefault("max_seq_len", 256)
    config.setdefault("prefill_chunk", 16)
    return Engine(model if model is not None else tiny_model(), tokenizer or ByteTokenizer(), EngineConfig(**config))


def random_tokens(n: int, seed: int) -> list[int]:
    """n byte tokens (ids 0-255) drawn from a seeded generator."""
    rng = random.Random(seed)
    return [rng.randrange(0, 256) for _ in range(n)]


def run_in_turn(model, prompts: list[list[int]], params, **config) -> tuple[dict[str, dict], Engine]:
    """Each prompt (request r0, r1, ...) runs on one engine after the previous one finished, so
    a later one finds the earlier ones' prompts in the prefix cache; returns (results, engine)."""
    engine = make_engine(model, **config)
    results = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
        results.update(run_to_completion(engine))
    return results, engine


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> dict[str, dict]:
    """Step until idle; per request: token ids, text, finish reason, usage, logprobs."""
    results: dict[str, dict] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            r = results.setdefault(out.request_id, {"token_ids": [], "text": "", "logprobs": []})
            r["token_ids"] += out.new_token_ids
            r["text"] += out.text_delta
            if out.logprobs:
                r["logprobs"] += out.logprobs
            if out.finished:
                r["finish_reason"] = out.finish_reason
                r["usage"] = (out.prompt_tokens, out.completion_tokens)
    else:
        raise AssertionError("engine did not finish")
    return results


class _NoCache:
    def __init__(self, n_slots: int, max_seq_len: int, num_blocks=None, block_size=16) -> None:
        from llamaserve.model.kv_cache import BlockTables

        self.n_slots, self.max_seq_len = n_slots, max_seq_len
        self.tables = BlockTables(n_slots, max_seq_len, block_size, "cpu", identity=num_blocks is None)


class ScriptedModel(torch.nn.Module):
    """Model interface that emits a fixed script: after a prompt of `prompt_len` tokens, the
    k-th generated token is script[k] (then EOS). Lets a test decide exactly which tokens come."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = TINY_VOCAB) -> None:
        super().__init__()
        self.args = tiny_args(vocab_size)
        self.script = list(script)
        self.prompt_len = prompt_len
        self.register_buffer("anchor", torch.zeros(1), persistent=False)

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return torch.float32

    def new_cache(self, n_slots: int, max_seq_len: int, num_blocks=None, block_size=16) -> _NoCache:
        return _NoCache(n_slots, max_seq_len, num_blocks, block_size)

    def prepare_for_serving(self):
        from llamaserve.model.serving import ServingPlan

        return ServingPlan()  # nothing to pack, no linear layers

    def forward(self, tokens, start_pos, slots, cache, all_logits=False):
        bsz, seqlen = tokens.shape
        logits = torch.zeros(bsz, self.args.vocab_size)
        for b, start in enumerate(start_pos.tolist()):
            k = start + seqlen - self.prompt_len  # index of the token this row predicts
            tok = self.script[k] if 0 <= k < len(self.script) else EOS
            logits[b, tok] = 10.0
        return logits


def piece(text: str, tokenizer: ByteTokenizer | None = None) -> int:
    """Id of a two-letter piece of ByteTokenizer."""
    table = (tokenizer or ByteTokenizer())._token_bytes
    return table.index(text.encode(), 258)


def one_thread():
    """Generator for a module-scoped fixture: tiny models run fastest on one thread, and the
    shared CPU makes multi-threaded tiny ops stall for whole scheduler slices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
