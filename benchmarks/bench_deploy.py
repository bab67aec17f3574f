"""Deployment to a microcontroller runtime: the int8 models TensorFlow Lite Micro runs and the arena it measures.

    python benchmarks/bench_deploy.py memory [--sizes 128 224] [--results FILE.jsonl]
    python benchmarks/bench_deploy.py accuracy [--img-size 32] [--epochs 2] [--results FILE.jsonl]

``memory``: per network and input size, exported int8 (``timm_nlp.deploy.export_tflite``, calibrated on Fashion-MNIST
images) whole-map and patch-based: params, MACs (of the patch schedule too), flash (the .tflite's bytes), the counted
peaks (``mcunet`` and ``tflm`` accountings), TFLite Micro's arena (the smallest that runs, found by search; its head
and tail), the arena's reduction against stock MobileNetV2's whole-map arena as PyTorch pads it (explicit PAD copies),
the ops left in float and the conversion time. Networks whose conversion is out of reach (the paper's p = 1 non-local
pools at 224 px: thousands of attention chunks) show their ``tflm`` count only.

``accuracy``: networks trained on Fashion-MNIST with the package's trainer (a CPU preset: ``--img-size``, ``--epochs``),
then exported int8 with histogram calibration on 64 training images; the top-1 on the 10,000 test images of the float
model (PyTorch) and of the int8 model as TFLite Micro computes it, whose outputs are checked against LiteRT's reference
kernels on the first 200 images.

Each result is appended to the JSONL file as it is made (a rerun skips what it holds); the table is printed from it.
"""
import argparse
import json
import os
import time
from typing import List, Optional

import numpy as np
import torch

from timm_nlp.export_model import export_form_model
from timm_nlp.models import create_model
from timm_nlp.patching import lowest_patched_profile, patched_macs, patched_profile
from timm_nlp.profiler import activation_profile, count_macs, tflm_profile
from timm_nlp.tools.tables import markdown_table

STOCK = 'mobilenetv2_100'
# (model, patches, split, convert at 224): whole-map and patch-based, stock and the paper's grammar
MEMORY = [
    ('mobilenetv2_100', None, None, True),
    ('resnet18', None, None, True),
    ('mobilenetv2_100', 4, None, True),
    ('prepool-maxp-4-mobilenet_v2-skip-1222121', None, None, True),
    ('prepool-maxp-4-mobilenet_v2-skip-1222121', 8, None, True),
    ('prepool-skip-4-mobilenet_v2-skip-1222121', None, None, True),
    ('mobilenet_v2-maxp-4222121', None, None, True),
    ('mobilenet_v2-maxp-4222121', 4, None, True),
    ('mobilenet_v2-nlp_headfix2_nowin_reduced-4222121', None, None, True),
    ('mobilenet_v2-nlp_headfix2_nowin_reduced-4222121', 2, None, True),
    ('mobilenet_v2-nlp_headfix2-2222121', None, None, False),
]
ACCURACY = ['resnet18', 'mobilenetv2_100', 'prepool-maxp-2-resnet18-skip-1222', 'resnet18_lip_2222',
            'resnet18_nlp_headfix2_2222', 'mobilenet_v2-nlp_headfix2_nowin_reduced-2222121']
KiB = 1024


