"""The ``timm-nlp`` command line: train, compare, profile, push (Hugging Face Hub), convert-paper (checkpoints of the
paper's code), stl10 (dataset conversion)."""
import argparse
import logging
import os
import sys
from typing import Optional, Sequence

__all__ = ['main', 'build_parser']


def _profile_json(p, args: argparse.Namespace) -> dict:
    import dataclasses
    return dict(name=p.name, img_size=args.img_size, dtype=args.dtype, accounting=args.accounting,
                patches=args.patches, split=p.split, params=p.params, macs=p.macs, patched_macs=p.patched_macs,
                peak_bytes=p.memory.peak_bytes,
                peak_layer=p.memory.peak_layer.name,
                steps=[dict(dataclasses.asdict(layer), live_bytes=layer.live_bytes) for layer in p.memory.layers])


def _profile(args: argparse.Namespace) -> None:
    import json
    if args.runtime == 'tflm':
        return _runtime_profile(args)
    from .tools.profile import compare_table, plot_memory, profile_model
    from .tools.tables import markdown_table
    kw = dict(dtype=args.dtype, accounting=args.accounting, patches=args.patches, split=args.split)
    profiles = [profile_model(name, args.img_size, **kw) for name in args.models]
    if args.json:
        print(json.dumps([_profile_json(p, args) for p in profiles], indent=1))
        return
    execution = f'patch-based ({args.patches}x{args.patches} patches)' if args.patches else 'layer-by-layer'
    for p in profiles if not args.compare else []:
        split = f', prefix up to {p.split} run patch by patch: {p.patched_macs / 1e9:.3f} GMACs with the recomputed ' \
            'halos' if p.split else ''
        print(f'\n{p.name}: {p.params / 1e6:.2f} M params, {p.macs / 1e9:.3f} GMACs, peak activation memory '
              f'{p.memory.peak_bytes / 1024:.1f} KiB at {p.memory.peak_layer.name}, largest map '
              f'{p.memory.largest_map_bytes / 1024:.1f} KiB ({args.img_size}x{args.img_size}, batch 1, {args.dtype}, '
              f'{args.accounting} accounting, {execution} execution{split})')
        rows = [[i, f'{layer.name} ({layer.kind})', 'x'.join(map(str, layer.out_shape))] + [
            f'{b / 1024:.1f}' for b in (layer.in_bytes, layer.out_bytes, layer.operand_bytes, layer.held_bytes,
                                        layer.live_bytes)] for i, layer in enumerate(p.memory.layers)]
        print(markdown_table(['step', 'layer', 'output', 'in KiB', 'out KiB', 'operand KiB', 'held KiB', 'live KiB'],
                             rows))
    if args.compare:
        names = {p.name for p in profiles}
        bases = {p.name: p for p in profiles} if not args.patches else {}
        bases.update({b: profile_model(b, args.img_size, dtype=args.dtype, accounting=args.accounting)
                      for b in {p.base for p in profiles} - set(bases)})
        header = ['model', 'params (M)', 'GMACs', 'MACs vs stock', 'peak act. (KiB)', 'reduction vs stock',
                  'peak in stages (KiB)', 'reduction vs stock', 'largest map (KiB)', 'peak at']
        print(f'\n{args.img_size}x{args.img_size}, batch 1, {args.dtype}, {args.accounting} accounting, {execution} '
              'execution' + (', against the stock models whole-map' if args.patches else '') + '\n')
        listed = profiles + [bases[b] for b in sorted(set(bases) - names)] if not args.patches else profiles
        rows = compare_table(listed, bases)
        if args.patches:  # the MACs of patch-based execution, with the halos each patch recomputes
            header.insert(3, 'GMACs, patch-based')
            for row, p in zip(rows, listed):
                row.insert(3, f'{p.patched_macs / 1e9:.3f}')
        print(markdown_table(header, rows))
    if args.plot:
        plot_memory(profiles, args.plot)
        print(f'plot written to {args.plot}')


