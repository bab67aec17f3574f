"""Deployment to a microcontroller runtime: the int8 models TensorFlow Lite Micro runs and the arena it measures.

    python benchmarks/bench_deploy.py memory [--sizes 128 224] [--models NAME ...] [--results FILE.jsonl]
    python benchmarks/bench_deploy.py accuracy [--img-size 32] [--epochs 2] [--results FILE.jsonl]
    python benchmarks/bench_deploy.py patches [--model NAME --patches 4 --split blocks.0 --img-size 224]

``memory``: per network and input size, exported int8 (``timm_nlp.deploy.export_tflite``, calibrated on Fashion-MNIST
images) whole-map and patch-based: params, MACs (of the patch schedule too), flash (the .tflite's bytes), the counted
peaks (``mcunet`` and ``tflm`` accountings), TFLite Micro's arena (the smallest that runs, found by search; its head
and tail), the arena's reduction against stock MobileNetV2's whole-map arena as PyTorch pads it (explicit PAD copies),
the ops left in float and the conversion time.

``accuracy``: networks trained on Fashion-MNIST with the package's trainer (a CPU preset: ``--img-size``, ``--epochs``),
then exported int8 with histogram calibration on 64 training images; the top-1 on the 10,000 test images of the float
model (PyTorch) and of the int8 model as TFLite Micro computes it, whose outputs are checked against LiteRT's reference
kernels on the first 200 images.

``patches``: a network trained at 224 px, exported int8 whole-map and patch-based: the predictions of the two in
TFLite Micro on the first test images, and their arenas.

Each result is appended to the JSONL file as it is made (a rerun skips what it holds); the table is printed from it.
"""
import argparse
import json
import os
import time
from typing import List, Optional

import numpy as np
import torch

from timm_nlp.models import create_model
from timm_nlp.patching import deployed_patch_based, lowest_patched_profile, patched_macs, patched_profile
from timm_nlp.profiler import activation_profile, count_macs, deployed_form, tflm_profile
from timm_nlp.tools.tables import markdown_table

STOCK = 'mobilenetv2_100'
# (model, patches, split, attention chunk): whole-map and patch-based, stock and the paper's grammar
MEMORY = [
    ('mobilenetv2_100', None, None, 64),
    ('resnet18', None, None, 64),
    ('mobilenetv2_100', 4, None, 64),
    ('prepool-maxp-4-mobilenet_v2-skip-1222121', None, None, 64),
    ('prepool-maxp-4-mobilenet_v2-skip-1222121', 8, None, 64),
    ('prepool-skip-4-mobilenet_v2-skip-1222121', None, None, 64),
    ('mobilenet_v2-maxp-4222121', None, None, 64),
    ('mobilenet_v2-maxp-4222121', 4, None, 64),
    ('mobilenet_v2-gaussian_pool-4222121', None, None, 64),
    ('mobilenet_v2-gaussian_pool-4222121', 4, None, 64),
    ('mobilenet_v2-nlp_headfix2_nowin_reduced-4222121', None, None, 196),
    ('mobilenet_v2-nlp_headfix2_nowin_reduced-4222121', 4, 'blocks.0', 32),
    ('mobilenet_v2-nlp_headfix2-2222121', None, None, 24),
]
ACCURACY = ['resnet18', 'mobilenetv2_100', 'prepool-maxp-2-resnet18-skip-1222', 'resnet18_lip_2222',
            'resnet18_gaussian_pool_2222', 'resnet18_nlp_headfix2_2222']
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


def memory_row(name: str, size: int, patches: Optional[int], split: Optional[str], chunk: int, convert: bool,
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
    # what is exported, counted as TFLite Micro plans it
    deployed = (deployed_patch_based(meta, input_size, patches, split, chunk, widen) if patches else
                deployed_form(meta, input_size, chunk, widen))
    row = dict(model=name, size=size, patches=patches, split=split, chunk=chunk, widened=widen,
               params=sum(p.numel() for p in meta.parameters()), macs=count_macs(meta, input_size),
               patched_macs=patched_macs(meta, input_size, patches, split) if patches else None,
               mcunet_bytes=mcunet, tflm_count_bytes=tflm_profile(deployed, input_size).peak_bytes)
    if not convert:
        return row
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    start = time.perf_counter()
    exported = export_tflite(model, calibration_images('fashion-mnist', model, input_size, 8), patches=patches,
                             split=split, chunk=chunk, widen=widen, observer='minmax')
    seconds = time.perf_counter() - start
    arena = tflm_arena(exported.flatbuffer)
    return dict(row, flash_bytes=len(exported.flatbuffer), arena_bytes=arena.arena_bytes, head=arena.head,
                tail=arena.tail, float_ops=sorted(set(exported.float_ops)), ops=sum(exported.ops.values()),
                convert_s=round(seconds, 1))


def recount(path: str) -> None:
    """The counted columns of every recorded row recomputed with this version's accountings (instant)."""
    rows = _load(path)
    for r in rows:
        counted = memory_row(r['model'], r['size'], r['patches'], r['split'], r['chunk'], False, r['widened'])
        r.update(mcunet_bytes=counted['mcunet_bytes'], tflm_count_bytes=counted['tflm_count_bytes'])
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)


