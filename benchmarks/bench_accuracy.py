"""The paper's comparison on real data: Fashion-MNIST test top-1 of every pooling method at every first-stage stride.

    python benchmarks/bench_accuracy.py [--preset cpu|gpu] [--seeds 3] [--out DIR] [--data-dir DIR]

resnet18 and mobilenet_v2 x {skip, maxp, lip, gaussian_pool, nlp_headfix2, nlp_headfix2_nowin} x first stage at
stride {1 (the stock string), 2, 4}, each trained from scratch with several seeds by ``timm_nlp.trainer.train``
(``timm-nlp train``), the 28x28 grey images up-sampled to 64x64 so that the 4x strides still leave maps, one input
channel (the grey data as it is, which is what a deployment on it would hold). Presets:

- ``cpu`` (default without CUDA, about 50 minutes on 2 cores): a fixed class-balanced subset of 2,000 training
  images, 2 epochs, evaluated on a fixed class-balanced subset of 2,000 test images, no augmentation;
- ``gpu`` (default with CUDA): all 60,000 training and 10,000 test images, 15 epochs, the trainer's augmentation.

Every finished run is appended to ``DIR/results.jsonl`` (its checkpoints then deleted, its ``summary.csv`` kept,
unless ``--keep-checkpoints``) and skipped when the benchmark is started again; a killed run resumes from its last
epoch's checkpoint. The table gives, per network, the mean ± standard deviation over the
seeds of the best-epoch and the last-epoch test top-1, params, MACs and the peak activation memory at 64x64
(batch 1: float32 layer by layer, and int8 under MCUNet's accounting); ``DIR/accuracy_vs_memory.png`` plots top-1
against the int8 peak per backbone, the paper's kind of figure.
"""
import argparse
import glob
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch

BACKBONES = {'resnet18': '{s}222', 'mobilenet_v2': '{s}222121'}
METHODS = ['skip', 'maxp', 'lip', 'gaussian_pool', 'nlp_headfix2', 'nlp_headfix2_nowin']
STRIDES = [1, 2, 4]
IMG_SIZE = 64
PRESETS = {
    'cpu': dict(train_subset=2000, eval_subset=2000, epochs=2, no_aug=True, batch_size=32, lr=0.005),
    'gpu': dict(train_subset=None, eval_subset=None, epochs=15, no_aug=False, batch_size=128, lr=0.02),
}


def arch_string(backbone: str, method: str, stride: int) -> str:
    """The architecture string of ``backbone`` pooled with ``method``, its first stage at ``stride``."""
    return f'{backbone}-{method}-{BACKBONES[backbone].format(s=stride)}'


def grid(backbones: List[str], methods: List[str], strides: List[int], seeds: int) -> List[Tuple[str, int]]:
    """Every (architecture, seed) run, seed-major so that a partial run already covers every network once."""
    return [(arch_string(b, m, s), seed) for seed in range(seeds) for b in backbones for m in methods for s in strides]


