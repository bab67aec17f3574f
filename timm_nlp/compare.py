"""``timm-nlp compare``, the main job: train networks that down-sample early in different ways with one recipe, and
show what each costs and keeps: test top-1, MACs and peak activation memory per model, as a table and a picture of
accuracy against memory (``OUTPUT/results.md``, ``OUTPUT/accuracy_vs_memory.png``).

The default models are MobileNetV2 (the paper's network) down-sampling its first stage by 4 in each way the paper
compares, against the stock strides: its strided convolution (skip), a local pool (LIP), the non-local pool, and a
max pre-pool on the stem. A column is one ``Column`` of ``COLUMNS``: a header and the value of a trained model.
"""
import argparse
import copy
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .models import create_model
from .patching import lowest_patched_profile
from .profiler import activation_profile, count_macs
from .tools.tables import markdown_table, mean_std, within_spread
from .trainer import parse_models, train

__all__ = ['COMPARE_MODELS', 'COMPARE_DEFAULTS', 'COLUMNS', 'Column', 'ModelResult', 'compare', 'plot_accuracy_memory']

COMPARE_MODELS = (
    'mobilenetv2_skip_1222121', 'mobilenetv2_skip_4222121', 'mobilenetv2_lip_4222121',
    'mobilenetv2_nlp_headfix2_4222121', 'prepool_maxp_4_mobilenetv2_skip_1222121',
)
# the digits, grey, at 32 x 32: the first stage's maps (16 x 16) outweigh the rest, so where and how much a model
# down-samples shows in its memory; one CPU thread, the fastest for networks this small (several threads spend more
# time waiting for each other than computing, and far more on a shared machine); about two minutes on a CPU core
COMPARE_DEFAULTS = dict(output='output/compare', epochs=4, batch_size=32, img_size=32, in_chans=1, threads=1)
PATCHES = 4


@dataclass
class ModelResult:
    """One model of the comparison: its runs (one per seed, ``timm_nlp.trainer.train``'s results) and the meta-device
    model its costs are counted on."""
    name: str
    runs: List[dict]
    model: torch.nn.Module
    input_size: tuple

    def top1(self, key: str) -> List[float]:
        return [r[key] for r in self.runs]

    def peak_kib(self, dtype: str = 'float32', accounting: str = 'layers') -> float:
        return activation_profile(self.model, self.input_size, dtype=dtype, accounting=accounting).peak_bytes / 1024

    def patched_int8_kib(self) -> Optional[float]:
        """The int8 mcunet peak of patch-based execution (4 x 4 patches, the best split), None where none applies."""
        try:
            return lowest_patched_profile(self.model, self.input_size, PATCHES, dtype='int8')[1].peak_bytes / 1024
        except ValueError:
            return None


@dataclass
class Column:
    header: str
    value: Callable[[ModelResult], str]


COLUMNS = [
    Column('best-epoch top-1 (%)', lambda r: mean_std(r.top1('best_top1'))),
    Column('last-epoch top-1 (%)', lambda r: mean_std(r.top1('last_top1'))),
    Column('params (M)', lambda r: f"{r.runs[0]['params'] / 1e6:.2f}"),
    Column('MMACs', lambda r: f'{count_macs(r.model, r.input_size) / 1e6:.1f}'),
    Column('peak fp32 (KiB)', lambda r: f'{r.peak_kib():.0f}'),
    Column('peak int8 (KiB)', lambda r: f"{r.peak_kib('int8', 'mcunet'):.1f}"),
    Column(f'int8, {PATCHES}x{PATCHES} patches (KiB)',
           lambda r: f'{kib:.1f}' if (kib := r.patched_int8_kib()) is not None else '-'),
    Column('TFLite Micro head, counted (KiB)', lambda r: f"{r.peak_kib('int8', 'tflm'):.1f}"),
    Column('train img/s', lambda r: f"{statistics.mean(run['train_img_s'] for run in r.runs):.0f}"),
]


