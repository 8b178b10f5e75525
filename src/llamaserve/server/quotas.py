"""Per-team quotas and usage, the team being the `team_id` claim of the request's token.

The quota file (`--quota-config`, JSON) gives limits per team, a team's entry overriding the
`default` entry field by field; a limit left out (or null) is no limit:

    {"default": {"requests_per_minute": 600, "tokens_per_minute": 200000,
                 "concurrent_requests": 32, "max_tokens": 2048},
     "teams": {"batch-jobs": {"requests_per_minute": 60, "concurrent_requests": 4}}}

Windows are the last 60 seconds. Tokens are prompt plus generated tokens, counted as they are
read and produced, so a team may pass its token limit by the one request that crossed it; the
next is refused until enough of the window's tokens are older than a minute. The file is read
again on SIGHUP and when its modification time changes; a file that does not parse keeps the
limits in force and is logged. Usage (requests, prompt and generated tokens, refusals) is kept
per team whether or not a quota file is given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("llamaserve.quotas")
WINDOW_S = 60.0
LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests", "max_tokens")
NO_TEAM = "-"  # requests without a token (--no-auth) or without a team_id claim
MAX_FILE_BYTES = 1 << 20


class QuotaExceeded(Exception):
    """Over a team limit: `limit` names it; retry_after is None when waiting cannot help."""

    def __init__(self, limit: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after
        self.param = limit if retry_after is None else None  # a request field at fault (max_tokens)

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after or 1)))


def _limits(entry: object, where: str) -> dict[str, int | None]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object of limits")
    unknown = set(entry) - set(LIMITS)
    if unknown:
        raise ValueError(f"{where}: unknown limit(s) {', '.join(sorted(unknown))}; known: {', '.join(LIMITS)}")
    out = {}
    for name, value in entry.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}.{name} must be a positive integer or null, got {json.dumps(value)}")
        out[name] = value
    return out


def parse_quota_config(text: str) -> tuple[dict, dict[str, dict]]:
    """(default limits, {team: limits}); ValueError with a one-line reason."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"default", "teams"}:
        raise ValueError('must be an object with "default" and/or "teams"')
    default = _limits(data.get("default", {}), "default")
    teams = data.get("teams", {})
    if not isinstance(teams, dict):
        raise ValueError('"teams" must be an object of team id -> limits')
    return default, {str(t): _limits(v, f"teams.{t}") for t, v in teams.items()}


