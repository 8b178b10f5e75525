"""Transparent resume: a request in flight when the engine process is lost continues on the
restarted engine, and its client sees a pause, not an error.

How a request continues: our outputs are deterministic (a greedy request, or a sampled one with a
seed, gives the same tokens in any batch; an unseeded sampled request gets a random seed from the
server, so it is seeded too), so the request is submitted again as it was, from its prompt, and
the replay's first tokens, already sent, are checked against what was sent and not sent again.
Re-running the sent tokens costs one decode step each, but it needs nothing from the engine: the
sampler's random stream, penalties, the stop-string matcher and the detokenizer all reach the
same state by the same path, so the text from there on is the text of an uninterrupted run. A
replay that disagrees with what was sent is failed with an error rather than sent inconsistent.

Poison requests: a request that the engine loses twice is not retried when it was the only one
with two losses among those lost the second time (it is failed alone with an error saying so);
when several share the doubt, they run again one at a time, so the next loss names the culprit.
Nothing is retried after MAX_LOSSES losses, so a crash loop ends.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from llamaserve.engine.request import RequestOutput, SamplingParams
from llamaserve.server.engine_protocol import EngineState
from llamaserve.server.errors import EngineFailed, EngineLost, EngineOverloaded, EngineUnavailable

MAX_LOSSES = 4
RESUME_WAIT_S = 600.0  # longest wait for the restarted engine (a large model loads slowly)


def seeded(params: SamplingParams) -> SamplingParams:
    """The request's params with a seed, so a replay samples the same tokens."""
    if params.seed is None and not params.greedy:
        params.seed = random.SystemRandom().getrandbits(63)
    return params


class ResumeCoordinator:
    """Which requests each engine loss hit, and the one-at-a-time lane of the doubtful ones."""

    def __init__(self) -> None:
        self._lost: OrderedDict[int, list] = OrderedDict()
        self._isolation: asyncio.Lock | None = None

    @property
    def isolation(self) -> asyncio.Lock:
        if self._isolation is None:  # created on the serving loop
            self._isolation = asyncio.Lock()
        return self._isolation

    def lost(self, replay: "Replay", crash: int) -> None:
        self._lost.setdefault(crash, []).append(replay)
        while len(self._lost) > 16:
            self._lost.popitem(last=False)

    def verdict(self, replay: "Replay", crash: int) -> str:
        """'resume', 'isolate' (alone, after the other doubtful ones) or 'fail'."""
        if replay.losses >= MAX_LOSSES:
            return "fail"
        if replay.losses < 2:
            return "resume"
        doubtful = [r for r in self._lost.get(crash, []) if r.losses >= 2]
        return "fail" if len(doubtful) <= 1 else "isolate"


class Replay:
    """The outputs of one request across engine losses: `stream()` yields them as if the engine
    had never been lost. `submit(params)` starts an engine request and returns its stream."""

    def __init__(self, submit: Callable[[], AsyncIterator[RequestOutput]], coordinator: ResumeCoordinator,
                 engine, enabled: bool) -> None:
        self._submit = submit
        self._coordinator = coordinator
        self._engine = engine
        self.enabled = enabled
        self.losses = 0
        self.sent_ids: list[int] = []  # token ids handed to the route
        self._sent_chars = 0
        self._prompt_logprobs_sent = False
        self._in_lane = False  # holds the coordinator's one-at-a-time lane
        # Of the current replay: tokens and text seen so far.
        self._pos = 0
        self._text = ""

    async def stream(self) -> AsyncIterator[RequestOutput]:
        replaying, busy_tries = False, 0
        try:
            while True:
                engine_stream = self._submit()
                try:
                    async for out in engine_stream:
                        if replaying:
                            out = self._after_replay(out)
                            if out is None:
                                continue
                        self._remember(out)
                        yield out
                        if out.finished:
                            return
                    return
                except EngineLost as exc:
                    await self._before_resuming(exc)
                except (EngineOverloaded, EngineUnavailable) as exc:
                    # Resubmitting to a restarted engine that is full again, or lost again
                    # before it took the request: wait and try again, a bounded number of times.
                    if not replaying:
                        raise
                    busy_tries += 1
                    if busy_tries > 100:
                        raise EngineFailed(f"the request could not be resumed: {exc}") from None
                    await asyncio.sleep(0.2)
                    await self._wait_for_engine(exc)
                finally:
                    await engine_stream.aclose()
                replaying, self._pos, self._text = True, 0, ""
        finally:
            if self._in_lane:
                self._in_lane = False
                self._coordinator.isolation.release()

    async def _before_resuming(self, exc: EngineLost) -> None:
        if not self.enabled:
            raise exc
        self.losses += 1
        self._coordinator.lost(self, exc.crash)
        await self._wait_for_engine(exc)
        verdict = self._coordinator.verdict(self, exc.crash)
        if verdict == "fail":
            raise EngineFailed(f"the engine was lost {self.losses} times while running this request "
                               f"({exc}); it is not retried again") from None
        if verdict == "isolate" and not self._in_lane:
            await self._coordinator.isolation.acquire()  # held until this request ends
            self._in_lane = True
            await self._wait_for_engine(exc)

    async def _wait_for_engine(self, exc: Exception) -> None:
        deadline = time.monotonic() + RESUME_WAIT_S
        while not self._engine.ready:
            if self._engine.state in (EngineState.FAILED, EngineState.STOPPED) or time.monotonic() > deadline:
                raise EngineFailed(f"{exc}; the engine did not come back to resume this request") from None
            await asyncio.sleep(0.05)

    def _remember(self, out: RequestOutput) -> None:
        self.sent_ids.extend(out.new_token_ids)
        self._sent_chars += len(out.text_delta)
        if out.prompt_logprobs is not None:
            self._prompt_logprobs_sent = True

    def _after_replay(self, out: RequestOutput) -> RequestOutput | None:
        """The part of a replayed output not sent yet (None: nothing), after checking that the
        replay repeats what was sent."""
        already = max(0, min(len(out.new_token_ids), len(self.sent_ids) - self._pos))
        for i, t in enumerate(out.new_token_ids[:already]):
            if t != self.sent_ids[self._pos + i]:
                raise EngineFailed(f"the request could not be resumed after the engine restarted: its replay "
                                   f"gave token {t} where token {self.sent_ids[self._pos + i]} had been sent")
        self._pos += len(out.new_token_ids)
        self._text += out.text_delta
        text = self._text[self._sent_chars:]
        new_ids = out.new_token_ids[already:]
        logprobs = out.logprobs[already:] if out.logprobs else out.logprobs
        prompt_logprobs = None if self._prompt_logprobs_sent else out.prompt_logprobs
        if not new_ids and not text and not out.finished and not logprobs and prompt_logprobs is None:
            return None
        return replace(out, new_token_ids=new_ids, text_delta=text, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
