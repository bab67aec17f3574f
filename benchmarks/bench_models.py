"""Pooled models against their stock timm base and against the plain nn.MultiheadAttention formulation of nlp.

    python benchmarks/bench_models.py [--batch 8] [--img-size 224] [--threads 2] [--repeats 9] [--no-compile]

Inference (eval, no grad) and a training step (forward, backward, SGD step) per model, each in fp32 and
channels_last (timed in interleaved rounds; a ratio is the median over rounds of the two models' times within a
round, so it shares the machine's state), bf16 autocast and torch.compile, peak memory and the activations saved
for the backward (see _bench.py), all in one run. The ratios are checked against the issue's targets. The same
backbone with a free pooling (resnet18_avgp_1222), the fused attention alone and this CPU's GEMM peak are timed
too, to bound the training-step ratio (Amdahl).
"""
import argparse
import copy
import statistics
from typing import List, Tuple

import timm
import torch
from timm.layers import Attention
from torch import nn
from torch.nn import functional as F

from _bench import (
    env_line, import_tests_reference, interleaved_times, median_time, peak_memory, print_table, round_ratio,
    saved_for_backward)
import timm_nlp  # noqa: F401  registers the models
from timm_nlp.layers import WeightedPool2d
from timm_nlp.profiler import count_macs

MiB = 2 ** 20
STOCK, OURS, PLAIN, REDUCED = ('resnet18 (stock timm)', 'resnet18_nlp_headfix2_1222',
                               'resnet18_nlp_headfix2_1222, plain MHA', 'resnet18_nlp_headfix2_nowin_reduced_1222')
BACKBONE = 'resnet18_avgp_1222'  # the backbone of OURS (same convs, same strides) with a free pooling


def plain_formulation(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose non-local pooling layers run the plain nn.MultiheadAttention formulation."""
    reference = import_tests_reference()
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, WeightedPool2d) and module.nlp is not None:
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, reference.PlainNlpPool(module))
    return model


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN weights and statistics: timm zero-initialises the last BN of each residual branch, which
    would hide the pooling layers from the logits and make an output comparison vacuous."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def infer_fn(model: nn.Module, x: torch.Tensor, bf16: bool = False):
    """One inference call of ``model`` on ``x`` (eval, no grad), on ``x``'s device."""
    model.eval()

    def run():
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x)
    return run


