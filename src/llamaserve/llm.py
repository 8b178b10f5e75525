"""Python API for scripts: `LLM(model=...).generate(prompts, params)`.

    from llamaserve import llm
    model = llm.LLM("builtin")                      # or a checkpoint directory
    outs = model.generate(["The capital of France is"], llm.SamplingParams(max_tokens=16, temperature=0))
    print(outs[0].text)
    outs = model.chat([[{"role": "user", "content": "Hello!"}]])

Everything runs through the same `Engine` as the server: the prompts share the user slots with
continuous batching, and a seeded or greedy request gives the same tokens however many others
run with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamaserve.devices import dtype_name, resolve_device, resolve_dtype
from llamaserve.engine.args import EngineArgs
from llamaserve.engine.request import QueueFull, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "SamplingParams", "resolve_device", "resolve_dtype"]

log = logging.getLogger("llamaserve.llm")

Prompt = str | Sequence[int] | Sequence[Mapping]  # text, token ids, or a chat dialog


@dataclass
class CompletionOutput:
    index: int  # position in the generate() call
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None
    # Seconds since the request was submitted: first token, and every token.
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        p, c = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _engine_args(model, args: EngineArgs | None, kwargs: dict) -> EngineArgs:
    """LLM's keyword arguments (vLLM's style) over `args`; torch objects become their names."""
    if isinstance(kwargs.get("dtype"), torch.dtype):
        kwargs["dtype"] = dtype_name(kwargs["dtype"])
    for name in ("dtype", "device"):
        if name in kwargs and kwargs[name] is None:
            kwargs[name] = "auto"
    for name in ("device", "cache_root"):
        if kwargs.get(name) is not None:
            kwargs[name] = str(kwargs[name])
    if isinstance(model, (str, Path)):
        kwargs["model"] = None if str(model) == "builtin" else str(model)
    return (args or EngineArgs()).replace(**kwargs)


class LLM:
    def __init__(self, model=None, *, tokenizer=None, progress: bool = True, args: EngineArgs | None = None,
                 **engine_args) -> None:
        """model: None or "builtin" (random built-in weights, gibberish output), a checkpoint
        directory (Meta, repacked or Hugging Face), or an already-built model object with the
        Transformer forward interface (then pass `tokenizer`). tokenizer: None (the checkpoint's,
        else the Llama 3 one), a path, or a Tokenizer object.
        args: an EngineArgs; keyword arguments are its fields and override it: dtype, device,
        max_users, max_seq_len, prefill_chunk, max_queued, min_decode_rows, quantize ("int8"
        weight-only), cache_root (converted-weight cache), mock, tensor_parallel (N ranks: this
        process is rank 0 and starts the others; under torchrun the job's ranks, and on ranks
        other than 0 this constructor follows rank 0 and then exits the process)."""
        from llamaserve.engine.build import build_engine

        module = model if isinstance(model, torch.nn.Module) else None
        self.args = _engine_args(None if module is not None else model, args, engine_args).validate()
        if module is not None and self.args.tensor_parallel > 1:
            raise ValueError(
                f"tensor_parallel={self.args.tensor_parallel} needs a checkpoint to split: "
                "pass a directory or 'builtin', not a model object"
            )
        built = build_engine(self.args, model=module, tokenizer=tokenizer, progress=progress)
        self.model, self.tokenizer, self.engine = built.model, built.tokenizer, built.engine
        self.name = built.info["name"]
        self.is_builtin = built.info["is_builtin"]
        self.config = self.engine.config
        self._next_id = 0

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (a single-process model has nothing to stop)."""
        close = getattr(self.model, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of one prompt: text (with BOS), ids as given, or a dialog in the chat format."""
        if isinstance(prompt, str):
            if not chat:
                return self.tokenizer.encode(prompt, bos=True)
            prompt = [{"role": "user", "content": prompt}]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        messages = list(prompt)
        if system is not None and not (messages and _role(messages[0]) == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return self.tokenizer.encode_chat(messages)

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], (str, Sequence)):
            return [prompts]  # one prompt: token ids or one dialog
        return list(prompts)

    # ---- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
        system: str | None = None,
        use_tqdm: bool = False,
    ) -> list[CompletionOutput]:
        """Generate for every prompt (texts, token-id lists or chat dialogs); outputs in order.
        `chat=True` wraps text prompts as one user turn in the model's chat format."""
        items = self._as_list(prompts)
        ids = [self.encode(p, chat=chat, system=system) for p in items]
        return self.generate_ids(ids, params, use_tqdm=use_tqdm)

    def chat(self, dialogs, params=None, *, system: str | None = None, use_tqdm: bool = False) -> list[CompletionOutput]:
        """generate() for chat dialogs (lists of {role, content}) or user messages."""
        return self.generate(dialogs, params, chat=True, system=system, use_tqdm=use_tqdm)

    def generate_ids(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_output: Callable[[int, RequestOutput, CompletionOutput], None] | None = None,
        use_tqdm: bool = False,
    ) -> list[CompletionOutput]:
        """The core loop: keeps the engine's slots full (submitting more requests as others
        finish) until every prompt is done. `on_output(index, output, completion)` is called
        after every engine output, e.g. to stream or record results as they finish."""
        n = len(prompt_token_ids)
        if isinstance(params, SamplingParams) or params is None:
            plist = [params or SamplingParams()] * n
        else:
            plist = list(params)
            if len(plist) != n:
                raise ValueError(f"got {len(plist)} SamplingParams for {n} prompts")
        for p in plist:
            p.validate()
        batch = _Batch([CompletionOutput(i, list(ids)) for i, ids in enumerate(prompt_token_ids)], plist)
        bar = None
        if use_tqdm:
            from llamaserve.progress import Progress

            # A bar in a terminal, else a line every few seconds with the live token rate.
            bar = Progress("generating", n, "requests")
        t_start, n_tokens = time.perf_counter(), 0
        try:
            while batch.done < n:
                batch.submit_more(self)  # up to what the engine accepts; the rest waits here
                outputs = self.engine.step()
                now = time.perf_counter()
                if bar is not None:
                    n_tokens += sum(len(out.new_token_ids) for out in outputs)
                    bar.update(0, count=0, detail=f"{batch.pending - batch.done} running, {n_tokens} tokens, "
                               f"{n_tokens / max(now - t_start, 1e-9):.1f} tokens/s")
                for out in outputs:
                    i = batch.record(out, now)
                    if i is None:
                        continue
                    if out.finished and bar is not None:
                        bar.update(1)
                    if on_output is not None:
                        on_output(i, out, batch.results[i])
        except BaseException:
            for rid in list(batch.by_id):
                self.engine.abort(rid)
            self.engine.step()  # collect the aborts so the engine is clean for the next call
            raise
        finally:
            if bar is not None:
                bar.close()
        return batch.results

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False, system: str | None = None
    ) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding each engine output (new tokens and text delta)."""
        ids = self.encode(prompt, chat=chat, system=system)
        rid = f"llm-{self._next_id}"
        self._next_id += 1
        self.engine.add_request(rid, ids, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)
                self.engine.step()


class _Batch:
    """generate_ids' bookkeeping: which engine request is which prompt, and their results."""

    def __init__(self, results: list[CompletionOutput], params: list[SamplingParams]) -> None:
        self.results = results
        self.params = params
        self.by_id: dict[str, int] = {}  # engine request id -> prompt index, while running
        self.text: dict[str, list[str]] = {}
        self.submitted_at: dict[str, float] = {}
        self.pending = 0  # prompts submitted so far
        self.done = 0

    def submit_more(self, llm: "LLM") -> None:
        while self.pending < len(self.results):
            rid = f"llm-{llm._next_id}"
            try:
                llm.engine.add_request(rid, self.results[self.pending].prompt_token_ids, self.params[self.pending])
            except QueueFull:
                return
            llm._next_id += 1
            self.by_id[rid] = self.pending
            self.text[rid] = []
            self.submitted_at[rid] = time.perf_counter()
            self.pending += 1

    def record(self, out: RequestOutput, now: float) -> int | None:
        """Add an engine output to its prompt's result; returns the prompt's index (None: not ours)."""
        i = self.by_id.get(out.request_id)
        if i is None:
            return None
        res = self.results[i]
        if out.new_token_ids:
            elapsed = now - self.submitted_at[out.request_id]
            if res.first_token_s is None:
                res.first_token_s = elapsed
            res.token_times_s.extend([elapsed] * len(out.new_token_ids))
        res.token_ids.extend(out.new_token_ids)
        self.text[out.request_id].append(out.text_delta)
        if out.logprobs:
            res.logprobs = (res.logprobs or []) + out.logprobs
        if out.finished:
            res.text = "".join(self.text.pop(out.request_id))
            res.finish_reason = out.finish_reason.value if out.finish_reason else None
            self.by_id.pop(out.request_id)
            self.done += 1
        return i


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, Mapping) else getattr(message, "role", None)
