"""Request objects shared by the engine, the Python API and the server: plain Python, no torch."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request the engine cannot accept; the message says which parameter and why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class FinishReason(str, enum.Enum):
    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # the engine failed while the request was running


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N >= 0: chosen token's logprob plus top-N alternatives
    # The same for every prompt token after the first (what the model predicted there), as
    # OpenAI's `echo` + `logprobs` and lm-eval's loglikelihood need; None: off.
    prompt_logprobs: int | None = None

    def validate(self) -> "SamplingParams":
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}", param)

        def number(param: str, value: object, integer: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(param, f"must be a number, got {type(value).__name__}")
            if integer and not isinstance(value, int):
                raise bad(param, f"must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise bad(param, f"must be finite, got {value!r}")

        number("max_tokens", self.max_tokens, integer=True)
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            # 0 only makes sense to score a prompt: the request ends when its prompt is read.
            raise bad("max_tokens", f"must be at least 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        number("temperature", self.temperature)
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name))
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None:
            number("seed", self.seed, integer=True)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                number(name, value, integer=True)
                if not 0 <= value <= 20:
                    raise bad(name, f"must be in [0, 20], got {value}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely alternatives


@dataclass
class RequestOutput:
    """What one engine step produced for one request; `finished` marks its last output."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str  # newly decoded text, stop strings and incomplete UTF-8 held back
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    # Only on a request's first output, when asked for: one entry per prompt token, None for
    # the first (nothing predicted it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # set with FinishReason.ERROR
    # Only on a request's first output: seconds from add_request until a step first scheduled it.
    queue_time_s: float | None = None


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound; the caller should back off and retry."""