def train_fn(model: nn.Module, x: torch.Tensor, bf16: bool = False):
    """One training step (forward, cross-entropy, backward, SGD) of ``model`` on ``x``, on ``x``'s device."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)

    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return run


def attention_shapes(model: nn.Module, x: torch.Tensor) -> List[Tuple[int, int, int, int]]:
    """(batch, heads, tokens, head dim) of every attention call in one forward of ``model``."""
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: shapes.append(
        (args[0].shape[0], mod.num_heads, args[0].shape[1], mod.head_dim))) for m in model.modules()
        if isinstance(m, Attention)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def attention_fwd_bwd(shapes: List[Tuple[int, int, int, int]]) -> Tuple[float, int]:
    """Median seconds of the fused attention forward + backward of ``shapes`` alone, and its useful MACs: 2 B h N^2 d
    forward (QK^T, PV) and 4 B h N^2 d backward (dV, dP, dQ, dK), not counting the kernel's recomputation of QK^T."""
    qkv = [[torch.randn(s, requires_grad=True) for _ in range(3)] for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def run():
        for (q, k, v), g in zip(qkv, grads):
            F.scaled_dot_product_attention(q, k, v).backward(g)
    return median_time(run), sum(6 * b * h * n * n * d for b, h, n, d in shapes)


def gemm_peak(n: int = 2048) -> float:
    """fp32 multiply-accumulates per second of one large square matrix product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return n ** 3 / median_time(lambda: torch.mm(a, b), repeats=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--no-compile', action='store_true')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    size = (3, args.img_size, args.img_size)
    print(f'# bench_models: batch {args.batch}, {args.img_size}x{args.img_size}; {env_line(args.threads)}')
    print(f'# fp32 and channels_last (inference and train step): median of {args.repeats} interleaved rounds after 1 '
          'warm-up, (ratio) = median of the per-round ratios to stock; bf16: 1 call after 1 warm-up; compiled: median '
          'of 3 calls after compiling; peak: RSS above the pre-call level; saved: activations autograd keeps for the '
          'backward, exact (benchmarks/_bench.py); train step = forward + backward + SGD\n')

    ours = randomize_norms(timm.create_model(OURS))
    models = {STOCK: timm.create_model('resnet18'), OURS: ours, PLAIN: plain_formulation(ours),
              REDUCED: randomize_norms(timm.create_model(REDUCED)), BACKBONE: timm.create_model(BACKBONE)}
    with torch.no_grad():
        diff = (models[PLAIN].eval()(x[:2]) - ours.eval()(x[:2])).abs().max().item()
    res = {name: {'macs': count_macs(m, size)} for name, m in models.items()}
    timed = {'fp32': interleaved_times({n: infer_fn(m, x) for n, m in models.items()}, args.repeats),
             'train': interleaved_times({n: train_fn(m, x) for n, m in models.items()}, args.repeats)}
    cl_models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items() if n != PLAIN}
    x_cl = x.to(memory_format=torch.channels_last)
    timed['cl'] = interleaved_times({n: infer_fn(m, x_cl) for n, m in cl_models.items()}, args.repeats)
    timed['train_cl'] = interleaved_times({n: train_fn(m, x_cl) for n, m in cl_models.items()}, args.repeats)
    for name, model in models.items():
        model.to(memory_format=torch.contiguous_format)
        r = res[name]
        for key, times in timed.items():
            if name in times:
                r[key], r[key + '_ratio'] = statistics.median(times[name]), round_ratio(times, name, STOCK)
        r['fp32_mem'] = peak_memory(infer_fn(model, x))
        r['train_mem'] = peak_memory(train_fn(model, x))
        r['saved'] = saved_for_backward(lambda: model.train()(x), [x, *model.parameters()])
        if name != PLAIN:  # the reference formulation is timed in fp32 only
            r['bf16'] = median_time(infer_fn(model, x, bf16=True), repeats=1)
            r['train_bf16'] = median_time(train_fn(copy.deepcopy(model), x, bf16=True), repeats=1)
    if not args.no_compile:  # last, so inductor's worker processes cannot disturb the eager timings
        for name in (STOCK, OURS, REDUCED):
            compiled = torch.compile(copy.deepcopy(models[name]).eval())
            res[name]['compiled'] = median_time(infer_fn(compiled, x))
            with torch.no_grad():
                res[name]['compile_diff'] = (compiled(x[:2]) - models[name].eval()(x[:2])).abs().max().item()
            res[name]['train_compiled'] = median_time(train_fn(torch.compile(copy.deepcopy(models[name])), x))

    stock = res[STOCK]
    fmt = lambda r, k, scale=1e3: f'{r[k] * scale:.0f}' if k in r else '-'  # noqa: E731
    timed_fmt = lambda r, k: f"{r[k] * 1e3:.0f} ({r[k + '_ratio']:.2f}x)" if k in r else '-'  # noqa: E731
    rows = [[name, f"{r['macs'] / 1e9:.2f}", timed_fmt(r, 'fp32'), timed_fmt(r, 'cl'), fmt(r, 'bf16'),
             fmt(r, 'compiled'), f"{r['fp32_mem'] / MiB:.0f}", timed_fmt(r, 'train'), timed_fmt(r, 'train_cl'),
             fmt(r, 'train_bf16'), fmt(r, 'train_compiled'), f"{r['train_mem'] / MiB:.0f}", f"{r['saved'] / MiB:.0f}"]
            for name, r in res.items()]
    print('## inference (eval, no grad)\n')
    print_table(['model', 'GMACs/img', 'fp32 ms (vs stock)', 'channels_last ms (vs stock)', 'bf16 ms',
                 'compiled ms', 'fp32 peak MiB'], [r[:7] for r in rows])
    print('\n## train step (forward + backward + SGD)\n')
    print_table(['model', 'fp32 ms (vs stock)', 'channels_last ms (vs stock)', 'bf16 ms', 'compiled ms',
                 'fp32 peak MiB', 'saved MiB'], [r[:1] + r[7:] for r in rows])

    o, p, red, bb = res[OURS], res[PLAIN], res[REDUCED], res[BACKBONE]
    mac_ratio, time_ratio = o['macs'] / stock['macs'], o['fp32_ratio']
    plain_train = round_ratio(timed['train'], PLAIN, OURS)
    # Amdahl: the backbone is common to ours and plain; the bound lets ours' pooling layers cost only their
    # attention's useful MACs at this CPU's fp32 GEMM peak, with everything else in them free
    attn_time, attn_macs = attention_fwd_bwd(attention_shapes(ours, x))
    peak = gemm_peak()
    bound = p['train'] / (bb['train'] + attn_macs / peak)
    checks = [
        ('nlp_headfix2_1222 / stock inference time', f'{time_ratio:.2f}x',
         f'<= 1.10 x MAC ratio {mac_ratio:.2f} = {1.1 * mac_ratio:.2f}x', time_ratio <= 1.1 * mac_ratio),
        ('nlp_headfix2_nowin_reduced_1222 / stock inference time', f"{red['fp32_ratio']:.2f}x",
         f"<= 1.30x (MAC ratio {red['macs'] / stock['macs']:.2f})", red['fp32_ratio'] <= 1.3),
        ('plain / ours training step time', f'{plain_train:.2f}x', '>= 2.00x', plain_train >= 2.0),
        (f'train step of the common backbone ({BACKBONE}) / ours / plain', f"{bb['train'] * 1e3:.0f} / "
         f"{o['train'] * 1e3:.0f} / {p['train'] * 1e3:.0f} ms", '-', None),
        ('plain / ours pooling layers alone, train step (step minus backbone)',
         f"{(p['train'] - bb['train']) / (o['train'] - bb['train']):.2f}x", '-', None),
        ("ours' attention fwd+bwd alone (fused SDPA, the model's shapes)",
         f'{attn_time * 1e3:.0f} ms, {attn_macs / attn_time / 1e9:.0f} GMAC/s', '-', None),
        ('fp32 GEMM peak of this CPU (2048^3 mm)', f'{peak / 1e9:.0f} GMAC/s', '-', None),
        ('upper bound on plain / ours train step (backbone + attention at GEMM peak)', f'{bound:.2f}x', '-', None),
        ('nlp_headfix2_nowin_reduced_1222 / stock inference time, channels_last', f"{red['cl_ratio']:.2f}x", '-',
         None),
        ('plain / stock inference time (materialised attention, as in the paper\'s code)', f"{p['fp32_ratio']:.2f}x",
         '-', None),
        ('plain / ours inference peak memory', f"{p['fp32_mem'] / o['fp32_mem']:.2f}x", '-', None),
        ('plain / ours training peak memory', f"{p['train_mem'] / o['train_mem']:.2f}x", '-', None),
        ('plain / ours activations saved for the backward', f"{p['saved'] / o['saved']:.2f}x", '-', None),
        ('max |ours - plain| logits (randomised BN)', f'{diff:.2e}', '<= 1e-4', diff <= 1e-4),
    ]
    for name in (OURS, REDUCED):
        if 'compile_diff' in res[name]:
            checks.append((f'max |compiled - eager| logits, {name}', f"{res[name]['compile_diff']:.2e}", '<= 1e-4',
                           res[name]['compile_diff'] <= 1e-4))
    print('\n# targets (CPU, fp32, ratios measured in this run)\n')
    print_table(['check', 'value', 'target', 'result'],
                [[c, v, t, '-' if ok is None else ('PASS' if ok else 'FAIL')] for c, v, t, ok in checks])


if __name__ == '__main__':
    main()