def plot_accuracy_memory(results: Sequence[ModelResult], path: str, title: str) -> bool:
    """Best-epoch top-1 against the int8 peak activation memory, whole-map and patch-based, one point per model
    (matplotlib, the ``plot`` extra); False where matplotlib is not installed.

    Args:
        results: The compared models.
        path: The PNG to write.
        title: The plot's title.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        top1 = r.top1('best_top1')
        mean, std = statistics.mean(top1), statistics.stdev(top1) if len(top1) > 1 else 0.
        color = f'C{i}'
        whole, patched = r.peak_kib('int8', 'mcunet'), r.patched_int8_kib()
        ax.errorbar([whole], [mean], yerr=[std], fmt='o', color=color, label=r.name, capsize=3)
        if patched is not None:
            ax.errorbar([patched], [mean], yerr=[std], fmt='o', mfc='none', color=color, capsize=3)
            ax.plot([patched, whole], [mean, mean], ':', color=color, linewidth=1)
    ax.set_xlim(left=0)
    ax.set_xlabel(f'peak activation memory, int8, MCUNet accounting (KiB; filled: whole map, hollow: '
                  f'{PATCHES}x{PATCHES} patches)')
    ax.set_ylabel('best-epoch test top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(args: argparse.Namespace) -> List[ModelResult]:
    """Train every model of ``args.models`` with ``args.seeds`` seeds (seed, seed + 1, ...), print the table and
    write it, with the plot, to ``args.output``.

    Args:
        args: ``timm-nlp compare`` arguments (``timm-nlp train``'s, ``models`` and ``seeds``).

    Returns:
        The models' results (empty on a non-zero rank under torchrun).
    """
    if args.resume not in ('auto', 'none'):
        raise ValueError(f"--resume {args.resume}: compare resumes each model from its own folder; use 'auto' or "
                         "'none'.")
    runs: Dict[str, List[dict]] = {}
    for name in parse_models(args.models):
        for k in range(args.seeds):
            run = copy.copy(args)
            run.model, run.seed = name, args.seed + k
            run.output = os.path.join(args.output, name) if args.seeds == 1 else \
                os.path.join(args.output, name, f'seed{run.seed}')
            result = train(run)
            if result.get('output') is not None:  # None: a non-zero rank under torchrun
                runs.setdefault(name, []).append(result)
    size = (args.in_chans, args.img_size, args.img_size)
    results = [ModelResult(name, r, create_model(name, num_classes=r[0]['num_classes'], in_chans=args.in_chans,
                                                 device='meta'), size) for name, r in runs.items()]
    if not results:
        return results
    # the top-1 columns are of the weights that rank the checkpoints and are exported: the EMA's with EMA
    ema = [r.name for r in results if r.runs[0]['eval_metric'] == 'ema_top1']
    note = ', top-1 of the EMA weights' + (f" ({', '.join(ema)})" if len(ema) < len(results) else '') if ema else ''
    seeds = f'{args.seeds} seeds each ({args.seed}..{args.seed + args.seeds - 1}), mean ± std' if args.seeds > 1 \
        else f'seed {args.seed}'
    chans = 'grey' if args.in_chans == 1 else 'RGB'
    title = f'{len(results)} models, {args.epochs} epochs, {seeds}, {args.img_size}x{args.img_size} {chans} input, ' \
            f'test top-1{note}; memory of batch 1'
    lines = [title, '', markdown_table(['model'] + [c.header for c in COLUMNS],
                                       [[r.name] + [c.value(r) for c in COLUMNS] for r in results])]
    if args.seeds > 1:
        pairs = within_spread({r.name: r.top1('best_top1') for r in results})
        lines += ['', "Best-epoch top-1 differences within the seeds' spread (|mean difference| <= the sum of the two "
                  'standard deviations): ' + ('; '.join(f'{a} ~ {b}' for a, b in pairs) if pairs else 'none') + '.']
    table = os.path.join(args.output, 'results.md')
    with open(table, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot = os.path.join(args.output, 'accuracy_vs_memory.png')
    drawn = plot_accuracy_memory(results, plot, title)
    weights = os.path.join(args.output, 'MODEL' + ('/seedN' if args.seeds > 1 else ''), 'model.safetensors')
    lines += ['', f'Weights: {weights}; this table: {table}; ' + (
        f'accuracy against memory: {plot}' if drawn else "the plot needs matplotlib: pip install 'timm-nlp[plot]'")]
    print('\n' + '\n'.join(lines))
    return results
