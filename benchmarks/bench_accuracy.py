"""The paper's comparison on real data: Fashion-MNIST test top-1 of every pooling method at every first-stage stride.

    python benchmarks/bench_accuracy.py [--preset cpu|gpu|tiny] [--seeds 3] [--out DIR] [--data-dir DIR]
    python benchmarks/bench_accuracy.py --preset gpu --backbones resnet18 --strides 4 --epochs auto --budget-s 300

resnet18 and mobilenet_v2 x {skip, maxp, lip, gaussian_pool, nlp_headfix2, nlp_headfix2_nowin} x first stage at
stride {1 (the stock string), 2, 4}, each trained from scratch with several seeds by ``timm_nlp.trainer.train``
(``timm-nlp train``), the 28x28 grey images up-sampled to 64x64 so that the 4x strides still leave maps, one input
channel (the grey data as it is, which is what a deployment on it would hold). Presets:

- ``cpu`` (default without CUDA, about 50 minutes on 2 cores): a fixed class-balanced subset of 2,000 training
  images, 2 epochs, evaluated on a fixed class-balanced subset of 2,000 test images, no augmentation;
- ``gpu`` (default with CUDA): all 60,000 training and 10,000 test images, 15 epochs, the trainer's augmentation;
- ``tiny``: 512 training and 500 test images, 1 epoch, augmented: a dry run of the pipeline (``gpu_check.sh``), no
  result.

``--epochs``, ``--batch-size``, ``--lr``, ``--warmup-epochs`` and ``--workers`` override the preset (each run records
the configuration it trained with, and a run of another configuration is not reused). ``--epochs auto`` with
``--budget-s S`` sizes the epochs to the time available: one calibration epoch of the grid's network with the most
MACs (the slowest) gives the set-up time and the time per epoch, and the epochs are the most for which every run of
the grid, each assumed as slow as that one, fits in S seconds less the calibration. ``--report-only`` prints the
table of the runs recorded so far without training (after a run cut short).

Every finished run is appended to ``DIR/results.jsonl`` (its checkpoints then deleted, its ``summary.csv`` kept,
unless ``--keep-checkpoints``) and skipped when the benchmark is started again; a killed run resumes from its last
epoch's checkpoint. The table gives, per network, the mean ± standard deviation over the
seeds of the best-epoch and the last-epoch test top-1, params, MACs and the peak activation memory at 64x64
(batch 1: float32 layer by layer, and int8 under MCUNet's accounting); then, per backbone and stride, the methods
within the seeds' spread of the best and the pairs whose difference exceeds it; ``DIR/accuracy_vs_memory.png`` plots
top-1 against the int8 peak per backbone, the paper's kind of figure.
"""
import argparse
import glob
import hashlib
import json
import logging
import math
import os
import shutil
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
    'tiny': dict(train_subset=512, eval_subset=500, epochs=1, no_aug=False, batch_size=64, lr=0.02),
}
FULL_SIZES = {'train_subset': 60000, 'eval_subset': 10000}  # Fashion-MNIST's splits
# what a run trained with, besides the preset (a record without a key had the default)
CONFIG_DEFAULTS = dict(warmup_epochs=0)


def arch_string(backbone: str, method: str, stride: int) -> str:
    """The architecture string of ``backbone`` pooled with ``method``, its first stage at ``stride``."""
    return f'{backbone}-{method}-{BACKBONES[backbone].format(s=stride)}'


def grid(backbones: List[str], methods: List[str], strides: List[int], seeds: int) -> List[Tuple[str, int]]:
    """Every (architecture, seed) run, seed-major so that a partial run already covers every network once."""
    return [(arch_string(b, m, s), seed) for seed in range(seeds) for b in backbones for m in methods for s in strides]


def run_config(preset: str, **overrides) -> dict:
    """The training configuration of ``preset`` with the ``overrides`` that are not None."""
    cfg = dict(PRESETS[preset], **CONFIG_DEFAULTS)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def config_tag(cfg: dict) -> str:
    """A short name of a configuration: the folder of its runs."""
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def load_results(path: str) -> List[dict]:
    """The finished runs recorded in ``path``, each with its ``config`` (a record of an older version of this script
    gets its preset's); a line cut off by a kill is ignored."""
    done = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                r.setdefault('config', run_config(r['preset']))
                done.append(r)
    return done


