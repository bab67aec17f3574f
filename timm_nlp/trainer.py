"""A compact trainer assembled from timm's library, for users with no timm checkout: ``timm-nlp train``.

timm.data (transforms, loaders), timm.optim, timm.scheduler, timm.task (ClassificationTask, ClassificationEvaluator,
EMA) and timm.utils (CheckpointSaver, NativeScaler) do the work and timm.models.resume_checkpoint resumes; this module
wires them to the data sets of timm_nlp.data, exports the best weights (``model.safetensors``), resumes a run in its
output folder automatically and trains DistributedDataParallel under torchrun (gloo on CPU).
"""
import argparse
import hashlib
import logging
import math
import os
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import timm
from timm.data import create_loader, resolve_data_config
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationEvaluator, ClassificationTask, evaluation_sample_limit
from timm.utils import CheckpointSaver, NativeScaler, random_seed, update_summary

from .checkpoint import (RECORD_KEY, CheckpointError, checkpoint_record, load_error_summary, load_training_checkpoint,
                         load_weights, save_weights)
from .data import DATASETS, ImageView, dataset_name, resolve_datasets
from .grammar import ArchSpec
from .interrupts import raise_if_interrupted, remembered_interrupts
from .layers import DynamicConv2d, set_dynamic_temperature
from .models import adapt_input_channels, checkpoint_filter_fn, create_model, load_stock_source
from .tools.recipes import PAPER_RECIPE, paper_decay_milestones

__all__ = ['add_train_args', 'apply_recipe', 'apply_data_defaults', 'train', 'process_device', 'positive_int',
           'close_distributed', 'create_loaders', 'resume', 'export_best_weights', 'DATA_DEFAULTS']

_logger = logging.getLogger('timm_nlp.train')