def run_memory(args: argparse.Namespace) -> None:
    done = {(r['model'], r['size'], r['patches'], r['chunk'], r['widened']) for r in _load(args.results)}
    for size in args.sizes:
        todo = [(STOCK, None, None, 64, False)] + [spec + (True,) for spec in MEMORY
                                                   if not args.models or spec[0] in args.models]
        for name, patches, split, chunk, widen in todo:
            if (name, size, patches, chunk, widen) in done:
                continue
            row = memory_row(name, size, patches, split, chunk, True, widen)
            _append(args.results, row)
            print(json.dumps(row), flush=True)
    print_memory(args.results)


def print_memory(path: str) -> None:
    rows = _load(path)
    for size in sorted({r['size'] for r in rows}):
        order = [(STOCK, None, False)] + [(name, patches, True) for name, patches, *_ in MEMORY]  # the table's rows
        at = sorted((r for r in rows if r['size'] == size),
                    key=lambda r: order.index((r['model'], r['patches'], r['widened'])))
        stock = next((r for r in at if r['model'] == STOCK and not r['patches'] and not r['widened']), None)
        table = []
        for r in at:
            execution = f"{r['patches']}x{r['patches']} patches to {r['split']}" if r['patches'] else 'whole map'
            if r['chunk'] != 64 and 'nlp' in r['model']:
                execution += f", attention in chunks of {r['chunk']}"
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


def _trained(name: str, args: argparse.Namespace):
    """``name`` trained on Fashion-MNIST by the package's trainer (``args``: img_size, epochs, train_subset,
    work_dir), its input size and the training seconds."""
    from timm_nlp.hub import checkpoint_model
    from timm_nlp.trainer import add_train_args, train
    subset = ['--train-subset', str(args.train_subset)] if args.train_subset else []
    train_args = add_train_args(argparse.ArgumentParser()).parse_args([
        '--model', name, '--dataset', 'fashion-mnist', '--img-size', str(args.img_size), '--epochs', str(args.epochs),
        '--output', os.path.join(args.work_dir, f'{name}_{args.img_size}'), '--no-progress'] + subset)
    start = time.perf_counter()
    result = train(train_args)
    seconds = time.perf_counter() - start
    model, meta = checkpoint_model(result['weights'])
    return model, (meta['in_chans'], args.img_size, args.img_size), seconds


def _int8_inputs(x: torch.Tensor, exported) -> np.ndarray:
    _, _, scale, zero = exported.io['inputs'][0]
    return np.clip(np.round(x.permute(0, 2, 3, 1).numpy() / scale) + zero, -128, 127).astype(np.int8)[:, None]


def _tflm_top1(exported, test: List[tuple]) -> np.ndarray:
    """TFLite Micro's predicted class of every test image."""
    from timm_nlp.deploy import tflm_run
    return np.concatenate([tflm_run(exported.flatbuffer, _int8_inputs(x, exported)).reshape(len(x), -1).argmax(1)
                           for x, _ in test])


def accuracy_row(name: str, args: argparse.Namespace) -> dict:
    """Train ``name`` on Fashion-MNIST, export it int8, and evaluate both on the test set."""
    from timm_nlp.deploy import export_tflite
    from timm_nlp.deploy.calibration import calibration_images
    model, size, train_s = _trained(name, args)
    exported = export_tflite(model, calibration_images('fashion-mnist', model, size, 64))
    test = _test_images(model, size, args.test_images)
    labels = np.concatenate([y.numpy() for _, y in test])
    with torch.no_grad():
        float_pred = np.concatenate([model(x).argmax(1).numpy() for x, _ in test])
    int8_pred = _tflm_top1(exported, test)
    return dict(model=name, img_size=args.img_size, epochs=args.epochs, train_subset=args.train_subset,
                test_images=len(labels), wide_softmax=exported.wide_softmax,
                float_top1=100 * float((float_pred == labels).mean()),
                int8_top1=100 * float((int8_pred == labels).mean()), **_against_litert(exported, test),
                float_ops=sorted(set(exported.float_ops)), train_s=round(train_s))


