"""The networks of bench_models.py on a CUDA GPU: resnet18-nlp_headfix2-1222 next to stock timm and the paper code's
formulation, and resnet18-nlp_headfix2_nowin_reduced-1222.

    python benchmarks/bench_gpu.py [--batch auto 8] [--img-size 224] [--repeats 20] [--json PATH]
    python benchmarks/bench_gpu.py --device cpu --tiny   # a dry run of this script on the CPU: no result

For information: the targets are CPU ones (bench_models.py). Per batch size and model: inference (eval, no
grad) and a training step (forward, backward, SGD), in fp32 (NCHW, PyTorch's default TF32 settings) and in bf16
autocast with channels_last, cudnn.benchmark on. Time: median of ``--repeats`` calls timed with CUDA events after 3
warm-up calls. Peak: the most GPU memory allocated during one call above what was allocated before it (the model,
its gradients and optimizer state excluded). ``--batch auto`` sizes a batch for the card: the largest power of two
up to 256 for which the paper formulation's fp32 training step (about 0.32 GiB an image at 224 px, its (B, 2, 3136,
3136) attention maps) takes at most half the GPU's memory; a configuration that runs out of memory is reported as
such and the others go on. ``--json`` writes every measurement (rewritten after each batch size, so a run cut short
keeps what it measured).

``--device cpu`` (wall-clock timing, peak resident memory as bench_models.py measures it, bf16 autocast on the CPU)
exists for dry runs of ``benchmarks/gpu_check.sh``; ``--tiny`` shrinks the run to 64 px, batch 2, 2 repeats.
"""
import argparse
import copy
import json
import platform
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import timm
import torch
from torch import nn

from _bench import peak_memory, print_table
from bench_models import paper_formulation, randomized
import timm_nlp
from timm_nlp.profiler import count_macs

MiB = 2 ** 20
GiB = 2 ** 30
MODES = ('fp32', 'bf16 cl')
STOCK, OURS, REDUCED = 'resnet18 (stock timm)', 'resnet18-nlp_headfix2-1222', 'resnet18-nlp_headfix2_nowin_reduced-1222'
PLAIN = OURS + ', paper formulation'
PLAIN_BYTES_PER_IMAGE = 0.4 * GiB  # the paper formulation's fp32 train step at 224 px (0.32 GiB measured on the CPU)
Key = Tuple[bool, str]  # (train, mode)


