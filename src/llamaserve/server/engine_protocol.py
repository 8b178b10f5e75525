"""The messages between the server and its engine process, and the engine's states.

Everything that crosses the two multiprocessing queues is one of these dataclasses (pickled by
the queue); nothing else does. Torch-free: the server process imports it.

  server -> engine   AddRequest, Abort, Shutdown
  engine -> server   Loading      heartbeat while the model loads, with its progress
                     Beat         heartbeat once loaded, from a thread of its own (hang detection)
                     Ready        the engine's EngineInfo (model name, tokenizer, limits)
                     StepOutputs  what one step produced (each RequestOutput carries its request's
                                  queue time on its first output) and the engine's stats after it
                     Idle         stats, as a heartbeat while nothing runs
                     Rejected     a request the engine refused, with a RejectKind
                     Fatal        the model could not be loaded
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.request import RequestOutput, SamplingParams


class EngineState(str, enum.Enum):
    """The server's view of its engine process (str-valued: /status and logs print it)."""

    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"  # lost (died, hung, broke its queue); a new one is starting
    FAILED = "failed"  # could never load the model; the server gives up
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


class RejectKind(str, enum.Enum):
    OVERLOADED = "overloaded"  # the waiting queue is at its bound: retry later
    INVALID = "invalid"  # the request itself is wrong: do not retry


# ---- server -> engine --------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- engine -> server --------------------------------------------------------------------------
@dataclass(frozen=True)
class Loading:
    progress: dict | None = None  # progress.current(): what the load is doing and how far along


@dataclass(frozen=True)
class Beat:
    pass


@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]  # name, format, is_builtin, is_mock, tokenizer_dir, family, max_seq_len, max_users, pid


@dataclass(frozen=True)
class StepOutputs:
    outputs: list[RequestOutput]
    stats: dict[str, Any] = field(default_factory=dict)  # Engine.stats() after the step


@dataclass(frozen=True)
class Idle:
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    request_id: str
    kind: RejectKind
    message: str
    param: str | None = None  # the request field at fault (INVALID)


@dataclass(frozen=True)
class Fatal:
    message: str


ToEngine = AddRequest | Abort | Shutdown
FromEngine = Loading | Beat | Ready | StepOutputs | Idle | Rejected | Fatal
