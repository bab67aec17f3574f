"""Activation memory of the paper's configurations, whole-map and patch-based, counted and measured.

    python benchmarks/bench_memory.py [--patches 4 8] [--plot FILE.png] [--threads 2]

Table 1, the paper code's logged configurations (ResNet-18 pre-pools 4/6/8 at 96 px; MobileNetV2 1222121 /
2222121 / 4222121 and pre-pools 2/4/6 at 128 px; all of them at 224 px), each next to its stock timm model, and the
local pre-pools that the same grammar builds: the peak activation memory under MCUNet's accounting (``mcunet``),
float32 and int8, of whole-map execution and of patch-based execution (``timm_nlp.patch_based``, the split with the
lowest peak, for each patch count), with the reduction against the stock model's whole-map int8 peak.

Table 2, the check of the counts against a measurement: the peak of the CPU allocator's bytes during one real
forward pass (batch 1, float32, torch.profiler's memory events, ``measured_peak_bytes``), whole-map and patch-based,
next to the ``layers`` count of the same execution. The measurement includes what the count leaves out by
definition: the convolution kernels' workspaces (oneDNN's im2col buffers), tensors held across steps (residual
shortcuts), the logits; the count includes a step's input and output even where an in-place activation shares them.
"""
import argparse
from typing import List, Optional

import torch

from timm_nlp import patch_based
from timm_nlp.models import create_model
from timm_nlp.patching import lowest_patched_profile, patched_profile
from timm_nlp.profiler import activation_profile, count_macs, measured_peak_bytes
from timm_nlp.tools.tables import markdown_table

PAPER = {
    96: [('resnet18', ['prepool-nlp_headfix2-4-resnet18-skip-1222', 'prepool-nlp_headfix2-6-resnet18-skip-1222',
                       'prepool-nlp_headfix2-8-resnet18-skip-1222'])],
    128: [('mobilenetv2_100', ['mobilenet_v2-nlp_headfix2-1222121', 'mobilenet_v2-nlp_headfix2-2222121',
                               'mobilenet_v2-nlp_headfix2-4222121', 'prepool-nlp_headfix2-2-mobilenet_v2-skip-1222121',
                               'prepool-nlp_headfix2-4-mobilenet_v2-skip-1222121',
                               'prepool-nlp_headfix2-6-mobilenet_v2-skip-1222121'])],
}
LOCAL_PREPOOLS = [('resnet18', ['prepool-lip-8-resnet18-skip-1222', 'prepool-maxp-8-resnet18-skip-1222']),
                  ('mobilenetv2_100', ['prepool-lip-4-mobilenet_v2-skip-1222121',
                                       'prepool-maxp-4-mobilenet_v2-skip-1222121'])]
MEASURED = ['resnet18', 'mobilenetv2_100', 'prepool-lip-8-resnet18-skip-1222',
            'prepool-nlp_headfix2-4-resnet18-skip-1222',
            'prepool-maxp-4-mobilenet_v2-skip-1222121', 'mobilenet_v2-nlp_headfix2-2222121']
KiB = 1024


def best_patched(model: torch.nn.Module, size: int, patches: int) -> Optional[tuple]:
    """(int8 peak, split, peak step) of the lowest-peak patch-based execution, None if no prefix can be patched."""
    try:
        split, p = lowest_patched_profile(model, (3, size, size), patches, dtype='int8')
    except ValueError:
        return None
    return p.peak_bytes, split, p.peak_layer.name