def _against_litert(exported, test: List[tuple]) -> dict:
    """TFLite Micro's int8 outputs on the first 200 test images against LiteRT's reference and optimised kernels
    (the fraction at most 1 LSB apart, the largest difference), and LiteRT's top-1 with each on them."""
    from timm_nlp.deploy import litert_reference, lsb_agreement, tflm_run
    x, labels = test[0][0][:200], test[0][1][:200].numpy()
    q = _int8_inputs(x, exported)
    ours, row = tflm_run(exported.flatbuffer, q), {}
    for kernels, key in (('reference', 'reference'), ('builtin', 'litert')):
        theirs = litert_reference(exported.flatbuffer, q, kernels)
        agree, worst = lsb_agreement(ours, theirs)
        row.update({f'tflm_vs_{key}_1lsb': agree, f'max_lsb_{key}': worst,
                    f'{key}_top1_200': 100 * float((theirs.reshape(len(q), -1).argmax(1) == labels).mean())})
    row['tflm_top1_200'] = 100 * float((ours.reshape(len(q), -1).argmax(1) == labels).mean())
    return row


def _backfill(row: dict, args: argparse.Namespace) -> dict:
    """A recorded row with the comparisons against LiteRT recomputed from its trained weights (the export is
    deterministic)."""
    from timm_nlp.deploy import export_tflite
    from timm_nlp.deploy.calibration import calibration_images
    from timm_nlp.hub import checkpoint_model
    model, meta = checkpoint_model(os.path.join(args.work_dir, f"{row['model']}_{args.img_size}", 'model.safetensors'))
    size = (meta['in_chans'], args.img_size, args.img_size)
    exported = export_tflite(model, calibration_images('fashion-mnist', model, size, 64))
    row = {k: v for k, v in row.items() if k != 'max_lsb'}
    return dict(row, **_against_litert(exported, _test_images(model, size, 200)))


def patches_row(name: str, patches: int, split: str, chunk: int, args: argparse.Namespace) -> dict:
    """Train ``name``, export it int8 whole-map and patch-based, and compare their predictions (TFLite Micro) on the
    first ``args.test_images`` test images."""
    from timm_nlp.deploy import export_tflite, tflm_arena
    from timm_nlp.deploy.calibration import calibration_images
    model, size, train_s = _trained(name, args)
    calib = calibration_images('fashion-mnist', model, size, 64)
    whole = export_tflite(model, calib, chunk=chunk)
    patched = export_tflite(model, calib, patches=patches, split=split, chunk=chunk)
    test = _test_images(model, size, args.test_images)
    labels = np.concatenate([y.numpy() for _, y in test])
    with torch.no_grad():
        float_pred = np.concatenate([model(x).argmax(1).numpy() for x, _ in test])
    a, b = _tflm_top1(whole, test), _tflm_top1(patched, test)
    return dict(model=name, img_size=args.img_size, patches=patches, split=split, chunk=chunk, epochs=args.epochs,
                train_subset=args.train_subset, test_images=len(labels), float_top1=100 * float((float_pred ==
                                                                                                labels).mean()),
                whole_int8_top1=100 * float((a == labels).mean()), patched_int8_top1=100 * float((b == labels).mean()),
                agreement=100 * float((a == b).mean()), whole_arena=tflm_arena(whole.flatbuffer).arena_bytes,
                patched_arena=tflm_arena(patched.flatbuffer).arena_bytes, train_s=round(train_s))