def _deploy_model(args: argparse.Namespace):
    """The model to deploy (a name, or ``--checkpoint``'s trained weights) and its input size."""
    from .hub import checkpoint_model
    from .models import create_model
    if getattr(args, 'checkpoint', ''):
        model, meta = checkpoint_model(args.checkpoint)
        return model, (meta['in_chans'], args.img_size, args.img_size)
    return create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans).eval(), \
        (args.in_chans, args.img_size, args.img_size)


def _tflite(args: argparse.Namespace, model, size):
    from .deploy import export_tflite
    from .deploy.calibration import calibration_images
    calib = calibration_images(args.calib, model, size, args.calib_count)
    return export_tflite(model, calib, patches=args.patches, split=args.split, chunk=args.chunk,
                         observer=args.observer)


def _export(args: argparse.Namespace) -> None:
    from .layers.export_ops import INT8_SOFTMAX_MAX_ROW
    model, size = _deploy_model(args)
    if args.format == 'onnx':
        if args.int8 or args.patches:
            raise ValueError('--int8 and --patches apply to --format tflite; the ONNX export is float.')
        from .export import export_onnx
        diff = export_onnx(model, args.output, size)
        print(f'{args.output}: ONNX, largest difference from PyTorch in onnxruntime {diff:.2e}')
        return
    if not args.int8:
        raise ValueError('--format tflite exports static int8 models for TFLite Micro: add --int8.')
    exported = _tflite(args, model, size)
    exported.save(args.output)
    float_ops = sorted(set(exported.float_ops))
    print(f"{args.output}: {len(exported.flatbuffer)} bytes, int8 NHWC input {exported.io['inputs'][0][1]}, "
          f"{sum(exported.ops.values())} ops" + (f', patch-based {args.patches}x{args.patches} up to '
                                                   f'{exported.split}' if args.patches else '') +
          (f"; float ops: {', '.join(float_ops)}" if float_ops else '; fully int8') +
          (f' ({exported.wide_softmax} softmaxes over rows of {INT8_SOFTMAX_MAX_ROW + 1} or more write int16)'
           if exported.wide_softmax else ''))


def _runtime_profile(args: argparse.Namespace) -> None:
    """``profile --runtime tflm``: export each model, run it in TFLite Micro, report its arena beside the count."""
    import json
    from .deploy import tflm_arena
    from .patching import patched_profile
    from .profiler import activation_profile
    from .tools.tables import markdown_table
    rows = []
    for name in args.models:
        run = argparse.Namespace(**dict(vars(args), model=name, checkpoint=''))
        model, size = _deploy_model(run)
        exported = _tflite(run, model, size)
        arena = tflm_arena(exported.flatbuffer)
        if args.patches:
            counted = patched_profile(model, size, args.patches, exported.split, dtype='int8', accounting='tflm')
        else:
            counted = activation_profile(model, size, dtype='int8', accounting='tflm')
        rows.append(dict(name=name, img_size=args.img_size, patches=args.patches, split=exported.split,
                         arena_bytes=arena.arena_bytes, head=arena.head, tail=arena.tail,
                         counted_head=counted.peak_bytes, flash_bytes=len(exported.flatbuffer), ops=exported.ops,
                         float_ops=sorted(set(exported.float_ops))))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(markdown_table(['model', 'TFLite Micro arena (B)', 'head (B)', 'tail (B)', 'counted head, tflm (B)',
                          'flash (B)', 'float ops'],
                         [[r['name'], r['arena_bytes'], r['head'], r['tail'], r['counted_head'], r['flash_bytes'],
                           ', '.join(r['float_ops']) or '-'] for r in rows]))


