"""The paper's networks: ours against their stock timm base model and against the paper code's formulation.

    python benchmarks/bench_models.py [--batch 8] [--threads 2] [--repeats 7] [--quick]

For resnet18-nlp_headfix2-1222 and resnet18-nlp_headfix2_nowin_reduced-1222 at 224 px and
mobilenet_v2-nlp_headfix2-2222121 at 128 px (batch 8, fp32): inference (eval, no grad) and a training step (forward,
cross-entropy, backward, SGD step). Each group of models is timed in interleaved rounds; a ratio is the median over
the rounds of the two models' times within a round, so that both share the machine's state. Next to each network:
its stock timm model (resnet18, mobilenetv2_100) and the same network in the formulation of the paper's code
(``PaperFormulationPool`` in _bench.py: nn.MultiheadAttention called as the paper calls it, with its default fast
path, the importance map restored at full resolution, nn.AvgPool2d), with the same weights; with PAPER_CODE_DIR
set, the paper's code itself too. Peak memory and the activations saved for the backward: see _bench.py. The ratios
are checked against the targets: ours / stock time within 1.10x of the MAC ratio; paper formulation / ours at least
1.5x (ResNet-18, inference and train step) and 2.5x (MobileNetV2 inference).
"""
import argparse
import copy
import os
import statistics
from typing import Dict, List

import timm
import torch
from torch import nn

from _bench import (
    PaperFormulationPool, env_line, interleaved_times, paper_code_model, peak_memory, print_table, round_ratio,
    saved_for_backward)
import timm_nlp
from timm_nlp.layers import WeightedPool2d
from timm_nlp.profiler import count_macs

MiB = 2 ** 20
GROUPS = (  # (stock timm model, our networks, image size)
    ('resnet18', ('resnet18-nlp_headfix2-1222', 'resnet18-nlp_headfix2_nowin_reduced-1222'), 224),
    ('mobilenetv2_100', ('mobilenet_v2-nlp_headfix2-2222121',), 128),
)
PAPER_SUFFIX, CODE_SUFFIX = ', paper formulation', ", paper's code"


def paper_formulation(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose non-local pooling layers compute as the paper's code does (same weights)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, WeightedPool2d) and module.non_local is not None:
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, PaperFormulationPool(module))
    return model


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial BN weights and statistics, so that the output comparison with the paper formulation is not
    vacuous."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def infer_fn(model: nn.Module, x: torch.Tensor):
    model.eval()

    def run():
        with torch.no_grad():
            return model(x)
    return run


def train_fn(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0))

    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return run