def _load(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def memory_row(name: str, size: int, patches: Optional[int], split: Optional[str], convert: bool,
               widen: bool = True) -> dict:
    """One network at one size: counts, and (``convert``) its export and TFLite Micro's arena."""
    from timm_nlp.deploy import export_tflite, tflm_arena
    from timm_nlp.deploy.calibration import calibration_images
    input_size = (3, size, size)
    meta = create_model(name, num_classes=10, device='meta')
    if patches and split is None:
        split = lowest_patched_profile(meta, input_size, patches, dtype='int8', accounting='tflm')[0]
    mcunet = (patched_profile(meta, input_size, patches, split, dtype='int8') if patches else
              activation_profile(meta, input_size, dtype='int8', accounting='mcunet')).peak_bytes
    tflm = (patched_profile(meta, input_size, patches, split, dtype='int8', accounting='tflm') if patches else
            tflm_profile(export_form_model(meta, input_size, widen=widen), input_size)).peak_bytes
    row = dict(model=name, size=size, patches=patches, split=split, widened=widen,
               params=sum(p.numel() for p in meta.parameters()), macs=count_macs(meta, input_size),
               patched_macs=patched_macs(meta, input_size, patches, split) if patches else None,
               mcunet_bytes=mcunet, tflm_count_bytes=tflm)
    if not convert:
        return row
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    start = time.perf_counter()
    exported = export_tflite(model, calibration_images('fashion-mnist', model, input_size, 8), patches=patches,
                             split=split, widen=widen, observer='minmax')
    seconds = time.perf_counter() - start
    arena = tflm_arena(exported.flatbuffer)
    return dict(row, flash_bytes=len(exported.flatbuffer), arena_bytes=arena.arena_bytes, head=arena.head,
                tail=arena.tail, float_ops=sorted(set(exported.float_ops)), ops=sum(exported.ops.values()),
                convert_s=round(seconds, 1))


def run_memory(args: argparse.Namespace) -> None:
    done = {(r['model'], r['size'], r['patches'], r['widened']) for r in _load(args.results)}
    for size in args.sizes:
        todo = [(STOCK, None, None, True, False)] + [spec + (True,) for spec in MEMORY]
        for name, patches, split, convert, widen in todo:
            if (name, size, patches, widen) in done:
                continue
            row = memory_row(name, size, patches, split, convert or size < 224, widen)
            _append(args.results, row)
            print(json.dumps(row), flush=True)
    print_memory(args.results)


def print_memory(path: str) -> None:
    rows = _load(path)
    for size in sorted({r['size'] for r in rows}):
        at = [r for r in rows if r['size'] == size]
        stock = next((r for r in at if r['model'] == STOCK and not r['patches'] and not r['widened']), None)
        table = []
        for r in at:
            execution = f"{r['patches']}x{r['patches']} patches to {r['split']}" if r['patches'] else 'whole map'
            if not r['widened']:
                execution += ', PyTorch padding (PAD ops)'
            arena = r.get('arena_bytes')
            table.append([
                r['model'], execution, f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}",
                f"{r['patched_macs'] / 1e9:.3f}" if r['patched_macs'] else '-',
                f"{r['flash_bytes'] / KiB:.0f}" if 'flash_bytes' in r else '-', f"{r['mcunet_bytes'] / KiB:.0f}",
                f"{r['tflm_count_bytes'] / KiB:.0f}", f'{arena / KiB:.0f}' if arena else 'not converted',
                f"{r['head'] / KiB:.0f} / {r['tail'] / KiB:.0f}" if arena else '-',
                f"{stock['arena_bytes'] / arena:.2f}x" if arena and stock else '-',
                ', '.join(r.get('float_ops', [])) or ('-' if arena else ''), r.get('convert_s', '-')])
        print(f'\n{size}x{size}, int8, batch 1, 10 classes (KiB = 1024 B)\n')
        print(markdown_table(['model', 'execution', 'params (M)', 'GMACs', 'GMACs, patches', 'flash (KiB)',
                              'counted mcunet (KiB)', 'counted tflm (KiB)', 'TFLite Micro arena (KiB)',
                              'head / tail (KiB)', 'arena vs stock', 'float ops', 'convert (s)'], table))