def load_results(path: str) -> Dict[Tuple[str, int], dict]:
    """The finished runs recorded in ``path`` by (architecture, seed); a line cut off by a kill is ignored."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[(r['arch'], r['seed'])] = r
    return done


def run_one(arch: str, seed: int, preset: str, out: str, data_dir: str, device: str) -> dict:
    """Train ``arch`` with ``seed`` under ``preset``; its accuracies, sizes and peak activation memory."""
    from timm_nlp.models import create_model
    from timm_nlp.profiler import activation_profile, count_macs
    from timm_nlp.trainer import add_train_args, train
    cfg = PRESETS[preset]
    argv = ['--dataset', 'fashion-mnist', '--model', arch, '--in-chans', '1', '--img-size', str(IMG_SIZE),
            '--epochs', str(cfg['epochs']), '-b', str(cfg['batch_size']), '--lr', str(cfg['lr']), '--seed', str(seed),
            '--output', os.path.join(out, 'runs', arch, f'seed{seed}'), '--no-progress', '--device', device]
    argv += ['--data-dir', data_dir] if data_dir else []
    argv += ['--no-aug'] if cfg['no_aug'] else []
    for key in ('train_subset', 'eval_subset'):
        argv += [f"--{key.replace('_', '-')}", str(cfg[key])] if cfg[key] else []
    start = time.time()
    result = train(add_train_args(argparse.ArgumentParser()).parse_args(argv))
    seconds = time.time() - start
    size = (1, IMG_SIZE, IMG_SIZE)
    model = create_model(arch, num_classes=10, in_chans=1, device='meta')
    return dict(arch=arch, seed=seed, preset=preset, best_top1=result['best_top1'], last_top1=result['last_top1'],
                params=result['params'], macs=count_macs(model, size),
                peak_kib=activation_profile(model, size).peak_bytes / 1024, seconds=seconds)


def int8_peak_kib(arch: str) -> float:
    """The int8 peak activation memory at 64 x 64 under MCUNet's accounting (whole-map, grey input)."""
    from timm_nlp.models import create_model
    from timm_nlp.profiler import activation_profile
    model = create_model(arch, num_classes=10, in_chans=1, device='meta')
    return activation_profile(model, (1, IMG_SIZE, IMG_SIZE), dtype='int8', accounting='mcunet').peak_bytes / 1024


def summarize(results: List[dict]) -> List[dict]:
    """One row per architecture: the seeds' mean and standard deviation of both top-1s, and its sizes."""
    by_arch: Dict[str, List[dict]] = {}
    for r in results:
        by_arch.setdefault(r['arch'], []).append(r)
    rows = []
    for arch, runs in by_arch.items():
        backbone, method, strides = arch.split('-')
        best, last = [r['best_top1'] for r in runs], [r['last_top1'] for r in runs]
        rows.append(dict(arch=arch, backbone=backbone, method=method, stride=int(strides[0]), seeds=len(runs),
                         best=statistics.mean(best), best_std=statistics.stdev(best) if len(best) > 1 else 0.,
                         last=statistics.mean(last), last_std=statistics.stdev(last) if len(last) > 1 else 0.,
                         best_values=best, last_values=last, params=runs[0]['params'], macs=runs[0]['macs'],
                         peak_kib=runs[0]['peak_kib'], int8_kib=int8_peak_kib(arch)))
    return rows