def positive_int(value: str) -> int:
    """argparse type of counts and sizes: an int of at least 1 (argparse names the option in its error)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {number}')
    return number


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``timm-nlp train`` arguments (names follow timm's train.py where they overlap).

    Args:
        parser: The parser (or sub-parser) to add them to.
    """
    parser.add_argument('--model', default='resnet18_nlp_headfix2_2222',
                        help='registered name or any architecture string (seed or timm form)')
    parser.add_argument('--recipe', default='timm-nlp', choices=['timm-nlp', 'paper'],
                        help="'paper': the paper's recipe (SGD 0.9, lr 1e-2 / 5 at 60/80/90%% of the epochs, weight "
                             'decay 0, batch 8, mean = std = 0.5, bilinear) for every option left at its default')
    parser.add_argument('--data-dir', default='', help='image folder with train/ and val/ (or test/)')
    parser.add_argument('--dataset', default='',
                        help=f"one of {', '.join(DATASETS)}: 'fashion-mnist' reads its IDX files in --data-dir (by "
                             "default Debian's dataset-fashion-mnist folder), torch/ ones torchvision's files in "
                             '--data-dir; evaluated on the test split. Default: the image folder of --data-dir, '
                             "else scikit-learn's digits")
    parser.add_argument('--in-chans', type=int, default=3, choices=[1, 3],
                        help='input channels: every data set is read as grey images with 1, as RGB with 3 (the '
                             "default: stock weights and the paper's 3-channel stems; grey images are replicated)")
    parser.add_argument('--train-subset', type=positive_int, default=None,
                        help='train on a fixed, class-balanced subset of this many training images')
    parser.add_argument('--eval-subset', type=positive_int, default=None,
                        help='evaluate on a fixed, class-balanced subset of this many test images (quick runs)')
    parser.add_argument('--dataset-download', action='store_true', help='let a torch/ dataset download itself')
    parser.add_argument('--val-split', default='validation')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--output', default='output/train', help='run directory (checkpoints, summary.csv)')
    parser.add_argument('--epochs', type=positive_int, default=5)
    parser.add_argument('--batch-size', '-b', type=positive_int, default=32)
    parser.add_argument('--img-size', type=positive_int, default=32)
    parser.add_argument('--opt', default='sgd')
    parser.add_argument('--lr', type=float, default=None,
                        help='learning rate (default: per data set: 0.005 for Fashion-MNIST, else 0.02)')
    parser.add_argument('--momentum', type=float, default=0.9)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--sched', default='cosine',
                        choices=['cosine', 'tanh', 'step', 'multistep', 'poly', 'constant'])
    parser.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    parser.add_argument('--decay-rate', type=float, default=0.1)
    parser.add_argument('--warmup-epochs', type=int, default=0)
    parser.add_argument('--min-lr', type=float, default=0.)
    parser.add_argument('--drop', type=float, default=0., help='classifier dropout')
    parser.add_argument('--smoothing', type=float, default=0.)
    parser.add_argument('--no-aug', action='store_true', help='resize and center crop only')
    parser.add_argument('--mean', type=float, nargs='+', default=None,
                        help="normalisation mean, one value or one per input channel (default: the model's)")
    parser.add_argument('--std', type=float, nargs='+', default=None,
                        help="normalisation std, one value or one per input channel (default: the model's)")
    parser.add_argument('--interpolation', default='', help="resize interpolation (default: the model's)")
    parser.add_argument('--hflip', type=float, default=None,
                        help='flip probability (default: per data set: 0 for digits, else 0.5)')
    parser.add_argument('--scale', type=float, nargs=2, default=None,
                        help='random-resized-crop scale range (default: per data set: 0.6 1 for digits, 1 1 (the whole '
                             'image) for Fashion-MNIST, else 0.08 1)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (torch.autocast), as timm\'s train.py')
    parser.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
                        help='float16 scales the loss (timm\'s NativeScaler; its state is checkpointed)')
    parser.add_argument('--model-ema', action='store_true',
                        help='keep an EMA of the weights; its eval ranks checkpoints, model.safetensors holds it')
    parser.add_argument('--model-ema-decay', type=float, default=0.998)
    parser.add_argument('--stock-weights', default='',
                        help='start from stock timm weights of the base model: a timm name with tag (from the Hub, '
                             'e.g. resnet18.a1_in1k) or a checkpoint file; the pooling modules keep their init')
    parser.add_argument('--initial-checkpoint', default='',
                        help='start from these weights; a classifier of another class count keeps its init')
    parser.add_argument('--resume', default='auto',
                        help="'auto': continue from OUTPUT/last.pth.tar if present; 'none'; or a file")
    parser.add_argument('--dy-anneal-epochs', type=int, default=0,
                        help='dynamic convs: anneal the temperature linearly from its initial value (34) to 1 over '
                             'these epochs, as the dynamic-conv paper does (default 0: fixed, as in the paper\'s '
                             'code)')
    parser.add_argument('--checkpoint-hist', type=positive_int, default=3)
    parser.add_argument('--workers', '-j', type=int, default=0)
    parser.add_argument('--threads', type=positive_int, default=None,
                        help="CPU threads of torch's operators (torch.set_num_threads; default: torch's choice)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--recipe paper`` (``timm_nlp.tools.recipes.PAPER_RECIPE``) applied to every option left at
    its default, the decay milestones at 60, 80 and 90% of ``--epochs``.

    Args:
        args: ``timm-nlp train`` arguments.
    """
    if getattr(args, 'recipe', 'timm-nlp') != 'paper':
        return args
    defaults = vars(add_train_args(argparse.ArgumentParser()).parse_args([]))
    for key, value in dict(PAPER_RECIPE, decay_milestones=paper_decay_milestones(args.epochs)).items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    return args


# The defaults that depend on the data, each applied where its option is left out (docs/training.md#defaults, with
# the short runs behind them). Digits (scikit-learn's, torch/mnist, kmnist, qmnist): no flips (a flipped digit is
# another digit, or none), crops of most of the image. Fashion-MNIST: the whole 28-pixel photograph, flipped, at a
# lower learning rate. Other images: timm's random-resized crops and flips.
DATA_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'digits': dict(lr=0.02, hflip=0., scale=(0.6, 1.)),
    'fashion-mnist': dict(lr=0.005, hflip=0.5, scale=(1., 1.)),
    'images': dict(lr=0.02, hflip=0.5, scale=(0.08, 1.)),
}


def apply_data_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``DATA_DEFAULTS`` of its data set filled in where an option was left out (None).

    Args:
        args: ``timm-nlp train`` arguments.
    """
    name = (args.dataset or '').lower()
    kind = 'fashion-mnist' if name in ('fashion-mnist', 'torch/fashion_mnist') else \
        'digits' if (not name and not args.data_dir) or name in ('torch/mnist', 'torch/kmnist', 'torch/qmnist') \
        else 'images'
    for key, value in DATA_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def process_device(device: str) -> str:
    """The device of this process: under torchrun, a CUDA device is the GPU of its LOCAL_RANK, whatever index was
    given (as in timm's train.py), so that the processes of a node do not all share one GPU.

    Args:
        device: The --device option.
    """
    if device.startswith('cuda') and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _init_distributed(device: str) -> Tuple[bool, int, int]:
    """Join torchrun's process group, once per process: later ``train`` calls (compare) reuse it."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return False, 0, 1
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Leave the process group ``train`` joined under torchrun, if any (call once, after the last ``train``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes and bytes), to compare replicas."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _same_architecture(a: str, b: str) -> bool:
    """Two spellings of one architecture (seed or timm form, any case), or the same stock timm name."""
    if a == b:
        return True
    try:
        return ArchSpec.parse(a) == ArchSpec.parse(b)
    except ValueError:  # a stock timm model
        return False


def _build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    try:
        model = create_model(args.model, num_classes=num_classes, drop_rate=args.drop, in_chans=args.in_chans)
    except (RuntimeError, ValueError) as e:
        if timm.is_model(args.model):
            raise
        raise ValueError(f"Unknown model '{args.model}': not a registered timm model and not a valid "
                         f'architecture string ({e}).') from None
    if args.stock_weights:
        if not hasattr(model, 'arch'):
            raise ValueError('--stock-weights applies to timm-nlp pooled models only.')
        load_stock_source(model, args.stock_weights)
    if args.initial_checkpoint:
        _load_initial_checkpoint(model, args.initial_checkpoint)
    return model


def _load_initial_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load ``--initial-checkpoint`` weights as published weights load (``checkpoint_filter_fn``).

    A classifier of another class count keeps its initialisation (reset, as timm does); a first conv of another
    ``in_chans`` is adapted; a checkpoint of another architecture raises a ValueError: by the architecture its
    timm-nlp record names (which tells apart architectures with the same tensors, e.g. maxp and avgp), else naming
    the tensors that do not match.
    """
    arch: Optional[ArchSpec] = getattr(model, 'arch', None)
    recorded = checkpoint_record(path).get('architecture')
    if arch is not None and recorded and not _same_architecture(recorded, arch.seed):
        raise ValueError(f"'{path}' holds weights of {recorded}, not of {arch.seed}: --initial-checkpoint needs the "
                         'same architecture (--stock-weights starts a pooled model from stock weights of its base).')
    state_dict = adapt_input_channels(checkpoint_filter_fn(load_weights(path), model), model)
    model.load_state_dict(state_dict, strict=False)
    reset = [k for k in model.state_dict() if k not in state_dict]
    if reset:
        _logger.warning(f"'{path}' has another class count: {', '.join(reset)} keep their initialisation")


def _anneal_start(args: argparse.Namespace, model: torch.nn.Module) -> Optional[float]:
    """The initial temperature of the dynamic convolutions that ``--dy-anneal-epochs`` anneals, None without it."""
    if args.dy_anneal_epochs <= 0:
        return None
    temperatures = [m.temperature.item() for m in model.modules() if isinstance(m, DynamicConv2d)]
    if not temperatures:
        raise ValueError(f'--dy-anneal-epochs: {args.model} has no dynamic convolutions (a dy... model has them).')
    return temperatures[0]


def _per_channel(values: Sequence[float], in_chans: int, option: str, given: bool) -> Tuple[float, ...]:
    """Normalisation ``values`` for ``in_chans`` channels: one value is repeated; the model's 3 values average for
    a grey input; values given for another channel count are an error."""
    values = tuple(values)
    if len(values) == in_chans:
        return values
    if given and len(set(values)) > 1:
        raise ValueError(f'{option} has {len(values)} values, and --in-chans {in_chans} takes {in_chans} (or one '
                         'for every channel).')
    return (sum(values) / len(values),) * in_chans


def create_loaders(args: argparse.Namespace, train_ds: ImageView, eval_ds: ImageView, model: torch.nn.Module,
                   device: torch.device, distributed: bool) -> Tuple[Any, Any, Dict[str, Any]]:
    """timm's train and eval loaders and the data config (input size, mean, std, interpolation) they use.

    Args:
        args: ``timm-nlp train`` arguments, data defaults applied (``apply_data_defaults``).
        train_ds: The training images.
        eval_ds: The test images (resized and center-cropped whole).
        model: The model, whose pretrained config gives the normalisation and interpolation not set in ``args``.
        device: This process's device.
        distributed: Shard the batches over torchrun's processes.
    """
    given = {k: _per_channel(getattr(args, k), args.in_chans, f'--{k}', True) for k in ('mean', 'std')
             if getattr(args, k) is not None}
    data_cfg = resolve_data_config(dict(input_size=(args.in_chans, args.img_size, args.img_size),
                                        interpolation=args.interpolation, **given), model=model)
    for key in ('mean', 'std'):  # the model's 3 values average for a grey input
        data_cfg[key] = _per_channel(data_cfg[key], args.in_chans, f'--{key}', False)
    kw = dict(input_size=data_cfg['input_size'], mean=data_cfg['mean'], std=data_cfg['std'],
              interpolation=data_cfg['interpolation'], num_workers=args.workers, distributed=distributed,
              use_prefetcher=False, device=device, persistent_workers=False)  # workers seeded per epoch
    train_loader = create_loader(train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
                                 hflip=args.hflip, scale=tuple(args.scale), color_jitter=0., **kw)
    eval_loader = create_loader(eval_ds, batch_size=args.batch_size, is_training=False, crop_pct=1.0, **kw)
    return train_loader, eval_loader, data_cfg


def _create_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum)
    except ValueError as e:
        if args.opt.lower() in list_optimizers():
            raise
        raise ValueError(f"--opt {args.opt}: not one of timm's optimizers: {', '.join(list_optimizers())}.") from e