def memory_rows(size: int, groups: list, patches: List[int], stock_rows: bool = True) -> List[list]:
    rows = []
    for stock, names in groups:
        base = activation_profile(create_model(stock, device='meta'), (3, size, size), dtype='int8',
                                  accounting='mcunet').peak_bytes
        for name in ([stock] if stock_rows else []) + names:
            model = create_model(name, device='meta')
            whole = activation_profile(model, (3, size, size), dtype='int8', accounting='mcunet')
            row = [size, name, f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
                   f'{count_macs(model, (3, size, size)) / 1e9:.3f}', f'{4 * whole.peak_bytes / KiB:.0f}',
                   f'{whole.peak_bytes / KiB:.0f}', f'{base / whole.peak_bytes:.2f}x']
            for n in patches:
                best = best_patched(model, size, n)
                row += ['-', '-'] if best is None else [f'{best[0] / KiB:.0f} ({best[1]})', f'{base / best[0]:.2f}x']
            rows.append(row)
    return rows


def measured_rows(patches: int) -> List[list]:
    rows = []
    x = torch.randn(1, 3, 224, 224)
    for name in MEASURED:
        model = create_model(name).eval()
        patched = patch_based(model, patches)
        with torch.no_grad():
            model(x), patched(x)  # warm-up: kernels' caches, the patch plan
            whole_m = measured_peak_bytes(lambda: model(x))
            patch_m = measured_peak_bytes(lambda: patched(x))
        whole_c = activation_profile(model, (3, 224, 224), accounting='layers').peak_bytes
        patch_c = patched_profile(model, (3, 224, 224), patches, patched.split, accounting='layers').peak_bytes
        rows.append([name, patched.split, f'{whole_m / KiB:.0f}', f'{whole_c / KiB:.0f}', f'{whole_m / whole_c:.2f}',
                     f'{patch_m / KiB:.0f}', f'{patch_c / KiB:.0f}', f'{patch_m / patch_c:.2f}',
                     f'{whole_m / patch_m:.2f}x'])
    return rows


def plot(rows: List[list], patches: List[int], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 5.5))
    labels = [f'{r[1]} @{r[0]}' for r in rows]
    xs = range(len(rows))
    width = 0.8 / (1 + len(patches))
    ax.bar([x - 0.4 + width / 2 for x in xs], [float(r[5]) for r in rows], width, label='whole map')
    for i, n in enumerate(patches):
        vals = [float(r[7 + 2 * i].split()[0]) if r[7 + 2 * i] != '-' else 0. for r in rows]
        ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], vals, width, label=f'{n}x{n} patches')
    ax.set_yscale('log')
    ax.set_ylabel('peak activation memory, int8, mcunet accounting (KiB, log)')
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha='right', fontsize=7)
    ax.legend()
    ax.grid(True, axis='y', which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--patches', type=int, nargs='+', default=[4, 8])
    parser.add_argument('--plot', default='', help='draw the int8 peaks to this PNG (matplotlib)')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size, groups in PAPER.items():
        rows += memory_rows(size, groups, args.patches)
    rows += memory_rows(224, [(s, n) for s, n in [PAPER[96][0], PAPER[128][0]]], args.patches)
    rows += memory_rows(224, LOCAL_PREPOOLS, args.patches, stock_rows=False)
    header = ['px', 'model', 'params (M)', 'GMACs', 'whole fp32 (KiB)', 'whole int8 (KiB)', 'vs stock']
    for n in args.patches:
        header += [f'{n}x{n} patches int8 (KiB, split)', 'vs stock']
    print('Peak activation memory, batch 1, mcunet accounting; "vs stock": the stock timm model\'s whole-map int8 '
          'peak over this one\n')
    print(markdown_table(header, rows))
    print(f'\nMeasured (CPU allocator, torch.profiler) vs counted (layers), float32, 224 px, batch 1, '
          f'{args.patches[0]}x{args.patches[0]} patches, split with the lowest mcunet peak\n')
    print(markdown_table(['model', 'split', 'whole measured (KiB)', 'whole counted (KiB)', 'ratio',
                          'patched measured (KiB)', 'patched counted (KiB)', 'ratio', 'measured saving'],
                         measured_rows(args.patches[0])))
    if args.plot:
        plot(rows, args.patches, args.plot)
        print(f'\nplot: {args.plot}')


if __name__ == '__main__':
    main()