def read_quota_file(path: str) -> str:
    """Regular files only, bounded: a FIFO or /dev/zero here must not hang or fill the server."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("is not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"is larger than {MAX_FILE_BYTES} bytes")
    return data.decode("utf-8")


@dataclass
class TeamUsage:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    rejected: int = 0
    in_flight: int = 0
    request_times: deque = field(default_factory=deque)
    token_events: deque = field(default_factory=deque)  # (time, tokens)
    window_tokens: int = 0

    def expire(self, now: float) -> None:
        while self.request_times and self.request_times[0] <= now - WINDOW_S:
            self.request_times.popleft()
        while self.token_events and self.token_events[0][0] <= now - WINDOW_S:
            self.window_tokens -= self.token_events.popleft()[1]


class Quotas:
    def __init__(self, path: str | None = None, metrics=None, clock=time.monotonic) -> None:
        self.path = path
        self.metrics = metrics
        self.clock = clock
        self.default: dict = {}
        self.teams: dict[str, dict] = {}
        self.usage: dict[str, TeamUsage] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()  # reload() may run from a signal handler's thread
        if path is not None:
            self.reload(strict=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    # ---- the file --------------------------------------------------------------------------

    def reload(self, strict: bool = False) -> bool:
        """Reads the file again; on error raises (strict: at start) or logs and keeps the limits."""
        assert self.path is not None
        try:
            mtime = os.stat(self.path).st_mtime
            default, teams = parse_quota_config(read_quota_file(self.path))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            message = f"quota file {self.path}: {exc}"
            if strict:
                raise ValueError(message) from None
            log.error("%s; keeping the limits in force", message)
            return False
        with self._lock:
            self.default, self.teams, self._mtime = default, teams, mtime
        log.info("quota file %s loaded: default %s, %d team(s)", self.path, default or "no limits", len(teams))
        return True

    def _maybe_reload(self) -> None:
        now = self.clock()
        if self.path is None or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            self.reload()

    def limits_of(self, team: str) -> dict[str, int | None]:
        with self._lock:
            return {**{k: None for k in LIMITS}, **self.default, **self.teams.get(team, {})}

    # ---- admission and accounting ----------------------------------------------------------

    def _team(self, team: str) -> TeamUsage:
        u = self.usage.get(team)
        if u is None:
            u = self.usage[team] = TeamUsage()
        return u

    def admit(self, team: str, parts: int, prompt_tokens: int, max_tokens: int) -> None:
        """Counts a request of `parts` generations, or raises QuotaExceeded (nothing counted)."""
        self._maybe_reload()
        u, now = self._team(team), self.clock()
        u.expire(now)
        try:
            self._check(team, u, parts, max_tokens, now)
        except QuotaExceeded as exc:
            u.rejected += 1
            if self.metrics is not None:
                self.metrics.team_rejected.labels(team, exc.limit).inc()
            raise
        u.requests += 1
        u.in_flight += parts
        u.request_times.append(now)
        if self.metrics is not None:
            self.metrics.team_requests.labels(team).inc()
        self.add_tokens(team, prompt=prompt_tokens)

    def _check(self, team: str, u: TeamUsage, parts: int, max_tokens: int, now: float) -> None:
        lim = self.limits_of(team)
        if lim["max_tokens"] is not None and max_tokens > lim["max_tokens"]:
            raise QuotaExceeded("max_tokens", f"max_tokens {max_tokens} is over team {team!r}'s limit of "
                                              f"{lim['max_tokens']}", None)
        if lim["concurrent_requests"] is not None and u.in_flight + parts > lim["concurrent_requests"]:
            raise QuotaExceeded("concurrent_requests", f"team {team!r} has {u.in_flight} request(s) running; its "
                                f"limit is {lim['concurrent_requests']} at once", 1.0)
        rpm = lim["requests_per_minute"]
        if rpm is not None and len(u.request_times) >= rpm:
            wait = u.request_times[len(u.request_times) - rpm] + WINDOW_S - now
            raise QuotaExceeded("requests_per_minute", f"team {team!r} is over its limit of {rpm} requests "
                                f"per minute", wait)
        tpm = lim["tokens_per_minute"]
        if tpm is not None and u.window_tokens >= tpm:
            excess, wait = u.window_tokens - tpm, 1.0
            for t, n in u.token_events:  # the oldest tokens leave the window first
                excess -= n
                wait = t + WINDOW_S - now
                if excess < 0:
                    break
            raise QuotaExceeded("tokens_per_minute", f"team {team!r} is over its limit of {tpm} tokens per "
                                f"minute", wait)

    def add_tokens(self, team: str, prompt: int = 0, generated: int = 0) -> None:
        if not prompt and not generated:
            return
        u = self._team(team)
        u.prompt_tokens += prompt
        u.generation_tokens += generated
        u.token_events.append((self.clock(), prompt + generated))
        u.window_tokens += prompt + generated
        if self.metrics is not None:
            if prompt:
                self.metrics.team_prompt_tokens.labels(team).inc(prompt)
            if generated:
                self.metrics.team_generation_tokens.labels(team).inc(generated)

    def release(self, team: str) -> None:
        """One generation of the team ended (finished, failed or aborted)."""
        u = self._team(team)
        u.in_flight = max(0, u.in_flight - 1)

    def report(self) -> dict:
        now = self.clock()
        teams = {}
        for team in sorted(set(self.usage) | set(self.teams)):  # configured teams too, used or not
            u = self._team(team)
            u.expire(now)
            teams[team] = {
                "requests": u.requests, "prompt_tokens": u.prompt_tokens, "generation_tokens": u.generation_tokens,
                "rejected": u.rejected, "in_flight": u.in_flight,
                "last_minute": {"requests": len(u.request_times), "tokens": u.window_tokens},
                "limits": self.limits_of(team),
            }
        return {"quota_file": self.path, "teams": teams}
