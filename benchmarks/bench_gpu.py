"""The networks of bench_models.py on a CUDA GPU: resnet18-nlp_headfix2-1222 next to stock timm and the paper code's
formulation, and resnet18-nlp_headfix2_nowin_reduced-1222.

    python benchmarks/bench_gpu.py [--batch 8 64] [--img-size 224] [--repeats 20]

For information: the targets are CPU ones (bench_models.py). Per batch size and model: inference (eval, no
grad) and a training step (forward, backward, SGD), in fp32 (NCHW, PyTorch's default TF32 settings) and in bf16
autocast with channels_last, cudnn.benchmark on. Time: median of ``--repeats`` calls timed with CUDA events after 3
warm-up calls. Peak: the most GPU memory allocated during one call above what was allocated before it (the model,
its gradients and optimizer state excluded).
"""
import argparse
import copy
import statistics
from typing import Callable, Dict

import timm
import torch
from torch import nn

from _bench import print_table
from bench_models import paper_formulation, randomized
import timm_nlp
from timm_nlp.profiler import count_macs

MiB = 2 ** 20
MODES = ('fp32', 'bf16 cl')
STOCK, OURS, REDUCED = 'resnet18 (stock timm)', 'resnet18-nlp_headfix2-1222', 'resnet18-nlp_headfix2_nowin_reduced-1222'
PLAIN = OURS + ', paper formulation'


def step_fn(model: nn.Module, x: torch.Tensor, train: bool, bf16: bool) -> Callable[[], object]:
    """One inference call or training step of ``model`` on ``x``; bf16 autocast runs in channels_last."""
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run():
        model.train(train)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
            out = model(x)
            if not train:
                return out
            loss = nn.functional.cross_entropy(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def measure(fn: Callable[[], object], repeats: int) -> Dict[str, float]:
    """Median seconds per call (CUDA events) and peak bytes allocated by one call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {'time': statistics.median(times), 'peak': torch.cuda.max_memory_allocated() - base}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, nargs='+', default=[8, 64])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('bench_gpu.py needs a CUDA device (the CPU benchmark is bench_models.py)')
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    print(f'# bench_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{args.img_size}x{args.img_size}; median of {args.repeats} calls after 3 warm-up calls (CUDA events); '
          'peak: max GPU memory allocated during one call above the level before it; fp32 = NCHW, PyTorch default '
          'TF32 settings; bf16 cl = bf16 autocast + channels_last\n')
    ours = randomized(timm_nlp.create_model(OURS))
    cpu_models = {STOCK: timm.create_model('resnet18'), OURS: ours, PLAIN: paper_formulation(ours),
                  REDUCED: randomized(timm_nlp.create_model(REDUCED))}
    size = (3, args.img_size, args.img_size)
    macs = {name: count_macs(m, size) for name, m in cpu_models.items()}
    models = {name: m.cuda() for name, m in cpu_models.items()}
    x = torch.randn(2, *size, device='cuda')
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        diff = (models[PLAIN].eval()(x) - models[OURS].eval()(x)).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    checks = [('max |ours - paper formulation| logits, fp32 eval without TF32 (randomised BN)', f'{diff:.2e}')]
    for batch in args.batch:
        x = torch.randn(batch, *size, device='cuda')
        res = {name: {(train, mode): measure(step_fn(copy.deepcopy(m), x, train, mode != 'fp32'), args.repeats)
                      for train in (False, True) for mode in MODES} for name, m in models.items()}
        stock = res[STOCK]
        rows = [[name, f'{macs[name] / 1e9:.2f}'] + [
            f"{r[key]['time'] * 1e3:.1f} ({r[key]['time'] / stock[key]['time']:.2f}x)"
            for key in ((False, MODES[0]), (False, MODES[1]), (True, MODES[0]), (True, MODES[1]))] + [
            f"{r[(True, mode)]['peak'] / MiB:.0f}" for mode in MODES] for name, r in res.items()]
        print(f'## batch {batch}\n')
        print_table(['model', 'GMACs/img', 'infer fp32 ms (vs stock)', 'infer bf16 cl ms (vs stock)',
                     'train fp32 ms (vs stock)', 'train bf16 cl ms (vs stock)', 'train fp32 peak MiB',
                     'train bf16 cl peak MiB'], rows)
        print()
        o, p, red = res[OURS], res[PLAIN], res[REDUCED]
        for mode in MODES:
            t, i = (True, mode), (False, mode)
            checks += [
                (f'batch {batch}, {mode}: nlp_headfix2_1222 / stock inference time (MAC ratio '
                 f'{macs[OURS] / macs[STOCK]:.2f})', f"{o[i]['time'] / stock[i]['time']:.2f}x"),
                (f'batch {batch}, {mode}: nlp_headfix2_nowin_reduced_1222 / stock inference time (MAC ratio '
                 f'{macs[REDUCED] / macs[STOCK]:.2f})', f"{red[i]['time'] / stock[i]['time']:.2f}x"),
                (f'batch {batch}, {mode}: paper formulation / ours inference time',
                 f"{p[i]['time'] / o[i]['time']:.2f}x"),
                (f'batch {batch}, {mode}: paper formulation / ours training step time',
                 f"{p[t]['time'] / o[t]['time']:.2f}x"),
                (f'batch {batch}, {mode}: paper formulation / ours training peak memory',
                 f"{p[t]['peak'] / o[t]['peak']:.2f}x"),
            ]
    print('# ratios (GPU, for information; the targets are CPU ones, see bench_models.py)\n')
    print_table(['ratio', 'value'], [list(c) for c in checks])


if __name__ == '__main__':
    main()