def _check_batch_size(args: argparse.Namespace, images: int, world: int) -> None:
    per_process = math.ceil(images / world)
    if per_process < args.batch_size:
        where = f'{images} training images' if world == 1 else \
            f'{per_process} training images of each process ({images} split over {world} processes)'
        raise ValueError(f'--batch-size {args.batch_size} is larger than the {where}: the incomplete last batch is '
                         f'dropped, so nothing would be trained; use --batch-size {per_process} or less.')


def _amp(args: argparse.Namespace, device: torch.device) -> Tuple[Callable[[], Any], Optional[NativeScaler]]:
    """The autocast context of ``--amp`` (as timm's train.py) and, for float16, timm's loss scaler."""
    if not args.amp:
        return nullcontext, None
    dtype = getattr(torch, args.amp_dtype)
    return partial(torch.autocast, device_type=device.type, dtype=dtype), \
        NativeScaler(device=device.type) if dtype == torch.float16 else None


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    if args.resume == 'none':
        return None
    if args.resume != 'auto':
        if not os.path.isfile(args.resume):
            raise FileNotFoundError(f"Resume checkpoint '{args.resume}' does not exist.")
        return args.resume
    path = os.path.join(args.output, 'last.pth.tar')
    if not os.path.isfile(path) and os.path.isfile(os.path.join(args.output, 'last.safetensors')):
        load_training_checkpoint(os.path.join(args.output, 'last.safetensors'))  # an earlier format: refused
    return path if os.path.isfile(path) else None