def _push(args: argparse.Namespace) -> None:
    from .hub import export_for_hub, push
    if args.dry_run:
        if not args.out:
            raise ValueError('--dry-run needs --out DIR.')
        out = export_for_hub(args.checkpoint, args.out, args.repo)
        print(f'dry run: {", ".join(sorted(p.name for p in out.iterdir()))} written to {out}; nothing uploaded')
    else:
        print(push(args.checkpoint, args.repo, token=args.token, private=args.private))


def _convert_paper(args: argparse.Namespace) -> None:
    from .tools.convert_paper import convert_paper_checkpoint
    out = convert_paper_checkpoint(args.checkpoint, args.arch, args.out)
    print(f'{args.checkpoint} ({args.arch}) -> {out}')


def _stl10(args: argparse.Namespace) -> None:
    from .tools.stl10 import convert_stl10
    counts = convert_stl10(args.src, args.dst, splits=args.splits)
    for split, n in counts.items():
        print(f'{split}: {n} images -> {os.path.join(args.dst, split)}')


def _deploy_args(p: argparse.ArgumentParser, positive_int, single: bool) -> None:
    """The options of an int8 TFLite export (``export``, ``profile --runtime tflm``)."""
    from .export_model import CALIBRATION_SETS, DEFAULT_CHUNK, OBSERVERS
    if single:
        p.add_argument('--patches', type=positive_int, default=None,
                       help='run the high-resolution prefix on an N x N grid of patches, in the same graph')
        p.add_argument('--split', default=None, help='the last unit of the patch-based prefix (default: the lowest '
                                                     'counted peak)')
    p.add_argument('--calib', default='digits',
                   help=f"calibration images: {', '.join(CALIBRATION_SETS)}, or a folder of images")
    p.add_argument('--calib-count', type=positive_int, default=32, help='how many calibration images')
    p.add_argument('--chunk', type=positive_int, default=DEFAULT_CHUNK,
                   help='query rows at a time in the non-local attention over the most tokens (one over fewer '
                        'tokens takes as many scores at a time)')
    p.add_argument('--observer', default='histogram', choices=OBSERVERS, help='calibration observer')
    p.add_argument('--num-classes', type=positive_int, default=10, help='classes of a fresh model')
    p.add_argument('--in-chans', type=int, default=3, choices=[1, 3], help='input channels of a fresh model')


