"""A compact trainer assembled from timm's library, for users with no timm checkout: ``timm-nlp train``.

timm.data (datasets, transforms, loaders), timm.optim, timm.scheduler, timm.task (ClassificationTask,
ClassificationEvaluator, EMA) and timm.utils (CheckpointSaver) do the work; this module wires them, adds
the data sets (timm_nlp.data: Fashion-MNIST, scikit-learn's digits, image folders), safetensors
checkpoints, automatic resume and DistributedDataParallel under torchrun (gloo on CPU).
"""
import argparse
import hashlib
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

import timm
from timm.data import create_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationEvaluator, ClassificationTask, evaluation_sample_limit
from timm.utils import random_seed, update_summary

from .checkpoint import SafetensorsCheckpointSaver, load_training_checkpoint, load_weights, read_metadata, save_weights
from .data import DigitsDataset, FashionMNIST, resolve_datasets
from .grammar import ArchSpec
from .layers import DynamicConv2d, set_dynamic_temperature
from .models import adapt_input_channels, checkpoint_filter_fn, create_model, load_stock_source

__all__ = ['add_train_args', 'apply_recipe', 'train', 'process_device', 'positive_int', 'close_distributed']

_logger = logging.getLogger('timm_nlp.train')


def positive_int(value: str) -> int:
    """argparse type of counts and sizes: an int of at least 1 (argparse names the option in its error)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {number}')
    return number


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``timm-nlp train`` arguments (names follow timm's train.py where they overlap)."""
    parser.add_argument('--model', default='resnet18_nlp_headfix2_2222',
                        help='registered name or any architecture string (seed or timm form)')
    parser.add_argument('--recipe', default='timm-nlp', choices=['timm-nlp', 'paper'],
                        help="'paper': the paper's recipe (SGD 0.9, lr 1e-2 / 5 at 60/80/90%% of the epochs, weight "
                             'decay 0, batch 8, mean = std = 0.5, bilinear) for every option left at its default')
    parser.add_argument('--data-dir', default='', help='image folder with train/ and val/ (or test/)')
    parser.add_argument('--dataset', default='',
                        help="'fashion-mnist' (its IDX files in --data-dir, by default Debian's dataset-fashion-mnist "
                             "folder; evaluated on its test set), or a timm dataset name, e.g. torch/cifar100 (root: "
                             '--data-dir)')
    parser.add_argument('--in-chans', type=int, default=3, choices=[1, 3],
                        help='image channels: grey data sets (digits, Fashion-MNIST) are replicated to RGB with 3 '
                             '(the default: stock weights and the paper\'s 3-channel stems), grey with 1')
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
    parser.add_argument('--lr', type=float, default=0.02,
                        help="the paper's networks (no zero init of the blocks' last BN) diverge at 0.1 on the digits")
    parser.add_argument('--momentum', type=float, default=0.9)
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--sched', default='cosine')
    parser.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    parser.add_argument('--decay-rate', type=float, default=0.1)
    parser.add_argument('--warmup-epochs', type=int, default=0)
    parser.add_argument('--min-lr', type=float, default=0.)
    parser.add_argument('--drop', type=float, default=0., help='classifier dropout')
    parser.add_argument('--smoothing', type=float, default=0.)
    parser.add_argument('--no-aug', action='store_true', help='resize and center crop only')
    parser.add_argument('--mean', type=float, nargs=3, default=None, help="normalisation mean (default: the model's)")
    parser.add_argument('--std', type=float, nargs=3, default=None, help="normalisation std (default: the model's)")
    parser.add_argument('--interpolation', default='', help="resize interpolation (default: the model's)")
    parser.add_argument('--hflip', type=float, default=None, help='flip probability (default 0.5; 0 for digits)')
    parser.add_argument('--scale', type=float, nargs=2, default=None,
                        help='random-resized-crop scale range (default 0.08 1; 0.6 1 for digits)')
    parser.add_argument('--model-ema', action='store_true',
                        help='keep an EMA of the weights; its eval ranks checkpoints, model.safetensors holds it')
    parser.add_argument('--model-ema-decay', type=float, default=0.998)
    parser.add_argument('--stock-weights', default='',
                        help='start from stock timm weights of the base model: a timm name with tag (from the Hub, '
                             'e.g. resnet18.a1_in1k) or a checkpoint file; the pooling modules keep their init')
    parser.add_argument('--initial-checkpoint', default='',
                        help='start from these weights; a classifier of another class count keeps its init')
    parser.add_argument('--resume', default='auto',
                        help="'auto': continue from OUTPUT/last.safetensors if present; 'none'; or a file")
    parser.add_argument('--dy-anneal-epochs', type=int, default=0,
                        help='dynamic convs: anneal the temperature linearly from its initial value (34) to 1 over '
                             'these epochs, as the dynamic-conv paper does (default 0: fixed, as in the paper\'s '
                             'code)')
    parser.add_argument('--checkpoint-hist', type=int, default=3)
    parser.add_argument('--workers', '-j', type=int, default=0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


# The paper's ann.py (STL-10): plain SGD, no weight decay, label smoothing, dropout, colour
# jitter or warm-up; Resize + RandomResizedCrop and flips for training, resize and center crop of the whole image
# for testing; mean = std = 0.5; lr / 5 at 60, 80 and 90% of the epochs
PAPER_RECIPE: Dict[str, Any] = dict(
    opt='sgd', momentum=0.9, weight_decay=0., lr=1e-2, sched='multistep', decay_rate=0.2, warmup_epochs=0,
    smoothing=0., drop=0., batch_size=8, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation='bilinear',
    hflip=0.5, scale=[0.08, 1.])


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--recipe paper`` applied to every option left at its default (the decay milestones at 60, 80
    and 90% of ``--epochs``, as ``int(fraction * epochs)``, the paper's rounding)."""
    if getattr(args, 'recipe', 'timm-nlp') != 'paper':
        return args
    defaults = vars(add_train_args(argparse.ArgumentParser()).parse_args([]))
    recipe = dict(PAPER_RECIPE, decay_milestones=[int(f * args.epochs) for f in (0.6, 0.8, 0.9)])
    for key, value in recipe.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    return args


def process_device(device: str) -> str:
    """The device of this process: under torchrun, a CUDA device is the GPU of its LOCAL_RANK, whatever index was
    given (as in timm's train.py), so that the processes of a node do not all share one GPU."""
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


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    if args.resume == 'none':
        return None
    if args.resume == 'auto':
        path = os.path.join(args.output, 'last.safetensors')
        return path if os.path.isfile(path) else None
    if not os.path.isfile(args.resume):
        raise FileNotFoundError(f"Resume checkpoint '{args.resume}' does not exist.")
    return args.resume


def _dy_temperature(epoch: int, anneal_epochs: int, start: float) -> float:
    """The annealed temperature of ``epoch``: linear from ``start`` to 1 over ``anneal_epochs`` epochs."""
    return max(1., start - (start - 1.) * epoch / anneal_epochs)


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
    timm-nlp metadata records (which tells apart architectures with the same tensors, e.g. maxp and avgp), else
    naming the tensors that do not match.
    """
    _check_recorded_architecture(model, path)
    state_dict = adapt_input_channels(checkpoint_filter_fn(load_weights(path), model), model)
    model.load_state_dict(state_dict, strict=False)
    reset = [k for k in model.state_dict() if k not in state_dict]
    if reset:
        _logger.warning(f"'{path}' has another class count: {', '.join(reset)} keep their initialisation")


def _check_recorded_architecture(model: torch.nn.Module, path: str) -> None:
    """Raise a ValueError if the timm-nlp metadata of checkpoint ``path`` records another architecture than the
    pooled ``model``'s (compared as parsed ArchSpecs, so seed and timm spellings agree)."""
    arch: Optional[ArchSpec] = getattr(model, 'arch', None)
    recorded = (read_metadata(path) or {}).get('architecture') if path.endswith('.safetensors') else None
    if arch is None or not recorded:
        return
    try:
        same = ArchSpec.parse(recorded) == arch
    except ValueError:  # a stock timm model
        same = False
    if not same:
        raise ValueError(f"'{path}' holds weights of {recorded}, not of {arch.seed}: --initial-checkpoint needs the "
                         'same architecture (--stock-weights starts a pooled model from stock weights of its base).')


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Train one model, as ``timm-nlp train`` does (``args`` from ``add_train_args``; ``apply_recipe`` fills a recipe).

    Checkpoints (safetensors) go to ``args.output``, a run there resumes from its last epoch, ``summary.csv`` logs
    every epoch's test top-1; under torchrun it trains DistributedDataParallel.

    Returns:
        The final metrics (``top1``, ``best_top1``, ``best_epoch``, ``last_top1``, ``eval_metric``), ``params``,
        ``train_img_s`` / ``eval_img_s`` and the paths ``output`` and ``weights`` (the best weights,
        ``model.safetensors``); on a non-zero rank, ``output`` is None.
    """
    args = apply_recipe(args)
    device = torch.device(process_device(args.device))
    distributed, rank, world = _init_distributed(str(device))
    random_seed(args.seed)
    train_ds, eval_ds, num_classes = resolve_datasets(args)
    per_process = math.ceil(len(train_ds) / world)
    if per_process < args.batch_size:
        images = f'{len(train_ds)} training images' if world == 1 else \
            f'{per_process} training images of each process ({len(train_ds)} split over {world} processes)'
        raise ValueError(f'--batch-size {args.batch_size} is larger than the {images}: the incomplete last batch is '
                         f'dropped, so nothing would be trained; use --batch-size {per_process} or less.')
    model = _build_model(args, num_classes).to(device)
    data_cfg = resolve_data_config(dict(input_size=(args.in_chans, args.img_size, args.img_size), mean=args.mean,
                                        std=args.std, interpolation=args.interpolation), model=model)
    for key in ('mean', 'std'):  # one channel: the mean of the model's per-channel values
        if len(data_cfg[key]) != args.in_chans:
            data_cfg[key] = (sum(data_cfg[key]) / len(data_cfg[key]),) * args.in_chans
    loader_kw = dict(input_size=data_cfg['input_size'], mean=data_cfg['mean'], std=data_cfg['std'],
                     interpolation=data_cfg['interpolation'], num_workers=args.workers, distributed=distributed,
                     use_prefetcher=False, device=device, persistent_workers=False)  # workers seeded per epoch
    base = train_ds.dataset if isinstance(train_ds, Subset) else train_ds
    digits = isinstance(base, DigitsDataset)  # a flipped digit is another digit, or none
    small = digits or isinstance(base, FashionMNIST)  # 8 or 28 px originals: crops of most of the image
    hflip = args.hflip if args.hflip is not None else (0. if digits else 0.5)
    scale = tuple(args.scale) if args.scale is not None else ((0.6, 1.) if small else (0.08, 1.))
    train_loader = create_loader(
        train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, hflip=hflip, scale=scale,
        color_jitter=0., **loader_kw)
    eval_loader = create_loader(eval_ds, batch_size=args.batch_size, is_training=False, crop_pct=1.0, **loader_kw)
    task = ClassificationTask(model, criterion_kwargs=dict(smoothing=args.smoothing), device=device, verbose=False)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
        updates_per_epoch=len(train_loader))
    temperatures = [m.temperature.item() for m in model.modules() if isinstance(m, DynamicConv2d)]
    anneal_from = temperatures[0] if temperatures and args.dy_anneal_epochs > 0 else None

    # with EMA, checkpoints are ranked (and model.safetensors is chosen and scored) by the EMA eval, as in timm
    eval_metric = 'ema_top1' if task.has_ema() else 'top1'
    export_meta = dict(architecture=args.model, num_classes=num_classes, label_names=_label_names(train_ds),
                       recipe=_recipe(args, train_ds))
    start_epoch = 0
    metrics: Dict[str, float] = {}
    train_ips = eval_ips = 0.
    resume = _resume_path(args)
    saver = None
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        # every checkpoint describes itself (timm-nlp push) and records its epoch's results (returned on a rerun)
        saver = SafetensorsCheckpointSaver(model, optimizer, args=args, task=task, checkpoint_dir=args.output,
                                           recovery_dir=args.output, max_history=args.checkpoint_hist,
                                           metadata=dict(export_meta, eval_metric=eval_metric))
    if resume:
        ckpt = load_training_checkpoint(resume)
        if 'state_dict' not in ckpt:
            raise ValueError(f"'{resume}' holds plain model weights, not a training checkpoint (last.safetensors, "
                             'checkpoint-N.safetensors); to start from these weights, use --initial-checkpoint.')
        if ckpt.get('arch') not in (None, args.model):
            raise ValueError(f"'{resume}' is a checkpoint of '{ckpt.get('arch')}', not of '{args.model}'.")
        model.load_state_dict(ckpt['state_dict'])
        if 'state_dict_ema' in ckpt and task.has_ema():
            task.load_checkpoint_state(ckpt['state_dict_ema'], ema=True)
        optimizer.load_state_dict(ckpt['optimizer'])
        start_epoch = ckpt['epoch'] + 1
        if start_epoch >= num_epochs:  # a finished run: return the results its checkpoint recorded
            if 'metrics' not in ckpt:
                raise ValueError(f"'{resume}' ends a finished {start_epoch}-epoch run but records no metrics (written "
                                 'by an older timm-nlp); use another --output, or more --epochs to continue it.')
            metrics, train_ips, eval_ips = ckpt['metrics'], ckpt['train_img_s'], ckpt['eval_img_s']
        if saver is not None and ckpt.get('eval_metric', 'top1') == eval_metric:
            saver.load_state_dict_from_checkpoint(resume)
        elif saver is not None and start_epoch < num_epochs:  # earlier checkpoints ranked by another metric
            _logger.warning(f"'{resume}' ranked its checkpoints by {ckpt.get('eval_metric', 'top1')}; this run ranks "
                            f'by {eval_metric}: the best checkpoint is chosen among the epochs from here on.')
        if rank == 0:
            _logger.info(f"Resumed from '{resume}' at epoch {start_epoch} of {num_epochs}")
    if distributed:
        task.prepare_distributed()
    if start_epoch > 0:
        scheduler.step(start_epoch)

    for epoch in range(start_epoch, num_epochs):
        # epoch-seeded shuffling and augmentation (torch, numpy, python): a resumed run replays the same epochs
        random_seed(args.seed + epoch, rank)
        if distributed:
            train_loader.sampler.set_epoch(epoch)
        if anneal_from is not None:
            set_dynamic_temperature(model, _dy_temperature(epoch, args.dy_anneal_epochs, anneal_from))
        train_metrics, train_ips = _train_one_epoch(task, optimizer, scheduler, train_loader, epoch, num_epochs,
                                                    device, progress=rank == 0 and not args.no_progress)
        metrics, eval_ips = _evaluate(task.get_eval_model(), eval_loader, device, distributed)
        if task.has_ema():
            ema_metrics, _ = _evaluate(task.get_eval_model(ema=True), eval_loader, device, distributed)
            metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        scheduler.step(epoch + 1, metrics[eval_metric])
        if rank == 0:
            lr = optimizer.param_groups[0]['lr']
            _logger.info(f"epoch {epoch + 1}/{num_epochs}  train_loss {train_metrics['loss']:.4f}  "
                         f"eval_loss {metrics['loss']:.4f}  top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
                         f"lr {lr:.2e}  train {train_ips:.0f} img/s")
            update_summary(epoch, train_metrics, metrics, os.path.join(args.output, 'summary.csv'), lr=lr,
                           write_header=epoch == 0)
            # top1: the eval of the file's state_dict (what push exports); metric: what ranks the checkpoints
            saver.metadata.update(top1=metrics['top1'], metrics=metrics, train_img_s=train_ips, eval_img_s=eval_ips)
            saver.save_checkpoint(epoch, metric=metrics[eval_metric])
    digest = weights_digest(model)
    _logger.info(f'rank {rank} final weights sha256 {digest}')
    result = dict(model=args.model, epochs=num_epochs, start_epoch=start_epoch, weights_sha256=digest,
                  params=sum(p.numel() for p in model.parameters()), train_img_s=train_ips, eval_img_s=eval_ips,
                  **{k: v for k, v in metrics.items()})
    if rank == 0:
        best_path = os.path.join(args.output, 'model_best.safetensors')
        if os.path.isfile(best_path):
            # the weights its own eval metric ranked (a rerun may toggle --model-ema), described by its own metadata
            best = load_training_checkpoint(best_path)
            ranked_by = best.get('eval_metric', 'top1')
            weights = best['state_dict_ema'] if ranked_by == 'ema_top1' else best['state_dict']
            save_weights(os.path.join(args.output, 'model.safetensors'), weights,
                         dict({k: best.get(k, v) for k, v in export_meta.items()}, epoch=best['epoch'],
                              top1=best['metric']))
            result.update(eval_metric=ranked_by, best_top1=best['metric'], best_epoch=best['epoch'],
                          last_top1=metrics.get(ranked_by), output=args.output,
                          weights=os.path.join(args.output, 'model.safetensors'))
    if distributed:  # the process group stays for further train() calls (compare); the caller destroys it
        dist.barrier()
    return result


def _label_names(dataset: Dataset) -> Optional[List[str]]:
    if isinstance(dataset, Subset):
        dataset = dataset.dataset
    names = getattr(dataset, 'classes', None)
    if names is None and hasattr(getattr(dataset, 'reader', None), 'class_to_idx'):
        names = [c for c, _ in sorted(dataset.reader.class_to_idx.items(), key=lambda kv: kv[1])]
    return list(names) if names is not None else None


def _recipe(args: argparse.Namespace, dataset: Dataset) -> Dict[str, Any]:
    """The training recipe recorded with the exported weights (and in the Hub model card)."""
    name = args.dataset or (os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir else None)
    return dict(dataset=name or 'sklearn-digits', train_subset=args.train_subset, eval_subset=args.eval_subset,
                in_chans=args.in_chans,
                recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                img_size=args.img_size, opt=args.opt, lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, sched=args.sched, drop=args.drop, seed=args.seed,
                stock_weights=args.stock_weights or None, model_ema=args.model_ema)


def _train_one_epoch(task, optimizer, scheduler, loader, epoch: int, num_epochs: int, device,
                     progress: bool) -> Tuple[Dict[str, float], float]:
    task.train()
    num_updates = epoch * len(loader)
    loss_sum, seen, start = 0., 0, time.perf_counter()
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=f'epoch {epoch + 1}/{num_epochs}', leave=False, dynamic_ncols=True)
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        loss = task(images, targets)['loss']
        optimizer.zero_grad(set_to_none=True)
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
def _evaluate(model, loader, device, distributed: bool) -> Tuple[Dict[str, float], float]:
    model.eval()
    evaluator = ClassificationEvaluator(device, max_samples=evaluation_sample_limit(loader))
    seen, start = 0, time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        evaluator.update(model(images), targets)
        seen += images.shape[0]
    elapsed = time.perf_counter() - start
    return dict(evaluator.compute(distributed=distributed)), seen / max(elapsed, 1e-9)


def parse_models(models: Sequence[str]) -> List[str]:
    """Validate model names before any training starts."""
    for name in models:
        if not timm.is_model(name):
            ArchSpec.parse(name)  # raises a ValueError naming the bad token
    return list(models)
