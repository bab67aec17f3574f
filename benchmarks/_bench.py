"""Measurement helpers shared by the benchmark scripts (CPU, Linux).

Time: median wall time of repeated calls after warm-up. Peak memory: the process's peak resident set size
(VmHWM) during one call minus its resident size (VmRSS) just before, after returning freed heap memory to the
OS (malloc_trim) and resetting the peak (writing 5 to /proc/self/clear_refs). It counts everything the call
touches, including kernel workspaces and the tensors it returns, and excludes the model and the input.
Saved for backward: the bytes of the distinct storages autograd keeps for the backward of a forward pass, the
training-time activation memory, counted exactly (independent of the allocator and of the machine's state).
"""
import contextlib
import ctypes
import gc
import io
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from timm_nlp.tools.tables import markdown_table

_LIBC = ctypes.CDLL('libc.so.6')


class PaperFormulationPool(nn.Module):
    """A non-local pooling layer computed as the paper's code computes it, with the weights of ``pool`` (a
    timm-nlp WeightedPool2d with a regular patch embedding): the embedding, ``nn.MultiheadAttention`` called on
    (tokens, tokens, tokens) as the paper calls it (its default fast path in eval, the attention weights returned),
    the map up-sampled to full resolution before the restore conv, BN and sigmoid, ``nn.AvgPool2d`` windows."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        nl = pool.non_local
        assert not nl.deformable and pool.local is None, 'the paper formulation here covers nlp pools'
        self.pool, self.nl = pool, nl
        self.mha = nn.MultiheadAttention(nl.embed_dim, nl.attn.num_heads, batch_first=True)
        self.mha.in_proj_weight = nl.attn.qkv.weight
        self.mha.in_proj_bias = nl.attn.qkv.bias
        self.mha.out_proj.weight, self.mha.out_proj.bias = nl.attn.proj.weight, nl.attn.proj.bias
        self.avg = nn.AvgPool2d(pool.stride, pool.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nl = self.nl
        b, c, h, w = x.shape
        p = nl.patch_size
        t = nl.act(nl.norm(nl.patch_embed(x)))
        th, tw = t.shape[-2:]
        x_emb = nl.pos_embed.col_embed(torch.arange(tw, device=x.device))
        y_emb = nl.pos_embed.row_embed(torch.arange(th, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(th, 1, 1), y_emb.unsqueeze(1).repeat(1, tw, 1)],
                        dim=-1).permute(2, 0, 1).unsqueeze(0).repeat(b, 1, 1, 1)
        embed = t.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
        attn_seq, _ = self.mha(embed, embed, embed)
        attn = attn_seq.transpose(1, 2).reshape(b, -1, h // p, w // p)
        weight = torch.exp(torch.sigmoid(nl.restore_norm(nl.restore(F.interpolate(attn, size=(h, w))))))
        if self.pool.win_norm:
            return self.avg(x * weight) / self.avg(weight)
        return self.avg(x * weight)


def paper_code_model(arch: str, num_classes: int = 1000) -> Optional[nn.Module]:
    """The paper code's own model of ``arch`` where PAPER_CODE_DIR names a checkout of it, else None."""
    root = os.environ.get('PAPER_CODE_DIR')
    if not root:
        return None
    base = os.path.join(root, 'base')
    if base not in sys.path:
        sys.path.insert(0, base)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from models.network import Network, name_parse
        return Network(name_parse(arch.lower()), num_classes=num_classes)


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
    """Print a GitHub-markdown table (timm-nlp's one table writer)."""
    print(markdown_table(header, rows))


def env_line(threads: int) -> str:
    """One line describing the machine and versions."""
    import platform
    import timm
    return (f'torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, '
            f'{threads} threads, {os.cpu_count()} cores visible')
