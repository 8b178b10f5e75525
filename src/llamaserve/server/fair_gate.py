"""Fair use of the engine's user slots between teams, when a quota file is given.

Without it the engine's queue is first come, first served: a team that sends 100 requests at
once delays everyone else's by 100 requests. With it, the server hands the slots out itself: a
generation waits here for a slot, one queue per team, and each freed slot goes to the next team
in turn, so a single request of another team waits for at most one slot per waiting team (less
than one batch), however many the flooding team has queued.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque


class GateFull(Exception):
    """Too many generations wait for a slot already."""


class FairGate:
    def __init__(self, slots: int, max_waiting: int) -> None:
        self.free = slots
        self.max_waiting = max_waiting
        self._queues: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()
        self.waiting = 0

    async def acquire(self, team: str) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        if self.waiting >= self.max_waiting:
            raise GateFull(f"{self.waiting} requests wait for a slot already")
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(team, deque()).append(fut)
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted while we were leaving: pass it on
            else:
                self._forget(team, fut)
            raise

    def _forget(self, team: str, fut: asyncio.Future) -> None:
        q = self._queues.get(team)
        if q is not None and fut in q:
            q.remove(fut)
            self.waiting -= 1
            if not q:
                del self._queues[team]

    def release(self) -> None:
        """A slot is free: to the team at the head of the rotation, which then goes to its end."""
        while self._queues:
            team, q = next(iter(self._queues.items()))
            fut = q.popleft()
            self.waiting -= 1
            if q:
                self._queues.move_to_end(team)
            else:
                del self._queues[team]
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1
