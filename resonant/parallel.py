"""Work spread over a pool of threads, results handed out in order (sealed/compressed V-Streams).

With a codec (zstd and/or a key), encoding a V-Stream's chunks is the bulk of a sender's work:
zstd level 3 and XChaCha20-Poly1305 run at a few hundred MB/s to ~1.5 GB/s a core, several
times slower than the socket. All of it runs without the GIL: zstandard's compress, the AEAD
(resonant._codec.seal_frame and open_body release it around libsodium; PyNaCl's cffi calls release
it too), and the byte shuffle, copies and CRC-32 of bodies of NOGIL_BYTES or more. So a pool of
threads, each with its own Codec (a Codec is not thread-safe), encodes batches of chunks while
the caller sends the ones before: `ordered_map` hands the results out in submission order, so
the wire order is the serial order, with at most `depth` batches in flight (the memory held).

threads(): the pool's size, RESONANT_THREADS from the environment, else os.cpu_count();
set_threads(n) overrides both. With 1, every job runs inline in the caller's thread (the same
function, no pool): the serial path.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["threads", "set_threads", "ordered_map", "ENV_THREADS"]

ENV_THREADS = "RESONANT_THREADS"
_MAX_THREADS = 256

J = TypeVar("J")
R = TypeVar("R")

_override: int | None = None
_lock = threading.Lock()
_pools: dict[int, "ThreadPoolExecutor"] = {}


def _check(n: int, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"{what}: {n!r} threads, not an integer in 1..{_MAX_THREADS}")
    return n


def threads() -> int:
    """The pool size: set_threads()'s, else RESONANT_THREADS, else os.cpu_count()."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        try:
            return _check(int(env), ENV_THREADS)
        except ValueError:
            raise ValueError(f"{ENV_THREADS}={env!r} is not an integer in 1..{_MAX_THREADS}") from None
    return max(1, min(os.cpu_count() or 1, _MAX_THREADS))


def set_threads(n: int | None) -> None:
    """Use n threads from now on (1: everything inline, no pool); None: back to RESONANT_THREADS / cpu_count."""
    global _override
    _override = None if n is None else _check(n, "set_threads")


def _forget_pools() -> None:
    """In a forked child: the parent's pool threads do not exist there; new pools are made on demand."""
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools)


def _executor(n: int) -> "ThreadPoolExecutor":
    """The shared pool of n threads (one per size asked for; a pool is never shut down, so a
    stream that started on it finishes on it)."""
    from concurrent.futures import ThreadPoolExecutor  # (imported on first use: import resonant stays light)

    with _lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix=f"resonant-{n}")
        return pool


def ordered_map(fn: Callable[[J], R], jobs: Iterable[J], n: int | None = None, depth: int | None = None) -> Iterator[R]:
    """fn(job) for every job, in the order of `jobs`, computed on n threads (default threads())
    with at most depth jobs submitted and not yet handed out (default 2n). The jobs iterable is
    read in the caller's thread, one job ahead of what the pool can take. n == 1: fn runs inline.
    An exception from fn is raised here, at its job's place in the order."""
    n = threads() if n is None else _check(n, "ordered_map")
    if n == 1:
        for job in jobs:
            yield fn(job)
        return
    depth = 2 * n if depth is None else max(1, depth)
    pool = _executor(n)
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # abandoned (the consumer stopped early, or an error): the jobs not started are dropped
        for f in pending:
            f.cancel()
