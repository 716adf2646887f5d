"""Running per-module work on threads (the transfer's modules, the network's bases): a worker count
for the CPU, an ordered bounded map, a background result. No math and no I/O of its own.

torch, hashlib, file reads and the LAPACK calls of `lorax.lapack` release the GIL, so threads overlap
the real work; results come back in input order so outputs do not depend on scheduling.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch

from .lapack import serial_blas

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def cpu_workers(device: torch.device, workers: int | None = None) -> Iterator[int]:
    """Workers for per-module work: `workers`, else torch's CPU threads at entry; each worker then runs
    torch and LAPACK on one thread (restored afterwards). 1 (serial) on CUDA or with one worker."""
    n = workers if workers is not None else torch.get_num_threads()
    if device.type != "cpu" or n <= 1:
        yield 1
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with serial_blas():  # one limit for the whole pool (see serial_blas)
            yield n
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items on `workers` threads, results yielded in item order; at most 2 x workers in
    flight, so memory stays bounded. workers <= 1: a plain serial loop."""
    if workers <= 1:
        for x in items:
            yield fn(x)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorax-worker")
    pending: deque[Future] = deque()
    try:
        for x in items:
            pending.append(pool.submit(fn, x))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Background(Generic[T]):
    """`fn()` on a daemon thread (so a failed caller does not wait for it); `result()` joins it and
    re-raises its exception."""

    def __init__(self, fn: Callable[[], T], name: str = "lorax-background") -> None:
        self._value: object = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # handed to the caller of result()
                self._error = exc

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
