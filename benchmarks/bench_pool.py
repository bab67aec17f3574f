"""Benchmark every pooling method, and nlp against the paper code's formulation of the same layer.

    python benchmarks/bench_pool.py [--batch 8] [--channels 64] [--size 56] [--threads 2]

Per method: forward (eval, no grad) and forward+backward (train) time and peak memory, and the activations saved
for the backward (exact), fp32, stride 2.
The standalone layers have the paper code's first-ResNet-stage defaults (nlp: 4 heads, p = 1; reduced: p = 4).
Then the ratios of nlp_headfix2 (p=1, 2 heads) against the paper code's formulation of the same layer with the
same weights (``PaperFormulationPool``: nn.MultiheadAttention, the map restored at full resolution), measured in the
same run; the time ratios are medians of per-round ratios over interleaved rounds (each round times both back to
back, so they share the machine's state). For scale, ``skip`` (no pooling layer in the networks) is timed as the
strided 3x3 conv C -> C it leaves in place.
"""
import argparse
from typing import Callable, Tuple

import torch

from _bench import (
    PaperFormulationPool, env_line, interleaved_times, median_time, peak_memory, print_table, round_ratio,
    saved_for_backward)
from timm_nlp.layers import create_pool2d

METHODS = ['skip', 'maxp', 'avgp', 'lip', 'gaussian_pool', 'nlp', 'nlp_headfix2', 'nlp_headfix2_nowin',
           'nlp_reduced', 'nlp_headfix2_nowin_reduced', 'dfmnlp', 'mixp', 'dfmixp']
MiB = 2 ** 20


def calls(module: torch.nn.Module, x: torch.Tensor
          ) -> Tuple[Callable[[], object], Callable[[], None], torch.Tensor]:
    """A forward (eval, no grad) and a forward+backward (train) call of ``module`` on ``x``, and the copy of ``x``
    that the latter differentiates."""
    xg = x.clone().requires_grad_()

    def fwd():
        module.eval()
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        module.train()
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).sum().backward()
    return fwd, fwd_bwd, xg


def measure(module: torch.nn.Module, x: torch.Tensor, repeats: int):
    """(forward s, forward peak bytes, forward+backward s, forward+backward peak bytes, bytes saved for backward)."""
    fwd, fwd_bwd, xg = calls(module, x)
    t_f, m_f = median_time(fwd, repeats), peak_memory(fwd)
    t_fb, m_fb = median_time(fwd_bwd, repeats), peak_memory(fwd_bwd)
    module.zero_grad(set_to_none=True)
    saved = saved_for_backward(lambda: module.train()(xg), [xg, *module.parameters()])
    return t_f, m_f, t_fb, m_fb, saved


def _cells(r) -> list:
    return [f'{r[0] * 1e3:.1f}', f'{r[1] / MiB:.1f}', f'{r[2] * 1e3:.1f}', f'{r[3] / MiB:.1f}', f'{r[4] / MiB:.1f}']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--size', type=int, default=56)
    parser.add_argument('--stride', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=7, help='interleaved rounds of the ours / plain time ratios')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    print(f'# bench_pool: B={args.batch} C={args.channels} {args.size}x{args.size} stride {args.stride}, fp32; '
          f'{env_line(args.threads)}')
    print('# peak = peak RSS during one call minus RSS before it (malloc_trim + clear_refs reset), '
          'model and input excluded; saved = activations autograd keeps for the backward (exact, parameters and '
          'input excluded); time = median of', args.repeats, 'calls after 1 warm-up\n')
    rows, results = [], {}
    for name in METHODS:
        m = torch.nn.Conv2d(args.channels, args.channels, 3, args.stride, 1, bias=False) if name == 'skip' else \
            create_pool2d(name, args.channels, args.stride)
        results[name] = r = measure(m, x, args.repeats)
        params = sum(p.numel() for p in m.parameters())
        rows.append([name, f'{params:,}', *_cells(r)])
    ours = create_pool2d('nlp_headfix2', args.channels, args.stride)
    plain = PaperFormulationPool(ours)
    results['plain'] = r = measure(plain, x, args.repeats)
    rows.append(["nlp_headfix2, the paper code's formulation", f'{sum(p.numel() for p in ours.parameters()):,}',
                 *_cells(r)])
    print_table(['method', 'params', 'fwd ms', 'fwd peak MiB', 'fwd+bwd ms', 'fwd+bwd peak MiB', 'saved MiB'], rows)

    def rel_diff() -> float:
        with torch.no_grad():
            y = ours(x)
            return ((y - plain(x)).abs().max() / y.abs().max()).item()
    ours.eval(), plain.eval()
    diff_eval = rel_diff()
    ours.train(), plain.train()
    diff_train = rel_diff()
    o, p = results['nlp_headfix2'], results['plain']
    (ours_f, ours_fb, _), (plain_f, plain_fb, _) = calls(ours, x), calls(plain, x)
    t_f = interleaved_times({'ours': ours_f, 'plain': plain_f}, args.rounds)
    t_fb = interleaved_times({'ours': ours_fb, 'plain': plain_fb}, args.rounds)
    checks = [
        ('forward speed-up', round_ratio(t_f, 'plain', 'ours'), 3.0),
        ('forward peak-memory reduction', p[1] / o[1], 4.0),
        ('forward+backward speed-up', round_ratio(t_fb, 'plain', 'ours'), 2.0),
        ('forward+backward peak-memory reduction', p[3] / o[3], None),
        ('saved-for-backward reduction', p[4] / o[4], None),
    ]
    rows = [[k, f'{v:.2f}x', f'>= {t:.0f}x' if t else '-', ('PASS' if v >= t else 'FAIL') if t else '-']
            for k, v, t in checks]
    for mode, d in (('eval', diff_eval), ('train', diff_train)):
        rows.append([f'max |ours - paper formulation| / max |ours| ({mode})', f'{d:.2e}', '<= 1e-05',
                     'PASS' if d <= 1e-5 else 'FAIL'])
    print("\n# nlp_headfix2 (p=1, 2 heads, SDPA) vs the paper code's formulation (nn.MultiheadAttention), same "
          f'weights; time: median of per-round ratios over {args.rounds} interleaved rounds\n')
    print_table(['ratio (paper formulation / ours)', 'value', 'target', 'result'], rows)


if __name__ == '__main__':
    main()
