"""Measurement helpers shared by the benchmark scripts (CPU, Linux).

Time: median wall time of repeated calls after warm-up. Peak memory: the process's peak resident set size
(VmHWM) during one call minus its resident size (VmRSS) just before, after returning freed heap memory to the
OS (malloc_trim) and resetting the peak (writing 5 to /proc/self/clear_refs). It counts everything the call
touches, including kernel workspaces and the tensors it returns, and excludes the model and the input.
Saved for backward: the bytes of the distinct storages autograd keeps for the backward of a forward pass, the
training-time activation memory, counted exactly (independent of the allocator and of the machine's state).
"""
import ctypes
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch

_LIBC = ctypes.CDLL('libc.so.6')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_tests_reference():
    """Import the plain formulations of tests/reference.py (shared with the tests, not part of the package)."""
    sys.path.insert(0, os.path.join(REPO, 'tests'))
    import reference
    return reference


def _proc_status(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{key} not in /proc/self/status')


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak resident bytes that one call of ``fn`` adds to the process (see module docstring)."""
    gc.collect()
    _LIBC.malloc_trim(0)
    base = _proc_status('VmRSS:')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    out = fn()
    peak = _proc_status('VmHWM:') - base
    del out
    return peak


def saved_for_backward(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensor storages that autograd saves for the backward of ``fn()`` (a forward pass),
    not counting the storages of ``exclude`` (the parameters and the input)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # the graph, and so every saved storage, stays alive until here: no address is reused
    del out
    return sum(storages.values())


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int = 5) -> Dict[str, List[float]]:
    """Seconds per call of each function in each of ``repeats`` alternating rounds, so that machine drift
    (frequency, other load) affects every function alike and their ratios stay meaningful."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def round_ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    """Median over the rounds of ``times[num] / times[den]``, each pair timed back to back in one round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def print_table(header: Sequence[str], rows: List[Sequence[object]]) -> None:
    """Print a GitHub-markdown table."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |'

    print(fmt(cells[0]))
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for r in cells[1:]:
        print(fmt(r))


def env_line(threads: int) -> str:
    """One line describing the machine and versions."""
    import platform
    import timm
    return (f'torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, '
            f'{threads} threads, {os.cpu_count()} cores visible')
