"""Benchmark every pooling method, and nlp against its plain nn.MultiheadAttention formulation.

    python benchmarks/bench_pool.py [--batch 8] [--channels 64] [--size 56] [--threads 2]

Per method: forward (eval, no grad) and forward+backward (train) time and peak memory, and the activations saved
for the backward (exact), fp32, stride 2.
Then the ratios of nlp_headfix2 (p=1, 2 heads) against the plain formulation of the same layer with the
same weights, measured in the same run, with the issue's targets.
"""
import argparse

import torch

from _bench import env_line, import_tests_reference, median_time, peak_memory, print_table, saved_for_backward
from timm_nlp.layers import create_pool2d

METHODS = ['skip', 'maxp', 'avgp', 'lip', 'gaussian_pool', 'nlp', 'nlp_headfix2', 'nlp_headfix2_nowin',
           'nlp_reduced', 'nlp_headfix2_nowin_reduced', 'dfmnlp', 'mixp', 'dfmixp']
MiB = 2 ** 20


def measure(module: torch.nn.Module, x: torch.Tensor, repeats: int):
    """(forward s, forward peak bytes, forward+backward s, forward+backward peak bytes, bytes saved for backward)."""
    module.eval()

    def fwd():
        with torch.no_grad():
            return module(x)

    t_f = median_time(fwd, repeats)
    m_f = peak_memory(fwd)
    module.train()
    xg = x.clone().requires_grad_()

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).sum().backward()

    t_fb = median_time(fwd_bwd, repeats)
    module.zero_grad(set_to_none=True)
    m_fb = peak_memory(fwd_bwd)
    saved = saved_for_backward(lambda: module(xg), [xg, *module.parameters()])
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = import_tests_reference()
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    print(f'# bench_pool: B={args.batch} C={args.channels} {args.size}x{args.size} stride {args.stride}, fp32; '
          f'{env_line(args.threads)}')
    print('# peak = peak RSS during one call minus RSS before it (malloc_trim + clear_refs reset), '
          'model and input excluded; saved = activations autograd keeps for the backward (exact, parameters and '
          'input excluded); time = median of', args.repeats, 'calls after 1 warm-up\n')
    rows, results = [], {}
    for name in METHODS:
        m = create_pool2d(name, args.channels, args.stride)
        results[name] = r = measure(m, x, args.repeats)
        params = sum(p.numel() for p in m.parameters())
        rows.append([name, f'{params:,}', *_cells(r)])
    ours = create_pool2d('nlp_headfix2', args.channels, args.stride)
    plain = reference.PlainNlpPool(ours)
    results['plain'] = r = measure(plain, x, args.repeats)
    rows.append(['nlp_headfix2, plain nn.MultiheadAttention', f'{sum(p.numel() for p in plain.parameters()):,}',
                 *_cells(r)])
    print_table(['method', 'params', 'fwd ms', 'fwd peak MiB', 'fwd+bwd ms', 'fwd+bwd peak MiB', 'saved MiB'], rows)

    ours.eval(), plain.eval()
    with torch.no_grad():
        diff_eval = (ours(x) - plain(x)).abs().max().item()
    ours.train(), plain.train()
    diff_train = (ours(x) - plain(x)).abs().max().item()
    o, p = results['nlp_headfix2'], results['plain']
    checks = [
        ('forward speed-up', p[0] / o[0], 3.0),
        ('forward peak-memory reduction', p[1] / o[1], 4.0),
        ('forward+backward speed-up', p[2] / o[2], 2.0),
        ('forward+backward peak-memory reduction', p[3] / o[3], None),
        ('saved-for-backward reduction', p[4] / o[4], None),
    ]
    rows = [[k, f'{v:.2f}x', f'>= {t:.0f}x' if t else '-', ('PASS' if v >= t else 'FAIL') if t else '-']
            for k, v, t in checks]
    for mode, d in (('eval', diff_eval), ('train', diff_train)):
        rows.append([f'max |ours - plain| ({mode})', f'{d:.2e}', '<= 1e-05', 'PASS' if d <= 1e-5 else 'FAIL'])
    print('\n# nlp_headfix2 (p=1, 2 heads, SDPA) vs the plain nn.MultiheadAttention formulation, same weights\n')
    print_table(['ratio (plain / ours)', 'value', 'target', 'result'], rows)


if __name__ == '__main__':
    main()
