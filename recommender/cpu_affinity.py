"""Pinning a service worker process to one CPU (``PAINPLAN_CPU_AFFINITY=on``).

A worker answers ``/recommend`` with two threads: the event loop (HTTP) and the thread that
scores the micro-batch. Left to the scheduler, the two often sit on different cores, so
every request crosses cores twice (hand-off and answer) and the scoring runs with caches the
other core warmed. On the 2-CPU bench machine that cost 0.7–1 ms per request at
concurrency 1 (bench/results/servers.md); pinned, throughput was the same or higher, because
one worker's Python runs one thread at a time anyway (the GIL). So on a machine given to painplan, pin worker k
to the k-th CPU it may use; on a shared host, where other processes may be pinned to the
same CPUs, leave it off (the default).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def worker_cpu(worker_index: int, allowed: set[int]) -> int:
    """The CPU for the 1-based ``worker_index``: the allowed CPUs in order, round robin."""
    if worker_index < 1 or not allowed:
        raise ValueError(f"worker_index must be >= 1 and CPUs given, not {worker_index}, {allowed}")
    cpus = sorted(allowed)
    return cpus[(worker_index - 1) % len(cpus)]


def pin_process(worker_index: int) -> int | None:
    """Pin every thread of this process (and so every thread it starts later) to the CPU
    :func:`worker_cpu` picks; returns that CPU, or None (with a warning) where the
    platform has no per-thread affinity (it is Linux-only)."""
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        log.warning("PAINPLAN_CPU_AFFINITY=on is ignored: this platform cannot pin threads")
        return None
    cpu = worker_cpu(worker_index, os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return cpu