def accuracy_row(name: str, args: argparse.Namespace) -> dict:
    """Train ``name`` on Fashion-MNIST, export it int8, and evaluate both on the test set."""
    from timm_nlp.deploy import export_tflite, litert_reference, lsb_agreement, tflm_run
    from timm_nlp.deploy.calibration import calibration_images
    from timm_nlp.hub import checkpoint_model
    from timm_nlp.trainer import add_train_args, train
    output = os.path.join(args.work_dir, name)
    subset = ['--train-subset', str(args.train_subset)] if args.train_subset else []
    train_args = add_train_args(argparse.ArgumentParser()).parse_args([
        '--model', name, '--dataset', 'fashion-mnist', '--img-size', str(args.img_size), '--epochs', str(args.epochs),
        '--output', output, '--no-progress'] + subset)
    start = time.perf_counter()
    result = train(train_args)
    train_s = time.perf_counter() - start
    model, meta = checkpoint_model(result['weights'])
    size = (meta['in_chans'], args.img_size, args.img_size)
    exported = export_tflite(model, calibration_images('fashion-mnist', model, size, 64))
    test = _test_images(model, size)
    with torch.no_grad():
        float_top1 = float(np.mean([(model(x).argmax(1) == y).float().mean().item() for x, y in test]))
    _, _, scale, zero = exported.io['inputs'][0]
    outs, labels = [], []
    for x, y in test:
        q = np.clip(np.round(x.permute(0, 2, 3, 1).numpy() / scale) + zero, -128, 127).astype(np.int8)[:, None]
        outs.append(tflm_run(exported.flatbuffer, q))
        labels.append(y.numpy())
    out, labels = np.concatenate(outs), np.concatenate(labels)
    x0 = test[0][0][:200]
    q0 = np.clip(np.round(x0.permute(0, 2, 3, 1).numpy() / scale) + zero, -128, 127).astype(np.int8)[:, None]
    agree, worst = lsb_agreement(out[:len(q0)], litert_reference(exported.flatbuffer, q0))
    return dict(model=name, img_size=args.img_size, epochs=args.epochs, train_subset=args.train_subset,
                float_top1=100 * float_top1, int8_top1=100 * float((out.reshape(len(out), -1).argmax(1) ==
                                                                    labels).mean()),
                tflm_vs_reference_1lsb=agree, max_lsb=worst, float_ops=sorted(set(exported.float_ops)),
                train_s=round(train_s))


def _test_images(model: torch.nn.Module, size: tuple) -> List[tuple]:
    """The 10,000 Fashion-MNIST test images in batches of 500, as the model's evaluation transform prepares them."""
    from timm.data import create_transform, resolve_data_config
    from timm_nlp.data import IMAGE_MODES, ImageView, default_fashion_mnist_dir, fashion_mnist
    view = ImageView(fashion_mnist(default_fashion_mnist_dir(), 'test'), IMAGE_MODES[size[0]])
    cfg = resolve_data_config({'input_size': size, 'crop_pct': 1.0}, model=model)
    for key in ('mean', 'std'):
        if len(cfg[key]) != size[0]:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * size[0]
    view.transform = create_transform(**cfg, is_training=False)
    batches = []
    for start in range(0, len(view), 500):
        items = [view[i] for i in range(start, min(start + 500, len(view)))]
        batches.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return batches


def run_accuracy(args: argparse.Namespace) -> None:
    done = {r['model'] for r in _load(args.results)}
    for name in args.models:
        if name not in done:
            row = accuracy_row(name, args)
            _append(args.results, row)
            print(json.dumps(row), flush=True)
    rows = _load(args.results)
    print(f'\nFashion-MNIST test set (10,000 images), {args.img_size}x{args.img_size}, int8 as TFLite Micro computes '
          'it\n')
    print(markdown_table(['model', 'epochs', 'float top-1 (%)', 'int8 top-1 (%)', 'int8 - float (points)',
                          'TFLite Micro vs LiteRT reference (<= 1 LSB)', 'float ops'],
                         [[r['model'], r['epochs'], f"{r['float_top1']:.2f}", f"{r['int8_top1']:.2f}",
                           f"{r['int8_top1'] - r['float_top1']:+.2f}", f"{100 * r['tflm_vs_reference_1lsb']:.1f}% "
                           f"(max {r['max_lsb']})", ', '.join(r['float_ops']) or '-'] for r in rows]))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='part', required=True)
    p = sub.add_parser('memory', help='flash, counted peaks and TFLite Micro arenas at 128 and 224 px')
    p.add_argument('--sizes', type=int, nargs='+', default=[128, 224])
    p.add_argument('--results', default='output/bench_deploy/memory.jsonl')
    p.add_argument('--print-only', action='store_true')
    p = sub.add_parser('accuracy', help='float vs int8 top-1 of networks trained on Fashion-MNIST')
    p.add_argument('--models', nargs='+', default=ACCURACY)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--train-subset', type=int, default=None)
    p.add_argument('--work-dir', default='output/bench_deploy/train')
    p.add_argument('--results', default='output/bench_deploy/accuracy.jsonl')
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.part == 'memory':
        print_memory(args.results) if args.print_only else run_memory(args)
    else:
        run_accuracy(args)


if __name__ == '__main__':
    main()