def _test_images(model: torch.nn.Module, size: tuple, count: int = 10000) -> List[tuple]:
    """The first ``count`` Fashion-MNIST test images in batches of 500, as the model's evaluation transform prepares
    them."""
    from timm.data import create_transform, resolve_data_config
    from timm_nlp.data import IMAGE_MODES, ImageView, default_fashion_mnist_dir, fashion_mnist
    view = ImageView(fashion_mnist(default_fashion_mnist_dir(), 'test'), IMAGE_MODES[size[0]])
    cfg = resolve_data_config({'input_size': size, 'crop_pct': 1.0}, model=model)
    for key in ('mean', 'std'):
        if len(cfg[key]) != size[0]:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * size[0]
    view.transform = create_transform(**cfg, is_training=False)
    batches = []
    for start in range(0, min(count, len(view)), 500):
        items = [view[i] for i in range(start, min(start + 500, count, len(view)))]
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
    if any('max_lsb_litert' not in r for r in rows):
        rows = [r if 'max_lsb_litert' in r else _backfill(r, args) for r in rows]
        with open(args.results, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
    print(f'\nFashion-MNIST test set (the first {args.test_images} images), {args.img_size}x{args.img_size}, int8 as '
          'TFLite Micro computes it; its outputs on 200 test images against LiteRT\'s reference and optimised '
          'kernels\n')
    print(markdown_table(['model', 'epochs', 'float top-1 (%)', 'int8 top-1 (%)', 'int8 - float (points)',
                          'TFLM vs LiteRT optimised (<= 1 LSB)', 'TFLM vs LiteRT reference (<= 1 LSB)',
                          'top-1 on 200: TFLM / optimised / reference (%)', 'float ops'],
                         [[r['model'], r['epochs'], f"{r['float_top1']:.2f}", f"{r['int8_top1']:.2f}",
                           f"{r['int8_top1'] - r['float_top1']:+.2f}",
                           f"{100 * r['tflm_vs_litert_1lsb']:.1f}% (max {r['max_lsb_litert']})",
                           f"{100 * r['tflm_vs_reference_1lsb']:.1f}% (max {r['max_lsb_reference']})",
                           f"{r['tflm_top1_200']:.1f} / {r['litert_top1_200']:.1f} / {r['reference_top1_200']:.1f}",
                           ', '.join(r['float_ops']) or '-'] for r in rows]))


def run_patches(args: argparse.Namespace) -> None:
    done = {(r['model'], r['img_size'], r['patches']) for r in _load(args.results)}
    if (args.model, args.img_size, args.patches) not in done:
        row = patches_row(args.model, args.patches, args.split, args.chunk, args)
        _append(args.results, row)
        print(json.dumps(row), flush=True)
    rows = _load(args.results)
    print('\nWhole-map against patch-based int8 (TFLite Micro) on the first Fashion-MNIST test images\n')
    print(markdown_table(['model', 'size', 'patches', 'test images', 'float top-1 (%)', 'whole-map int8 (%)',
                          'patch-based int8 (%)', 'same prediction (%)', 'arena whole / patches (KiB)'],
                         [[r['model'], r['img_size'], f"{r['patches']}x{r['patches']} to {r['split']}",
                           r['test_images'], f"{r['float_top1']:.2f}", f"{r['whole_int8_top1']:.2f}",
                           f"{r['patched_int8_top1']:.2f}", f"{r['agreement']:.2f}",
                           f"{r['whole_arena'] / KiB:.0f} / {r['patched_arena'] / KiB:.0f}"] for r in rows]))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='part', required=True)
    p = sub.add_parser('memory', help='flash, counted peaks and TFLite Micro arenas at 128 and 224 px')
    p.add_argument('--sizes', type=int, nargs='+', default=[128, 224])
    p.add_argument('--results', default='output/bench_deploy/memory.jsonl')
    p.add_argument('--models', nargs='+', default=None,
                   help='measure only these of the table (default: all); the stock row is always measured')
    p.add_argument('--print-only', action='store_true')
    p.add_argument('--recount', action='store_true',
                   help="recompute the counted columns of the recorded rows (no conversion), then print")
    p = sub.add_parser('accuracy', help='float vs int8 top-1 of networks trained on Fashion-MNIST')
    p.add_argument('--models', nargs='+', default=ACCURACY)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--train-subset', type=int, default=None)
    p.add_argument('--test-images', type=int, default=10000)
    p.add_argument('--work-dir', default='output/bench_deploy/train')
    p.add_argument('--results', default='output/bench_deploy/accuracy.jsonl')
    p = sub.add_parser('patches', help='a trained network whole-map and patch-based: the same predictions?')
    p.add_argument('--model', default='mobilenet_v2-maxp-4222121')
    p.add_argument('--patches', type=int, default=4)
    p.add_argument('--split', default='blocks.0')
    p.add_argument('--chunk', type=int, default=64)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--train-subset', type=int, default=10000)
    p.add_argument('--test-images', type=int, default=1000)
    p.add_argument('--work-dir', default='output/bench_deploy/train')
    p.add_argument('--results', default='output/bench_deploy/patches.jsonl')
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.part == 'memory' and args.recount:
        recount(args.results)
    if args.part == 'memory':
        print_memory(args.results) if args.print_only or args.recount else run_memory(args)
    elif args.part == 'accuracy':
        run_accuracy(args)
    else:
        run_patches(args)


if __name__ == '__main__':
    main()