def resume(args: argparse.Namespace, model: torch.nn.Module, task: ClassificationTask, optimizer: Any,
           loss_scaler: Optional[NativeScaler], saver: Optional[CheckpointSaver],
           num_epochs: int) -> Tuple[int, Optional[Dict[str, Any]]]:
    """Continue the run of ``--resume`` (``auto``: ``OUTPUT/last.pth.tar``) with timm's ``resume_checkpoint``.

    Model, EMA, optimizer, loss-scaler and saver state are restored; a checkpoint of another architecture (spellings
    of the same one agree), input-channel count or tensors is refused with the reason, in one line.

    Args:
        args: ``timm-nlp train`` arguments.
        model: The freshly built model.
        task: Its ClassificationTask (its EMA is restored).
        optimizer: The optimizer.
        loss_scaler: The AMP loss scaler, if any.
        saver: The checkpoint saver (on rank 0), whose history continues.
        num_epochs: The run's epoch count.

    Returns:
        The epoch to start at (0 without a checkpoint) and, for a finished run, its checkpoint (with the recorded
        ``metrics``, ``train_img_s`` and ``eval_img_s``).
    """
    path = _resume_path(args)
    if path is None:
        return 0, None
    ckpt = load_training_checkpoint(path)
    recorded = ckpt.get('arch') or args.model
    if not _same_architecture(recorded, args.model):
        raise CheckpointError(f"'{path}' is a checkpoint of '{recorded}', not of '{args.model}'; use another --output.")
    chans = (ckpt.get('recipe') or {}).get('in_chans', args.in_chans)
    if chans != args.in_chans:
        raise CheckpointError(f"'{path}' was trained with --in-chans {chans}: rerun with --in-chans {chans}, or use "
                              'another --output.')
    try:
        start_epoch = resume_checkpoint(model, path, optimizer, loss_scaler, log_info=False)
        if 'state_dict_ema' in ckpt and task.has_ema():
            task.load_checkpoint_state(ckpt['state_dict_ema'], ema=True)
    except RuntimeError as e:
        raise CheckpointError(f"'{path}' does not match {args.model}: {load_error_summary(e)}.") from None
    eval_metric = 'ema_top1' if task.has_ema() else 'top1'
    if saver is not None and ckpt.get('eval_metric', 'top1') == eval_metric:
        saver.load_state_dict_from_checkpoint(path)
    elif saver is not None and start_epoch < num_epochs:  # earlier checkpoints ranked by another metric
        _logger.warning(f"'{path}' ranked its checkpoints by {ckpt.get('eval_metric', 'top1')}; this run ranks "
                        f'by {eval_metric}: the best checkpoint is chosen among the epochs from here on.')
    if saver is not None:
        _logger.info(f"Resumed from '{path}' at epoch {start_epoch} of {num_epochs}")
    return start_epoch, ckpt if start_epoch >= num_epochs else None