def bench_group(stock: str, archs, size: int, args) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, size, size)
    models: Dict[str, nn.Module] = {stock: timm.create_model(stock)}
    diffs = {}
    for arch in archs:
        ours = randomized(timm_nlp.create_model(arch))
        models[arch] = ours
        models[arch + PAPER_SUFFIX] = paper_formulation(ours)
        with torch.no_grad():
            y = ours.eval()(x[:2])
            diffs[arch] = ((models[arch + PAPER_SUFFIX].eval()(x[:2]) - y).abs().max() / y.abs().max()).item()
        code = paper_code_model(arch)
        if code is not None:
            models[arch + CODE_SUFFIX] = code
    res = {name: {'macs': count_macs(m, (3, size, size)) if CODE_SUFFIX not in name else float('nan')}
           for name, m in models.items()}
    for arch in archs:
        res[arch]['diff'] = diffs[arch]
    for key, fn in (('infer', infer_fn), ('train', train_fn)):
        times = interleaved_times({n: fn(m, x) for n, m in models.items()}, args.repeats)
        for name in models:
            res[name][key] = statistics.median(times[name])
            res[name][key + '_vs_stock'] = round_ratio(times, name, stock)
            for suffix in (PAPER_SUFFIX, CODE_SUFFIX):
                if name.endswith(suffix):
                    res[name][key + '_vs_ours'] = round_ratio(times, name, name[:-len(suffix)])
    for name, model in models.items():
        res[name]['infer_mem'] = peak_memory(infer_fn(model, x))
        res[name]['train_mem'] = peak_memory(train_fn(model, x))
        res[name]['saved'] = saved_for_backward(lambda: model.train()(x), [x, *model.parameters()])
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--quick', action='store_true', help='batch 2, 2 rounds: a smoke run, not for the record')
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 2
    torch.set_num_threads(args.threads)
    code = 'yes' if os.environ.get('PAPER_CODE_DIR') else 'no (PAPER_CODE_DIR unset)'
    print(f'# bench_models: batch {args.batch}, fp32; {env_line(args.threads)}; paper code timed: {code}')
    print(f'# time: median of {args.repeats} interleaved rounds after 1 warm-up, (ratio) = median of the per-round '
          "ratios; peak: RSS above the pre-call level; saved: activations autograd keeps for the backward, exact "
          '(benchmarks/_bench.py); train step = forward + backward + SGD\n')
    rows: List[List[str]] = []
    checks = []
    for stock, archs, size in GROUPS:
        res = bench_group(stock, archs, size, args)
        for name, r in res.items():
            vs = lambda k: (f" ({r[k + '_vs_ours']:.2f}x ours)" if k + '_vs_ours' in r  # noqa: E731
                            else f" ({r[k + '_vs_stock']:.2f}x stock)")
            macs = '-' if r['macs'] != r['macs'] else f"{r['macs'] / 1e9:.2f}"
            rows.append([f'{name} @{size}', macs, f"{r['infer'] * 1e3:.0f}{vs('infer')}",
                         f"{r['train'] * 1e3:.0f}{vs('train')}", f"{r['infer_mem'] / MiB:.0f}",
                         f"{r['train_mem'] / MiB:.0f}", f"{r['saved'] / MiB:.0f}"])
        s = res[stock]
        for arch in archs:
            o, p = res[arch], res[arch + PAPER_SUFFIX]
            mac_ratio = o['macs'] / s['macs']
            checks.append((f'{arch} / {stock} inference time', f"{o['infer_vs_stock']:.2f}x",
                           f'<= 1.10 x MAC ratio {mac_ratio:.2f} = {1.1 * mac_ratio:.2f}x',
                           o['infer_vs_stock'] <= 1.1 * mac_ratio if arch.startswith('resnet18') else None))
            targets = {'resnet18-nlp_headfix2-1222': (1.5, 1.5), 'mobilenet_v2-nlp_headfix2-2222121': (2.5, None)}
            infer_t, train_t = targets.get(arch, (None, None))
            for key, target in (('infer', infer_t), ('train', train_t)):
                what = 'inference' if key == 'infer' else 'train step'
                checks.append((f'paper formulation / ours, {arch} {what} time', f"{p[key + '_vs_ours']:.2f}x",
                               f'>= {target:.1f}x' if target else '-',
                               p[key + '_vs_ours'] >= target if target else None))
            for key, what in (('infer_mem', 'inference peak memory'), ('train_mem', 'training peak memory'),
                              ('saved', 'activations saved for the backward')):
                checks.append((f'paper formulation / ours, {arch} {what}', f'{p[key] / o[key]:.2f}x', '-', None))
            if arch + CODE_SUFFIX in res:
                c = res[arch + CODE_SUFFIX]
                checks.append((f"paper's code / ours, {arch} inference / train step time",
                               f"{c['infer_vs_ours']:.2f}x / {c['train_vs_ours']:.2f}x", '-', None))
            checks.append((f'max |ours - paper formulation| / max |ours|, logits of {arch} (randomised BN)',
                           f"{o['diff']:.2e}", '<= 1e-5', o['diff'] <= 1e-5))
    print_table(['model', 'GMACs/img', 'inference ms', 'train step ms', 'inference peak MiB', 'train peak MiB',
                 'saved MiB'], rows)
    print('\n# targets (CPU, fp32, ratios measured in this run)\n')
    print_table(['check', 'value', 'target', 'result'],
                [[c, v, t, '-' if ok is None else ('PASS' if ok else 'FAIL')] for c, v, t, ok in checks])


if __name__ == '__main__':
    main()
