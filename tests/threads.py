"""Run one function in N threads released at once: the race tests of the stores share it."""

from __future__ import annotations

import threading
from collections.abc import Callable


def in_threads(threads: int, rounds: int, one: Callable[[int, int], int]) -> list[list[int]]:
    """Each thread `i` calls `one(i, round)` `rounds` times, all threads starting together;
    returns each thread's results in the order it got them. An exception in any thread fails
    the caller (it is not lost in the thread), and so does a thread still running after 60 s."""
    start = threading.Barrier(threads, timeout=30)
    got: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                got[i].append(one(i, r))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers), "a thread is still running after 60 s"
    assert errors == [], errors
    return got