def plot(rows: List[dict], path: str) -> None:
    """Best-epoch top-1 (mean, error bar: the seeds' std) against the int8 peak activation memory, one panel per
    backbone."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    backbones = sorted({r['backbone'] for r in rows})
    fig, axes = plt.subplots(1, len(backbones), figsize=(6.5 * len(backbones), 4.8), squeeze=False)
    markers = dict(zip(METHODS, 'os^Dvx'))
    for ax, backbone in zip(axes[0], backbones):
        for method in METHODS:
            pts = sorted((r['int8_kib'], r['best'], r['best_std']) for r in rows
                         if r['backbone'] == backbone and r['method'] == method)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker=markers[method], capsize=3, label=method, linewidth=1)
        ax.set_xscale('log')
        ax.set_xlabel(f'peak activation memory (KiB, {IMG_SIZE}x{IMG_SIZE}, int8, MCUNet accounting, log)')
        ax.set_ylabel('Fashion-MNIST best-epoch test top-1 (%)')
        ax.set_title(f'{backbone}: first stage at stride 1, 2, 4 (right to left)')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='gpu' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    parser.add_argument('--strides', nargs='+', type=int, default=STRIDES, choices=STRIDES)
    parser.add_argument('--out', default=None, help='results folder (default: output/bench_accuracy/PRESET)')
    parser.add_argument('--data-dir', default='', help="Fashion-MNIST's IDX files (default: Debian's package)")
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--keep-checkpoints', action='store_true', help="keep every finished run's checkpoints")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join('output', 'bench_accuracy', args.preset)
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, 'results.jsonl')
    done = load_results(results_path)
    todo = [(arch, seed) for arch, seed in grid(args.backbones, args.methods, args.strides, args.seeds)
            if (arch, seed) not in done or done[(arch, seed)]['preset'] != args.preset]
    logging.basicConfig(level=logging.WARNING)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    from tqdm import tqdm
    runs = [done[k] for k in done if k[1] < args.seeds and done[k]['preset'] == args.preset]
    with tqdm(total=len(todo) + len(runs), initial=len(runs), desc='bench_accuracy', file=sys.stderr) as bar:
        for arch, seed in todo:
            bar.set_postfix_str(f'{arch} seed {seed}')
            r = run_one(arch, seed, args.preset, out, args.data_dir, device)
            with open(results_path, 'a') as f:
                f.write(json.dumps(r) + '\n')
            if not args.keep_checkpoints:  # recorded: its summary.csv stays, its checkpoints (~400 MB) go
                for name in glob.glob(os.path.join(out, 'runs', arch, f'seed{seed}', '*.safetensors')):
                    os.remove(name)
            runs.append(r)
            bar.update()
    wanted = {arch for arch, _ in grid(args.backbones, args.methods, args.strides, args.seeds)}
    rows = summarize([r for r in runs if r['arch'] in wanted])
    cfg = PRESETS[args.preset]
    print(f"\nFashion-MNIST, preset {args.preset}: {cfg['train_subset'] or 60000} training images, {cfg['epochs']} "
          f"epochs, {cfg['eval_subset'] or 10000} test images, {'no augmentation' if cfg['no_aug'] else 'augmented'}, "
          f"batch {cfg['batch_size']}, lr {cfg['lr']}, {IMG_SIZE}x{IMG_SIZE} grey input, {args.seeds} seeds; "
          'test top-1 mean ± std over the seeds\n')
    from timm_nlp.tools.tables import markdown_table, within_spread
    stock = {r['backbone']: r for r in rows if r['method'] == 'skip' and r['stride'] == 1}
    print(markdown_table(
        ['network', 'best-epoch top-1 (%)', 'last-epoch top-1 (%)', 'params (M)', 'GMACs', 'peak fp32 (KiB)',
         'peak int8, mcunet (KiB)', 'int8 reduction vs stock'],
        [[r['arch'], f"{r['best']:.2f} ± {r['best_std']:.2f}", f"{r['last']:.2f} ± {r['last_std']:.2f}",
          f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}", f"{r['peak_kib']:.0f}", f"{r['int8_kib']:.1f}",
          f"{stock[r['backbone']]['int8_kib'] / r['int8_kib']:.2f}x" if r['backbone'] in stock else '-']
         for r in rows]))
    print('\nPer backbone and first-stage stride, the best method by mean best-epoch top-1, and those within the '
          'seeds\' spread of it (|mean difference| <= the sum of the two standard deviations):')
    for backbone in args.backbones:
        for stride in args.strides:
            group = {r['method']: r['best_values'] for r in rows if r['backbone'] == backbone and r['stride'] == stride}
            if not group:
                continue
            top = max(group, key=lambda m: statistics.mean(group[m]))
            tied = sorted({b for a, b in within_spread(group) if a == top} | {a for a, b in within_spread(group)
                                                                              if b == top})
            print(f"- {backbone}, stride {stride}: {top} ({statistics.mean(group[top]):.2f})"
                  + (f", within spread: {', '.join(tied)}" if tied else ', ahead of all others beyond the spread'))
    try:
        plot(rows, os.path.join(out, 'accuracy_vs_memory.png'))
        print(f"\nplot: {os.path.join(out, 'accuracy_vs_memory.png')}")
    except ImportError:
        print('\nno plot: matplotlib is not installed (pip install "timm-nlp[plot]")')


if __name__ == '__main__':
    main()