def step_fn(model: nn.Module, x: torch.Tensor, train: bool, bf16: bool) -> Callable[[], object]:
    """One inference call or training step of ``model`` on ``x``; bf16 autocast runs in channels_last."""
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run():
        model.train(train)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
            out = model(x)
            if not train:
                return out
            loss = nn.functional.cross_entropy(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def measure(fn: Callable[[], object], repeats: int, device: str, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call (CUDA events; wall clock on the CPU) and peak bytes allocated by one call (resident
    bytes on the CPU)."""
    cuda = device == 'cuda'
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if not cuda:
        return {'time': statistics.median(times), 'peak': float(peak_memory(fn))}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {'time': statistics.median(times), 'peak': float(torch.cuda.max_memory_allocated() - base)}


def measure_or_oom(model: nn.Module, x: torch.Tensor, train: bool, mode: str, repeats: int,
                   warmup: int) -> Optional[Dict[str, float]]:
    """``measure`` of a fresh copy of ``model``, or None where it runs out of GPU memory."""
    try:
        return measure(step_fn(copy.deepcopy(model), x, train, mode != 'fp32'), repeats, x.device.type, warmup)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if x.device.type == 'cuda':
            torch.cuda.empty_cache()


def auto_batch(device: str) -> int:
    """The largest power of two up to 256 whose paper-formulation fp32 training step at 224 px needs at most half
    the GPU's memory (8 on the CPU)."""
    if device != 'cuda':
        return 8
    budget = torch.cuda.get_device_properties(0).total_memory / 2
    batch = 8
    while batch < 256 and 2 * batch * PLAIN_BYTES_PER_IMAGE <= budget:
        batch *= 2
    return batch


def _fmt_time(r: Optional[Dict[str, float]], s: Optional[Dict[str, float]]) -> str:
    if r is None:
        return 'OOM'
    return f"{r['time'] * 1e3:.1f}" + (f" ({r['time'] / s['time']:.2f}x)" if s is not None else '')


def _ratio(a: Optional[Dict[str, float]], b: Optional[Dict[str, float]], key: str) -> str:
    return f'{a[key] / b[key]:.2f}x' if a is not None and b is not None and b[key] > 0 else '-'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', nargs='+', default=['auto', '8'],
                        help="batch sizes; 'auto': sized for the GPU's memory (see above)")
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                        help='cpu: a dry run of the script (wall-clock times, resident memory), not a GPU result')
    parser.add_argument('--tiny', action='store_true', help='64 px, batch 2, 2 repeats, 1 warm-up: a dry run')
    parser.add_argument('--json', default='', help='write every measurement to this JSON file')
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('bench_gpu.py needs a CUDA device (the CPU benchmark is bench_models.py; --device cpu '
                         'dry-runs this script)')
    warmup = 3
    if args.tiny:
        args.img_size, args.batch, args.repeats, warmup = 64, ['2'], 2, 1
    batches = [auto_batch(args.device) if b == 'auto' else int(b) for b in args.batch]
    dev = args.device
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    card = torch.cuda.get_device_name() if dev == 'cuda' else f'CPU ({platform.processor() or platform.machine()}, ' \
                                                              f'{torch.get_num_threads()} threads; a dry run)'
    print(f'# bench_gpu: {card}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{args.img_size}x{args.img_size}, batch {", ".join(map(str, batches))}; median of {args.repeats} calls '
          f'after {warmup} warm-up calls ({"CUDA events" if dev == "cuda" else "wall clock"}); peak: max '
          f'{"GPU memory allocated" if dev == "cuda" else "resident memory"} during one call above the level '
          'before it; fp32 = NCHW, PyTorch default TF32 settings; bf16 cl = bf16 autocast + channels_last\n',
          flush=True)
    ours = randomized(timm_nlp.create_model(OURS))
    cpu_models = {STOCK: timm.create_model('resnet18'), OURS: ours, PLAIN: paper_formulation(ours),
                  REDUCED: randomized(timm_nlp.create_model(REDUCED))}
    size = (3, args.img_size, args.img_size)
    macs = {name: count_macs(m, size) for name, m in cpu_models.items()}
    models = {name: m.to(dev) for name, m in cpu_models.items()}
    x = torch.randn(2, *size, device=dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        y = models[OURS].eval()(x)
        diff = ((models[PLAIN].eval()(x) - y).abs().max() / y.abs().max()).item()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    checks = [('max abs(ours - paper formulation) / max abs(ours), logits, fp32 eval without TF32 (randomised BN)',
               f'{diff:.2e}')]
    record = dict(card=card, device=dev, torch=torch.__version__, timm=timm.__version__, img_size=args.img_size,
                  repeats=args.repeats, warmup=warmup, macs=macs, logits_rel_diff=diff, batches={})
    for batch in batches:
        x = torch.randn(batch, *size, device=dev)
        res: Dict[str, Dict[Key, Optional[Dict[str, float]]]] = {
            name: {(train, mode): measure_or_oom(m, x, train, mode, args.repeats, warmup)
                   for train in (False, True) for mode in MODES} for name, m in models.items()}
        stock = res[STOCK]
        keys = ((False, MODES[0]), (False, MODES[1]), (True, MODES[0]), (True, MODES[1]))
        rows = [[name, f'{macs[name] / 1e9:.2f}'] + [_fmt_time(r[k], stock[k]) for k in keys] + [
            'OOM' if r[k] is None else f"{r[k]['peak'] / MiB:.0f}" for k in keys] for name, r in res.items()]
        print(f'## batch {batch}\n')
        print_table(['model', 'GMACs/img', 'infer fp32 ms (vs stock)', 'infer bf16 cl ms (vs stock)',
                     'train fp32 ms (vs stock)', 'train bf16 cl ms (vs stock)', 'infer fp32 peak MiB',
                     'infer bf16 cl peak MiB', 'train fp32 peak MiB', 'train bf16 cl peak MiB'], rows)
        print(flush=True)
        o, p, red = res[OURS], res[PLAIN], res[REDUCED]
        for mode in MODES:
            t, i = (True, mode), (False, mode)
            checks += [
                (f'batch {batch}, {mode}: nlp_headfix2_1222 / stock inference time (MAC ratio '
                 f'{macs[OURS] / macs[STOCK]:.2f})', _ratio(o[i], stock[i], 'time')),
                (f'batch {batch}, {mode}: nlp_headfix2_nowin_reduced_1222 / stock inference time (MAC ratio '
                 f'{macs[REDUCED] / macs[STOCK]:.2f})', _ratio(red[i], stock[i], 'time')),
                (f'batch {batch}, {mode}: paper formulation / ours inference time', _ratio(p[i], o[i], 'time')),
                (f'batch {batch}, {mode}: paper formulation / ours training step time', _ratio(p[t], o[t], 'time')),
                (f'batch {batch}, {mode}: paper formulation / ours inference peak memory',
                 _ratio(p[i], o[i], 'peak')),
                (f'batch {batch}, {mode}: paper formulation / ours training peak memory',
                 _ratio(p[t], o[t], 'peak')),
            ]
        record['batches'][str(batch)] = {name: [dict(train=k[0], mode=k[1], **(v or {'oom': True}))
                                                for k, v in r.items()] for name, r in res.items()}
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(dict(record, checks=checks), f, indent=1)
    print('# ratios (for information; the targets are CPU ones, see bench_models.py)\n')
    print_table(['ratio', 'value'], [list(c) for c in checks])


if __name__ == '__main__':
    main()