def matching(results: List[dict], preset: str, cfg: dict, any_epochs: bool = False) -> Dict[Tuple[str, int], dict]:
    """The runs of ``results`` trained under ``preset`` with configuration ``cfg`` (with ``any_epochs``, whatever
    their epochs, the most common epoch count winning), by (architecture, seed); the latest record of a run wins."""
    def key(c: dict) -> dict:
        return {k: v for k, v in dict(CONFIG_DEFAULTS, **c).items() if not (any_epochs and k == 'epochs')}

    runs = [r for r in results if r['preset'] == preset and key(r['config']) == key(cfg)]
    if any_epochs and runs:
        counts: Dict[int, int] = {}
        for r in runs:
            counts[r['config']['epochs']] = counts.get(r['config']['epochs'], 0) + 1
        top = max(counts, key=lambda e: (counts[e], e))
        runs = [r for r in runs if r['config']['epochs'] == top]
    return {(r['arch'], r['seed']): r for r in runs}


def run_one(arch: str, seed: int, preset: str, cfg: dict, out: str, data_dir: str, device: str,
            workers: int = 0) -> dict:
    """Train ``arch`` with ``seed`` under configuration ``cfg`` (of ``preset``), its output in ``out``; its
    accuracies, speed, sizes and peak activation memory."""
    from timm_nlp.models import create_model
    from timm_nlp.profiler import activation_profile, count_macs
    from timm_nlp.trainer import add_train_args, train
    argv = ['--dataset', 'fashion-mnist', '--model', arch, '--in-chans', '1', '--img-size', str(IMG_SIZE),
            '--epochs', str(cfg['epochs']), '-b', str(cfg['batch_size']), '--lr', str(cfg['lr']), '--seed', str(seed),
            '--output', out, '--no-progress', '--device', device, '--workers', str(workers),
            '--warmup-epochs', str(cfg['warmup_epochs'])]
    argv += ['--data-dir', data_dir] if data_dir else []
    argv += ['--no-aug'] if cfg['no_aug'] else []
    for key in ('train_subset', 'eval_subset'):
        argv += [f"--{key.replace('_', '-')}", str(cfg[key])] if cfg[key] else []
    start = time.time()
    result = train(add_train_args(argparse.ArgumentParser()).parse_args(argv))
    seconds = time.time() - start
    size = (1, IMG_SIZE, IMG_SIZE)
    model = create_model(arch, num_classes=10, in_chans=1, device='meta')
    return dict(arch=arch, seed=seed, preset=preset, config=cfg, best_top1=result['best_top1'],
                last_top1=result['last_top1'], params=result['params'], macs=count_macs(model, size),
                peak_kib=activation_profile(model, size).peak_bytes / 1024, seconds=seconds,
                train_img_s=result['train_img_s'], eval_img_s=result['eval_img_s'], device=device)


def plan_epochs(archs: List[str], runs: int, budget_s: float, preset: str, cfg: dict, out: str, data_dir: str,
                device: str, workers: int, max_epochs: int = 50) -> Tuple[int, dict]:
    """The most epochs for which ``runs`` trainings fit in 90 % of ``budget_s`` seconds less the calibration, each as
    slow as the one of ``archs`` with the most MACs: a one-epoch calibration run of it gives the time of one epoch
    (its training and test throughput, 15 % added for the checkpoints and the loaders' start) and the rest of its
    time is set-up. Returns the epochs (at least 1) and the calibration's measurements."""
    from timm_nlp.models import create_model
    from timm_nlp.profiler import count_macs
    slowest = max(archs, key=lambda a: count_macs(create_model(a, num_classes=10, in_chans=1, device='meta'),
                                                  (1, IMG_SIZE, IMG_SIZE)))
    calib_dir = os.path.join(out, 'calibration')
    shutil.rmtree(calib_dir, ignore_errors=True)  # never a resumed (instant) run
    start = time.time()
    r = run_one(slowest, 0, preset, dict(cfg, epochs=1, warmup_epochs=0), calib_dir, data_dir, device, workers)
    spent = time.time() - start
    shutil.rmtree(calib_dir, ignore_errors=True)
    n_train = cfg['train_subset'] or FULL_SIZES['train_subset']
    n_eval = cfg['eval_subset'] or FULL_SIZES['eval_subset']
    epoch_s = 1.15 * (n_train / max(r['train_img_s'], 1e-9) + n_eval / max(r['eval_img_s'], 1e-9))
    setup_s = max(spent - epoch_s, 0.)
    left = 0.9 * (budget_s - spent)  # 10 % in hand: a run slower than the calibration's does not cut the grid short
    epochs = int(max(1, min(max_epochs, math.floor((left / runs - setup_s) / epoch_s))))
    info = dict(arch=slowest, calibration_s=spent, epoch_s=epoch_s, setup_s=setup_s, train_img_s=r['train_img_s'],
                eval_img_s=r['eval_img_s'], runs=runs, budget_s=budget_s, epochs=epochs,
                predicted_s=spent + runs * (setup_s + epochs * epoch_s))
    return epochs, info


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