def export_best_weights(output: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``OUTPUT/model.safetensors``: the weights of ``model_best.pth.tar`` that its own eval metric ranked
    (the EMA's with ``--model-ema``), with the run's record as metadata.

    Args:
        output: The run's folder.
        record: The run's record; the best checkpoint's own record, epoch and metric take precedence.

    Returns:
        ``eval_metric``, ``best_top1``, ``best_epoch`` and ``weights`` (the file's path); empty without a best
        checkpoint.
    """
    best_path = os.path.join(output, 'model_best.pth.tar')
    if not os.path.isfile(best_path):
        return {}
    best = load_training_checkpoint(best_path)
    ranked_by = best.get('eval_metric', 'top1')
    weights = best['state_dict_ema'] if ranked_by == 'ema_top1' else best['state_dict']
    path = os.path.join(output, 'model.safetensors')
    meta = {k: best.get(k, v) for k, v in record.items() if k not in ('top1', 'metrics', 'train_img_s', 'eval_img_s')}
    save_weights(path, weights, dict(meta, epoch=best['epoch'], top1=best['metric']))
    return dict(eval_metric=ranked_by, best_top1=best['metric'], best_epoch=best['epoch'], weights=path)


@remembered_interrupts()  # a Ctrl-C that Python drops (in a finaliser) is raised at the next batch
def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Train one model, as ``timm-nlp train`` does: the recipe and data defaults applied, checkpoints in
    ``args.output`` (where a rerun resumes), ``summary.csv`` with every epoch's test metrics, DistributedDataParallel
    under torchrun.

    Args:
        args: Arguments of ``add_train_args``.

    Returns:
        The final metrics (``top1``, ``best_top1``, ``best_epoch``, ``last_top1``, ``eval_metric``), ``num_classes``,
        ``params``, ``train_img_s`` / ``eval_img_s`` and the paths ``output`` and ``weights`` (the best weights,
        ``model.safetensors``); on a non-zero rank, ``output`` is None.
    """
    args = apply_data_defaults(apply_recipe(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(process_device(args.device))
    distributed, rank, world = _init_distributed(str(device))
    random_seed(args.seed)
    train_ds, eval_ds, num_classes = resolve_datasets(args)
    _check_batch_size(args, len(train_ds), world)
    model = _build_model(args, num_classes).to(device)
    anneal_from = _anneal_start(args, model)
    train_loader, eval_loader, data_cfg = create_loaders(args, train_ds, eval_ds, model, device, distributed)
    task = ClassificationTask(model, criterion_kwargs=dict(smoothing=args.smoothing), device=device, verbose=False)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
    optimizer = _create_optimizer(args, model)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
        updates_per_epoch=len(train_loader))
    autocast, loss_scaler = _amp(args, device)
    # with EMA, checkpoints are ranked (and model.safetensors is chosen and scored) by the EMA eval, as in timm
    eval_metric = 'ema_top1' if task.has_ema() else 'top1'
    # the run's record, in every checkpoint (timm-nlp push) with its epoch's results (returned on a rerun)
    record = dict(architecture=args.model, num_classes=num_classes, label_names=train_ds.label_names,
                  recipe=_recipe(args, data_cfg), eval_metric=eval_metric)
    saver = _checkpoint_saver(args, model, task, optimizer, loss_scaler, record) if rank == 0 else None
    start_epoch, finished = resume(args, model, task, optimizer, loss_scaler, saver, num_epochs)
    metrics, train_ips, eval_ips = (finished['metrics'], finished['train_img_s'], finished['eval_img_s']) \
        if finished else ({}, 0., 0.)
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
    if distributed:
        task.prepare_distributed()
    if start_epoch > 0:
        scheduler.step(start_epoch)
    for epoch in range(start_epoch, num_epochs):
        # epoch-seeded shuffling and augmentation (torch, numpy, python): a resumed run replays the same epochs
        random_seed(args.seed + epoch, rank)
        if distributed:
            train_loader.sampler.set_epoch(epoch)
        if anneal_from is not None:  # linear from the initial temperature to 1 over --dy-anneal-epochs
            set_dynamic_temperature(model, max(1., anneal_from - (anneal_from - 1.) * epoch / args.dy_anneal_epochs))
        train_metrics, train_ips = _train_one_epoch(task, optimizer, scheduler, train_loader, epoch, num_epochs,
                                                    autocast, loss_scaler, progress=rank == 0 and not args.no_progress)
        metrics, eval_ips = _evaluate(task.get_eval_model(), eval_loader, autocast, distributed)
        if task.has_ema():
            ema_metrics, _ = _evaluate(task.get_eval_model(ema=True), eval_loader, autocast, distributed)
            metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        scheduler.step(epoch + 1, metrics[eval_metric])
        if saver is not None:
            _log_epoch(args.output, epoch, num_epochs, train_metrics, metrics, optimizer.param_groups[0]['lr'],
                       train_ips)
            # top1: the eval of the checkpoint's state_dict (what push exports); metric: what ranks the checkpoints
            record.update(top1=metrics['top1'], metrics=metrics, train_img_s=train_ips, eval_img_s=eval_ips)
            saver.save_checkpoint(epoch, metric=metrics[eval_metric])
    digest = weights_digest(model)
    _logger.info(f'rank {rank} final weights sha256 {digest}')
    result = dict(model=args.model, epochs=num_epochs, start_epoch=start_epoch, weights_sha256=digest,
                  num_classes=num_classes, params=sum(p.numel() for p in model.parameters()), train_img_s=train_ips,
                  eval_img_s=eval_ips, **metrics)
    if rank == 0 and (best := export_best_weights(args.output, record)):
        result.update(best, last_top1=metrics.get(best['eval_metric']), output=args.output)
    if distributed:  # the process group stays for further train() calls (compare); the caller destroys it
        dist.barrier()
    return result


def _checkpoint_saver(args: argparse.Namespace, model: torch.nn.Module, task: ClassificationTask, optimizer: Any,
                      loss_scaler: Optional[NativeScaler], record: Dict[str, Any]) -> CheckpointSaver:
    """timm's saver of the run's checkpoints; their ``args`` are the run's arguments with its ``record``, which
    the trainer updates with each epoch's results before it saves."""
    run_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)}, **{RECORD_KEY: record})
    return CheckpointSaver(model, optimizer, args=run_args, amp_scaler=loss_scaler, task=task,
                           checkpoint_dir=args.output, recovery_dir=args.output, max_history=args.checkpoint_hist)


def _log_epoch(output: str, epoch: int, num_epochs: int, train_metrics: Dict[str, float], metrics: Dict[str, float],
               lr: float, train_ips: float) -> None:
    _logger.info(f"epoch {epoch + 1}/{num_epochs}  train_loss {train_metrics['loss']:.4f}  "
                 f"eval_loss {metrics['loss']:.4f}  top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
                 f"lr {lr:.2e}  train {train_ips:.0f} img/s")
    update_summary(epoch, train_metrics, metrics, os.path.join(output, 'summary.csv'), lr=lr, write_header=epoch == 0)


def _recipe(args: argparse.Namespace, data_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The training recipe recorded with the exported weights (the Hub model card; push's preprocessing config)."""
    return dict(dataset=dataset_name(args), train_subset=args.train_subset, eval_subset=args.eval_subset,
                in_chans=args.in_chans, recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                img_size=args.img_size, opt=args.opt, lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, sched=args.sched, drop=args.drop, seed=args.seed,
                stock_weights=args.stock_weights or None, model_ema=args.model_ema, no_aug=args.no_aug,
                mean=list(data_cfg['mean']), std=list(data_cfg['std']), interpolation=data_cfg['interpolation'])


def _train_one_epoch(task, optimizer, scheduler, loader, epoch: int, num_epochs: int, autocast, loss_scaler,
                     progress: bool) -> Tuple[Dict[str, float], float]:
    task.train()
    num_updates = epoch * len(loader)
    loss_sum, seen, start = 0., 0, time.perf_counter()
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=f'epoch {epoch + 1}/{num_epochs}', leave=False, dynamic_ncols=True)
    for images, targets in batches:
        raise_if_interrupted()
        images, targets = images.to(task.device), targets.to(task.device)
        with autocast():
            loss = task(images, targets)['loss']
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
        task.update_ema(step=num_updates)
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.item() * images.shape[0]
        seen += images.shape[0]
        if progress:
            batches.set_postfix(loss=f'{loss.item():.3f}')
    elapsed = time.perf_counter() - start
    return {'loss': loss_sum / max(seen, 1)}, seen / max(elapsed, 1e-9)


@torch.no_grad()
def _evaluate(model, loader, autocast, distributed: bool) -> Tuple[Dict[str, float], float]:
    model.eval()
    device = next(model.parameters()).device
    evaluator = ClassificationEvaluator(device, max_samples=evaluation_sample_limit(loader))
    seen, start = 0, time.perf_counter()
    for images, targets in loader:
        raise_if_interrupted()
        images, targets = images.to(device), targets.to(device)
        with autocast():
            output = model(images)
        evaluator.update(output.float(), targets)
        seen += images.shape[0]
    elapsed = time.perf_counter() - start
    return dict(evaluator.compute(distributed=distributed)), seen / max(elapsed, 1e-9)


def parse_models(models: Sequence[str]) -> List[str]:
    """Validate model names before any training starts.

    Args:
        models: Registered names or architecture strings.
    """
    for name in models:
        if not timm.is_model(name):
            ArchSpec.parse(name)  # raises a ValueError naming the bad token
    return list(models)
