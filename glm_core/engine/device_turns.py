"""Several local engines in one process take turns on the device, one worker iteration each, in the order they
asked (a FIFO ticket lock), so a model that is loaded beside another gets the same share of steps and neither
starves. The device stays single-threaded, as with one engine: two workers stepping at once would only split the
same cores (and on CUDA the same streams) and make both slower to first token.

An idle engine takes no turn: it waits for work on its own condition, outside the turns.
"""

from __future__ import annotations

import threading
from collections import deque


class DeviceTurns:
    def __init__(self, history: int = 256):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self.recent: deque[str] = deque(maxlen=history)  # who took the last turns, oldest first (for the page, tests)

    def turn(self, name: str) -> _Turn:
        return _Turn(self, name)

    def _acquire(self, name: str) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
            self.recent.append(name)

    def _release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class _Turn:
    def __init__(self, turns: DeviceTurns, name: str):
        self.turns, self.name = turns, name

    def __enter__(self) -> None:
        self.turns._acquire(self.name)

    def __exit__(self, *_exc) -> None:
        self.turns._release()