def spread_report(rows: List[dict], backbones: List[str], strides: List[int]) -> List[str]:
    """Per backbone and first-stage stride: the best method by mean best-epoch top-1 and those within the seeds'
    spread of it, and every pair of methods whose means differ by more than the sum of their standard deviations."""
    from timm_nlp.tools.tables import within_spread
    lines = []
    for backbone in backbones:
        for stride in strides:
            group = {r['method']: r['best_values'] for r in rows if r['backbone'] == backbone and r['stride'] == stride}
            if not group:
                continue
            means = {m: statistics.mean(v) for m, v in group.items()}
            stds = {m: statistics.stdev(v) if len(v) > 1 else 0. for m, v in group.items()}
            top = max(means, key=means.get)
            single = sorted(m for m, v in group.items() if len(v) < 2)
            if single:
                lines.append(f"- {backbone}, stride {stride}: {top} ({means[top]:.2f}); one seed of "
                             f"{', '.join(single)}: no spread, no pair resolved")
                continue
            tied_pairs = within_spread(group)
            tied = sorted({b for a, b in tied_pairs if a == top} | {a for a, b in tied_pairs if b == top})
            lines.append(f"- {backbone}, stride {stride}: {top} ({means[top]:.2f})" + (
                f", within spread: {', '.join(tied)}" if tied else ', ahead of all others beyond the spread'))
            unresolved = {frozenset(p) for p in tied_pairs}
            order = sorted(group, key=means.get, reverse=True)
            resolved = [f'{a} > {b} by {means[a] - means[b]:.2f} (spread {stds[a] + stds[b]:.2f})'
                        for i, a in enumerate(order) for b in order[i + 1:] if frozenset((a, b)) not in unresolved]
            lines.append('  - differences beyond the spread: ' + ('; '.join(resolved) if resolved else 'none'))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='gpu' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    parser.add_argument('--strides', nargs='+', type=int, default=STRIDES, choices=STRIDES)
    parser.add_argument('--out', default=None, help='results folder (default: output/bench_accuracy/PRESET)')
    parser.add_argument('--data-dir', default='', help="Fashion-MNIST's IDX files (default: Debian's package)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--workers', type=int, default=None,
                        help='data loader workers per run (default: 0 on the CPU, else the cores less 2, at most 12)')
    parser.add_argument('--epochs', default=None,
                        help="override the preset's epochs: a number, or 'auto' (with --budget-s, see above)")
    parser.add_argument('--budget-s', type=float, default=None, help='seconds for the whole grid (--epochs auto)')
    parser.add_argument('--batch-size', type=int, default=None, help="override the preset's batch size")
    parser.add_argument('--lr', type=float, default=None, help="override the preset's learning rate")
    parser.add_argument('--warmup-epochs', type=int, default=None, help='learning-rate warm-up epochs (default 0)')
    parser.add_argument('--report-only', action='store_true', help='print the table of the recorded runs, train none')
    parser.add_argument('--keep-checkpoints', action='store_true', help="keep every finished run's checkpoints")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = args.epochs == 'auto'
    if auto and args.budget_s is None and not args.report_only:
        parser.error('--epochs auto needs --budget-s')
    cfg = run_config(args.preset, epochs=None if auto or args.epochs is None else int(args.epochs),
                     batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs)
    workers = args.workers if args.workers is not None else (
        0 if args.device == 'cpu' else max(0, min(12, (os.cpu_count() or 1) - 2)))
    out = args.out or os.path.join('output', 'bench_accuracy', args.preset)
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, 'results.jsonl')
    wanted_runs = grid(args.backbones, args.methods, args.strides, args.seeds)
    logging.basicConfig(level=logging.WARNING)
    if auto and not args.report_only:
        done = matching(load_results(results_path), args.preset, cfg, any_epochs=True)
        if done:  # a run cut short: go on with its epochs
            cfg['epochs'] = next(iter(done.values()))['config']['epochs']
            print(f"# epochs: {cfg['epochs']}, those of the {len(done)} runs already recorded", flush=True)
        else:
            archs = sorted({arch for arch, _ in wanted_runs})
            cfg['epochs'], info = plan_epochs(archs, len(wanted_runs), args.budget_s, args.preset, cfg, out,
                                              args.data_dir, args.device, workers)
            print(f"# epochs: {cfg['epochs']}, sized for {args.budget_s:.0f} s: calibration "
                  f"{info['calibration_s']:.1f} s (1 epoch of {info['arch']}: {info['train_img_s']:.0f} train img/s, "
                  f"{info['eval_img_s']:.0f} test img/s), so {info['setup_s']:.1f} s set-up + {info['epoch_s']:.1f} s "
                  "an epoch a run; "
                  f"{info['runs']} runs predicted to take {info['predicted_s']:.0f} s in all", flush=True)
            with open(os.path.join(out, 'plan.json'), 'w') as f:
                json.dump(info, f, indent=1)
    done = matching(load_results(results_path), args.preset, cfg, any_epochs=auto and args.report_only)
    if done and auto and args.report_only:
        cfg['epochs'] = next(iter(done.values()))['config']['epochs']
    runs = [done[k] for k in wanted_runs if k in done]
    todo = [] if args.report_only else [k for k in wanted_runs if k not in done]
    runs_dir = os.path.join(out, 'runs', config_tag(cfg))
    from tqdm import tqdm
    with tqdm(total=len(todo) + len(runs), initial=len(runs), desc='bench_accuracy', file=sys.stderr,
              disable=not todo) as bar:
        for arch, seed in todo:
            bar.set_postfix_str(f'{arch} seed {seed}')
            run_dir = os.path.join(runs_dir, arch, f'seed{seed}')
            r = run_one(arch, seed, args.preset, cfg, run_dir, args.data_dir, args.device, workers)
            with open(results_path, 'a') as f:
                f.write(json.dumps(r) + '\n')
            if not args.keep_checkpoints:  # recorded: its summary.csv and model.safetensors stay, its training
                for name in glob.glob(os.path.join(run_dir, '*.pth.tar')):  # checkpoints (~400 MB) go
                    os.remove(name)
            runs.append(r)
            bar.update()
            tqdm.write(f"# {arch} seed {seed}: best {r['best_top1']:.2f}, last {r['last_top1']:.2f}, "
                       f"{r['seconds']:.1f} s, {r['train_img_s']:.0f} train img/s", file=sys.stdout)
    if not runs:
        print(f'no finished run of this grid and configuration in {results_path}')
        return
    rows = summarize(runs)
    seeds_done = sorted({len(r['best_values']) for r in rows})
    n_train, n_eval = cfg['train_subset'] or FULL_SIZES['train_subset'], cfg['eval_subset'] or FULL_SIZES['eval_subset']
    epochs = f"{cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''}"
    print(f"\nFashion-MNIST, preset {args.preset}: {n_train} training images, {epochs}, {n_eval} test "
          f"images, {'no augmentation' if cfg['no_aug'] else 'augmented'}, batch {cfg['batch_size']}, lr {cfg['lr']}"
          + (f", {cfg['warmup_epochs']} warm-up epochs" if cfg['warmup_epochs'] else '')
          + f", {IMG_SIZE}x{IMG_SIZE} grey input, {'/'.join(map(str, seeds_done))} of {args.seeds} seeds, device "
          f"{runs[0].get('device', '?')}; test top-1 mean ± std over the seeds\n")
    from timm_nlp.tools.tables import markdown_table, mean_std
    stock = {r['backbone']: r for r in rows if r['method'] == 'skip' and r['stride'] == 1}
    print(markdown_table(
        ['network', 'best-epoch top-1 (%)', 'last-epoch top-1 (%)', 'params (M)', 'GMACs', 'peak fp32 (KiB)',
         'peak int8, mcunet (KiB)', 'int8 reduction vs stock'],
        [[r['arch'], mean_std(r['best_values']), mean_std(r['last_values']),
          f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}", f"{r['peak_kib']:.0f}", f"{r['int8_kib']:.1f}",
          f"{stock[r['backbone']]['int8_kib'] / r['int8_kib']:.2f}x" if r['backbone'] in stock else '-']
         for r in rows]))
    print('\nPer backbone and first-stage stride, the best method by mean best-epoch top-1, those within the seeds\' '
          'spread of it (|mean difference| <= the sum of the two standard deviations), and the pairs whose difference '
          'exceeds that spread:')
    print('\n'.join(spread_report(rows, args.backbones, args.strides)))
    print(f"\ntime: {sum(r['seconds'] for r in runs):.0f} s of training for {len(runs)} runs "
          f"({statistics.mean(r.get('train_img_s', float('nan')) for r in runs):.0f} train img/s on average)")
    try:
        plot(rows, os.path.join(out, 'accuracy_vs_memory.png'))
        print(f"\nplot: {os.path.join(out, 'accuracy_vs_memory.png')}")
    except ImportError:
        print('\nno plot: matplotlib is not installed (pip install "timm-nlp[plot]")')


if __name__ == '__main__':
    main()