def build_parser() -> argparse.ArgumentParser:
    from .compare import COMPARE_DEFAULTS, COMPARE_MODELS, compare
    from .profiler import ACCOUNTINGS, DTYPES
    from .trainer import add_train_args, positive_int
    parser = argparse.ArgumentParser(prog='timm-nlp', description='Self-Attentive Pooling for timm.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = add_train_args(sub.add_parser('train', help='train one model (default data: scikit-learn digits)'))
    p.set_defaults(func=_train)
    p = add_train_args(sub.add_parser(
        'compare', help='the main job: train networks that down-sample early in different ways, print accuracy, MACs '
                        'and memory, plot accuracy against memory'))
    p.add_argument('--models', nargs='+', default=list(COMPARE_MODELS))
    p.add_argument('--seeds', type=positive_int, default=1, help='train every model with this many seeds')
    p.set_defaults(func=compare, **COMPARE_DEFAULTS)
    p = sub.add_parser('profile', help='activation memory, MACs and params, per layer or compared')
    p.add_argument('models', nargs='+', help='registered model names (stock timm names too)')
    p.add_argument('--img-size', type=positive_int, default=224)
    p.add_argument('--dtype', default='float32', choices=list(DTYPES),
                   help='bytes per activation element: ' + ', '.join(f'{k} {v}' for k, v in DTYPES.items()))
    p.add_argument('--accounting', default='layers', choices=ACCOUNTINGS,
                   help='layers: every leaf module a step; mcunet: MCUNet\'s rule (norms and activations folded into '
                        'their conv, residual inputs held); inplace-dw: mcunet with in-place depthwise convs')
    p.add_argument('--patches', type=positive_int, default=None,
                   help='count patch-based execution of the high-resolution prefix on an N x N grid of patches')
    p.add_argument('--split', default=None, help='the last unit of the patch-based prefix (default: the lowest peak)')
    p.add_argument('--json', action='store_true', help='print each profile as JSON (peak_bytes, peak_layer, steps)')
    p.add_argument('--compare', action='store_true', help='one table, each model against its stock base model')
    p.add_argument('--plot', default='', help='draw the per-layer memory curves to this PNG (matplotlib)')
    p.add_argument('--runtime', default='', choices=['', 'tflm'],
                   help="tflm: export each model int8 and measure the tensor arena TFLite Micro needs (the deploy "
                        "extra), beside the tflm accounting's count")
    _deploy_args(p, positive_int, single=False)
    p.set_defaults(func=_profile)
    p = sub.add_parser('export', help='export a model: int8 TFLite for TFLite Micro (the deploy extra), or ONNX')
    p.add_argument('model', nargs='?', default='', help='registered model name or architecture string')
    p.add_argument('--checkpoint', default='', help='trained weights (model.safetensors of timm-nlp train) to export '
                                                    'instead of a fresh model')
    p.add_argument('--format', default='tflite', choices=['tflite', 'onnx'])
    p.add_argument('--int8', action='store_true', help='static int8 post-training quantisation (tflite: required)')
    p.add_argument('--img-size', type=positive_int, default=224)
    p.add_argument('--output', required=True, help='the .tflite (or .onnx) file to write')
    _deploy_args(p, positive_int, single=True)
    p.set_defaults(func=_export)
    p = sub.add_parser('push', help='publish a trained model to the Hugging Face Hub (timm format)')
    p.add_argument('checkpoint', help='model.safetensors or a training checkpoint written by timm-nlp train')
    p.add_argument('--repo', required=True, help='explicit repository id, ORG/NAME')
    p.add_argument('--dry-run', action='store_true', help='write the files to --out, upload nothing')
    p.add_argument('--out', default='', help='output folder of --dry-run')
    p.add_argument('--token', default=None, help='Hugging Face token (default: HF_TOKEN)')
    p.add_argument('--private', action='store_true')
    p.set_defaults(func=_push)
    p = sub.add_parser('convert-paper', help="convert a checkpoint of the paper's code (ann.py) to model.safetensors")
    p.add_argument('checkpoint', help=".pth written by the paper's ann.py (read with torch.load(weights_only=True))")
    p.add_argument('--arch', required=True, help="the architecture string it was trained as, e.g. resnet18-nlp-1222")
    p.add_argument('--out', required=True, help='output folder: OUT/model.safetensors, ready for timm-nlp push')
    p.set_defaults(func=_convert_paper)
    p = sub.add_parser('stl10', help="convert torchvision's STL-10 binary files to an image folder")
    p.add_argument('src', help='folder holding train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt')
    p.add_argument('dst', help='output folder: DST/train/CLASS/*.png, DST/test/CLASS/*.png')
    p.add_argument('--splits', nargs='+', default=['train', 'test'])
    p.set_defaults(func=_stl10)
    return parser


def _train(args: argparse.Namespace) -> None:
    from .trainer import train
    result = train(args)
    if result.get('output'):
        print('\n'.join(f'{k}: {v}' for k, v in result.items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``timm-nlp`` command; bad input ends in one line, ``timm-nlp CMD: error: ...``, and exit status 2.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
    """
    from timm.utils import setup_default_logging
    from .trainer import close_distributed
    setup_default_logging()
    logging.getLogger('timm').setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, ImportError) as e:  # FileNotFoundError and CheckpointError among them
        print(f"timm-nlp {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = ': rerun the same command to resume from the last finished epoch' \
            if args.command in ('train', 'compare') else ''
        print(f'timm-nlp {args.command}: interrupted{resume}.', file=sys.stderr)
        return 130
    finally:
        close_distributed()  # train() keeps the process group of torchrun for its later calls (compare)
    return 0


if __name__ == '__main__':
    sys.exit(main())
