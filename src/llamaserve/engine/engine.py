"""The engine loop: scheduler.schedule() -> runner (prefill chunks, one decode) -> sampler -> stops.

Drive it with `add_request` / `abort` / `step`; each `step` returns what every request
produced in it (new token ids, text delta, and on the last output the finish reason and usage).

Prompt logprobs (`SamplingParams.prompt_logprobs`): the prefill chunks of such a request ask the
model for the logits of every position, and each chunk's [T, V] logits are reduced to one
TokenLogprob per prompt token before the next chunk runs, so memory stays at one chunk's logits.
The first token is then sampled from the last row of those logits, which may differ in its
last bits from a plain prefill's (the output head sees T rows instead of 1). With max_tokens 0
the request ends once its prompt is read, without sampling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from llamaserve.engine.kv_budget import (DEFAULT_GPU_MEMORY_UTILIZATION, activation_reserve_bytes, cuda_kv_budget_gib,
                                          kv_pool_blocks)
from llamaserve.engine.request import FinishReason, InvalidRequest, QueueFull, RequestOutput, SamplingParams
from llamaserve.engine.runner import ModelRunner
from llamaserve.engine.sampling import Sampler
from llamaserve.engine.scheduler import BLOCK_SIZE, Scheduler, Sequence
from llamaserve.engine.stops import StopChecker

__all__ = ["Engine", "EngineConfig", "InvalidRequest", "QueueFull"]

log = logging.getLogger("llamaserve.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_users: int = 32  # user slots decoding together
    max_seq_len: int = 4096  # prompt + output limit per user (KV cache length)
    prefill_chunk: int = 512  # prompt tokens per prefill call (and the unit of prefix-cache reuse)
    max_prefill_tokens: int | None = None  # prompt tokens one step may prefill (None: one chunk)
    max_queued: int = 256  # waiting requests beyond the slots before QueueFull
    min_decode_rows: int | None = None  # decode batches are padded to this many rows (None: runner's choice)
    kv_cache_memory: float | None = None  # GiB for the KV block pool (None: max_seq_len for every user)
    prefix_cache: bool = True  # reuse the KV blocks of cached prompt prefixes
    # On a GPU without kv_cache_memory: the share of its memory this process may fill (engine/kv_budget.py).
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION


def _model_identity(model) -> bytes:
    """What besides the tokens decides a cached block's numbers: the model's shape and weights'
    dtype and kind (quantised layers change the numbers too)."""
    kinds = sorted({type(m).__name__ for m in model.modules()}) if hasattr(model, "modules") else []
    return repr((type(model).__name__, getattr(model, "args", None), str(getattr(model, "dtype", "")), kinds)).encode()


def _prefill_groups(chunks: list) -> list[list]:
    """The step's prefill chunks as groups that one model call computes together: chunks of one
    length (two tokens or more) of different sequences, none scoring its prompt (that needs
    every position's logits). A sequence's chunks run in order, one per wave (each reads the
    keys the one before wrote); sequences never read what another writes in the same step."""
    waves: list[list] = []
    taken: dict[int, int] = {}
    for chunk in chunks:
        k = taken.get(id(chunk.seq), 0)
        taken[id(chunk.seq)] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(chunk)
    groups: list[list] = []
    for wave in waves:
        by_length: dict[int, list] = {}
        for chunk in wave:
            if _batchable(chunk):
                by_length.setdefault(chunk.end - chunk.start, []).append(chunk)
            else:
                groups.append([chunk])
        groups.extend(by_length.values())
    return groups


def _batchable(chunk) -> bool:
    return chunk.end - chunk.start >= 2 and not chunk.seq.scores_prompt


class Engine:
    def _kv_memory_gib(self, model) -> float | None:
        """The pool's GiB: as configured; on a GPU without a figure, what its memory leaves."""
        cfg = self.config
        device = model.device
        if cfg.kv_cache_memory is not None or device.type != "cuda":
            return cfg.kv_cache_memory
        # The most rows one call takes: a decode step, or one step's prefill chunks in one call.
        widest = max(cfg.max_prefill_tokens or cfg.prefill_chunk, cfg.max_users)
        gib = cuda_kv_budget_gib(device, cfg.gpu_memory_utilization,
                                 activation_reserve_bytes(widest, model.args.vocab_size))
        log.info("KV cache budget: %.2f GiB (gpu_memory_utilization %g)", gib, cfg.gpu_memory_utilization)
        return gib

    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig | None = None,
        detokenizer_factory: Callable[[object], object] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        cfg = self.config
        self.kv_bytes_per_token = model.kv_bytes_per_token() if hasattr(model, "kv_bytes_per_token") else 0
        num_blocks = kv_pool_blocks(self._kv_memory_gib(model), self.kv_bytes_per_token)
        self.scheduler = Scheduler(
            cfg.max_users, cfg.max_seq_len, cfg.prefill_chunk, cfg.max_queued, num_blocks=num_blocks,
            prefix_cache=cfg.prefix_cache, cache_salt=_model_identity(model), max_prefill_tokens=cfg.max_prefill_tokens,
        )
        self.runner = ModelRunner(model, cfg.max_users, self.scheduler.max_seq_len, cfg.min_decode_rows,
                                  num_blocks=self.scheduler.blocks.num_blocks, block_size=self.scheduler.block_size)
        if self.runner.plan.prefill_chunk_invariant:  # known once the runner packed the weights
            self.scheduler.prefill_is_chunk_invariant()
        kv_dtype = model.kv_cache_dtype() if hasattr(model, "kv_cache_dtype") else None
        self.kv_cache_dtype = str(kv_dtype).removeprefix("torch.") if kv_dtype is not None else "none"
        log.info("KV cache: %d blocks of %d positions = %d tokens (%s, %d bytes per token, %.2f GiB)%s",
                 self.scheduler.blocks.num_blocks, self.scheduler.block_size, self.scheduler.pool_tokens,
                 self.kv_cache_dtype, self.kv_bytes_per_token,
                 self.scheduler.pool_tokens * self.kv_bytes_per_token / 2**30,
                 "" if self.scheduler.max_seq_len == cfg.max_seq_len
                 else f"; context limit lowered to the pool: {self.scheduler.max_seq_len} tokens")
        self.vocab_size = self.runner.vocab_size
        cover = getattr(tokenizer, "cover_vocab", None)
        if cover is not None:  # models often pad their vocabulary beyond the tokenizer's
            cover(self.vocab_size)
        self.sampler = Sampler(self.vocab_size, self.runner.device, rows=self.runner.max_users)
        if detokenizer_factory is None:
            from llamaserve.tokenizer import IncrementalDetokenizer

            detokenizer_factory = IncrementalDetokenizer
        self._new_detokenizer = detokenizer_factory
        self._tokenizer_stop_ids = frozenset(getattr(tokenizer, "stop_token_ids", ()) or ())
        self._pending: list[RequestOutput] = []  # aborts to report at the next step
        # Queue time (vLLM's): when each request was added, until a step first schedules it;
        # then its seconds in the queue, until its first output carries them.
        self._arrived: dict[str, float] = {}
        self._queue_time: dict[str, float] = {}
        # Prompt logprobs of requests still reading their prompt (or about to send them).
        self._prompt_logprobs: dict[str, list] = {}
        self._counters = dict(
            steps=0, prefill_tokens=0, decode_tokens=0, finished=0, aborted=0, errors=0,
            forward_s=0.0, sample_s=0.0, other_s=0.0, decode_steps=0, decode_forward_s=0.0,
        )

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        """Queue a request. InvalidRequest for bad parameters or a prompt that cannot fit,
        QueueFull when the waiting queue is at its bound."""
        params = (params or SamplingParams()).validate()
        ids = list(prompt_token_ids)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"prompt token id {t!r} is outside the vocabulary (0..{self.vocab_size - 1})", "prompt")
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise InvalidRequest(f"stop token id {t} is outside the vocabulary (0..{self.vocab_size - 1})", "stop_token_ids")
        self.scheduler.add(Sequence(str(request_id), ids, params))
        self._arrived[str(request_id)] = time.monotonic()

    def abort(self, request_id: str) -> bool:
        """Cancel a request, waiting or running; its slot is free for the next step. Its last
        output (finish reason `abort`) comes out of the next `step`. False if not found."""
        seq = self.scheduler.abort(str(request_id))
        if seq is None:
            return False
        self._arrived.pop(seq.request_id, None)
        self._counters["aborted"] += 1
        self._pending.append(self._final_output(seq, [], "", FinishReason.ABORT))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step: at most a prefill budget of prompt chunks, then one decode of every
        running user. Returns the outputs of every request that produced something."""
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return self._with_queue_times(outputs)
        t0 = time.perf_counter()
        seated_at = time.monotonic()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return self._with_queue_times(outputs)
        if self._arrived:
            for chunk in plan.prefills:
                arrived = self._arrived.pop(chunk.seq.request_id, None)
                if arrived is not None:
                    self._queue_time[chunk.seq.request_id] = seated_at - arrived
        try:
            forward_s = self._run(plan, outputs)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving the rest
            log.exception("engine step failed; the requests of this step end with an error")
            message = f"{type(exc).__name__}: {exc}"
            for seq in [c.seq for c in plan.prefills] + plan.decodes:
                if not seq.is_finished:
                    self.scheduler.finish(seq, FinishReason.ERROR)
                    self._counters["errors"] += 1
                    out = self._final_output(seq, [], "", FinishReason.ERROR)
                    out.error = message
                    outputs.append(out)
            return self._with_queue_times(outputs)
        self._counters["steps"] += 1
        self._counters["forward_s"] += forward_s
        self._counters["other_s"] += time.perf_counter() - t0 - forward_s
        return self._with_queue_times(outputs)

    def _with_queue_times(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Each request's queue time rides on its first output."""
        if self._queue_time:
            for out in outputs:
                out.queue_time_s = self._queue_time.pop(out.request_id, None)
        return outputs

    def _run(self, plan, outputs: list[RequestOutput]) -> float:
        """Model calls, sampling and stops of one planned step; returns the seconds in the model."""
        rows: list[torch.Tensor] = []
        to_sample: list[Sequence] = []
        forward_s = 0.0
        for seq in plan.preempted:
            if not seq.output_token_ids:
                self._prompt_logprobs.pop(seq.request_id, None)  # scored again from the start
        for group in _prefill_groups(plan.prefills):
            for chunk in group:
                self.runner.assign(chunk.seq.slot, chunk.seq.block_ids)
            tf = time.perf_counter()
            group_logits = self._prefill(group)
            forward_s += time.perf_counter() - tf
            for chunk, logits in zip(group, group_logits):
                seq = chunk.seq
                seq.num_prefilled = chunk.end
                self._counters["prefill_tokens"] += chunk.end - chunk.start
                if chunk.is_last and not seq.output_token_ids:  # (a resumed one replays its tokens)
                    if seq.params.max_tokens == 0:
                        self.scheduler.finish(seq, FinishReason.LENGTH)
                        self._counters["finished"] += 1
                        outputs.append(self._final_output(seq, [], "", FinishReason.LENGTH))
                        continue
                    self._start(seq)
                    rows.append(logits)
                    to_sample.append(seq)
        if plan.decodes:
            for seq in plan.decodes:
                self.runner.assign(seq.slot, seq.block_ids)
            tf = time.perf_counter()
            logits = self.runner.decode(
                [s.slot for s in plan.decodes],
                [s.token_at(s.decode_position) for s in plan.decodes],
                [s.decode_position for s in plan.decodes],
            )
            dt = time.perf_counter() - tf
            forward_s += dt
            self._counters["decode_steps"] += 1
            self._counters["decode_forward_s"] += dt
            # Replaying rows (after a preemption) come last; their next token is known.
            sampling = [s for s in plan.decodes if not s.replaying]
            if sampling:
                rows.append(logits if len(sampling) == len(plan.decodes) else logits[: len(sampling)])
                to_sample.extend(sampling)

        if to_sample:
            ts = time.perf_counter()
            logits = rows[0] if len(rows) == 1 else torch.cat(rows)
            token_ids, logprobs = self.sampler.sample(logits, [s.sampling_state for s in to_sample])
            self._counters["sample_s"] += time.perf_counter() - ts
            self._counters["decode_tokens"] += len(token_ids)
            for i, (seq, tok) in enumerate(zip(to_sample, token_ids)):
                outputs.append(self._advance(seq, tok, logprobs[i] if logprobs else None))
        return forward_s

    def _prefill(self, group: list) -> list[torch.Tensor]:
        """Logits [1, V] of each chunk's last token: one call for the whole group."""
        if len(group) > 1:
            logits = self.runner.prefill_many([c.seq.slot for c in group],
                                              [c.seq.prompt_token_ids[c.start : c.end] for c in group],
                                              [c.start for c in group])
            return [logits[i : i + 1] for i in range(len(group))]
        chunk = group[0]
        seq = chunk.seq
        if not seq.scores_prompt:
            return [self.runner.prefill(seq.slot, seq.prompt_token_ids[chunk.start : chunk.end], chunk.start)]
        return [self._prefill_scoring(seq, chunk)]

    def _prefill_scoring(self, seq: Sequence, chunk) -> torch.Tensor:
        """A prefill chunk that also scores its prompt tokens; returns the last row's logits [1, V]."""
        ids = seq.prompt_token_ids[chunk.start : chunk.end]
        every = self.runner.prefill(seq.slot, ids, chunk.start, all_logits=True)  # [T, V]
        # Nothing predicts the first prompt token.
        scored = self._prompt_logprobs.setdefault(seq.request_id, [None])
        # Row j predicts the prompt token at chunk.start + j + 1 (the last row of the last chunk
        # predicts the first output token, which is sampled instead).
        predicted = seq.prompt_token_ids[chunk.start + 1 : chunk.end + 1]
        scored += self.sampler.prompt_logprobs(every, predicted, seq.params.prompt_logprobs)
        # A copy, so the chunk's [T, V] logits are freed now rather than after sampling.
        return every[-1:].clone(memory_format=torch.contiguous_format)

    def _start(self, seq: Sequence) -> None:
        """State needed once a request produces tokens: sampler stream, penalties, stops."""
        seq.sampling_state = self.sampler.start(seq.params, seq.prompt_token_ids)
        seq.stop_state = StopChecker(
            self._new_detokenizer(self.tokenizer),
            seq.params,
            self._tokenizer_stop_ids,
            seq.prompt_len,
            self.scheduler.max_seq_len,
        )

    def _advance(self, seq: Sequence, token_id: int, logprob) -> RequestOutput:
        seq.output_token_ids.append(token_id)
        delta, reason = seq.stop_state.append(token_id)
        lp = [logprob] if logprob is not None else None
        if reason is None:
            return RequestOutput(
                seq.request_id, [token_id], delta,
                prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_token_ids), logprobs=lp,
                prompt_logprobs=self._prompt_logprobs.pop(seq.request_id, None),
            )
        self.scheduler.finish(seq, reason)
        self._counters["finished"] += 1
        return self._final_output(seq, [token_id], delta, reason, lp)

    def _final_output(self, seq: Sequence, new_ids, delta, reason, logprobs=None) -> RequestOutput:
        return RequestOutput(
            seq.request_id, new_ids, delta, finished=True, finish_reason=reason,
            prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_token_ids), logprobs=logprobs,
            prompt_logprobs=self._prompt_logprobs.pop(seq.request_id, None),
        )

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        out = dict(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_slots=s.num_free_slots,
            cache_usage=s.cache_usage(),
            kv_blocks=s.blocks.num_blocks,
            kv_blocks_free=s.blocks.num_free,
            kv_block_size=s.block_size,
            kv_tokens=s.pool_tokens,
            kv_bytes_per_token=self.kv_bytes_per_token,
            kv_cache_dtype=self.kv_cache_dtype,
            **asdict(self.config),
        )
        out["max_seq_len"] = s.max_seq_len
        out.update(s.counters)
        out.update(self._counters)
        return out

    def reset_counters(self) -> None:
        for k, v in self._counters.items():
            self._counters[k] = type(v)()
