"""Train and evaluate a torchvision detector with a pooled backbone on COCO (or any COCO-format data).

    python train_scripts/train_coco.py --data-dir data/coco --detector fasterrcnn \
        --backbone resnet18_nlp_headfix2_nowin_reduced_1222 --weights output/imagenet/model.safetensors
    torchrun --nproc_per_node 8 train_scripts/train_coco.py ...      # one node or many, as timm's train.py

DATA_DIR holds train2017/, val2017/ and annotations/instances_{train,val}2017.json (``--train-split`` and
``--val-split`` rename them). Detector settings default to the MMDetection schedules the paper's detection
configs build on (Faster R-CNN and RetinaNet 1x: 12 epochs, lr / 10 at epochs 8 and 11; SSD: 24 epochs,
lr / 10 at 16 and 22), with the learning rate scaled linearly to the global batch. Every epoch ends with
COCO box mAP (pycocotools) on the validation split, logged to OUTPUT/metrics.jsonl; the weights are saved as
OUTPUT/detector.safetensors and the last epoch's detections (COCO results format) as OUTPUT/predictions.json.
Crowd annotations (``iscrowd=1``) are dropped from the training targets, as in torchvision's reference scripts.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from timm_nlp.checkpoint import save_weights
from timm_nlp.detection import coco_map, fasterrcnn, predictions_to_coco, retinanet, ssd

PRESETS = {  # base lr for a global batch of base_batch images
    'fasterrcnn': dict(build=fasterrcnn, lr=0.02, base_batch=16, epochs=12, milestones=(8, 11)),
    'retinanet': dict(build=retinanet, lr=0.01, base_batch=16, epochs=12, milestones=(8, 11)),
    'ssd': dict(build=ssd, lr=2e-3, base_batch=64, epochs=24, milestones=(16, 22)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True)
    p.add_argument('--train-split', default='train2017')
    p.add_argument('--val-split', default='val2017')
    p.add_argument('--detector', choices=list(PRESETS), default='fasterrcnn')
    p.add_argument('--backbone', default='resnet18_nlp_headfix2_nowin_reduced_1222')
    p.add_argument('--weights', default='', help='classification checkpoint of the backbone (safetensors)')
    p.add_argument('--num-classes', type=int, default=None, help='default: largest category id + 1')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=2, help='per process')
    p.add_argument('--lr', type=float, default=None, help='default: the preset, scaled to the global batch')
    p.add_argument('--min-size', type=int, default=800, help='Faster R-CNN / RetinaNet shorter side')
    p.add_argument('--max-size', type=int, default=1333)
    p.add_argument('--ssd-size', type=int, default=300)
    p.add_argument('--score-thresh', type=float, default=None, help='lowest score kept (default: the detector\'s)')
    p.add_argument('--warmup-iters', type=int, default=500)
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--output', default='output/coco')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


SCORE_THRESH_ARG = dict(fasterrcnn='box_score_thresh', retinanet='score_thresh', ssd='score_thresh')


def _drop_crowd(image, target):
    """Keep the boxes and labels of the non-crowd objects only."""
    keep = torch.as_tensor(target.pop('iscrowd')) == 0
    return image, dict(target, boxes=target['boxes'][keep], labels=target['labels'][keep])


def _dataset(root: str, split: str, train: bool):
    tf = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)] + ([v2.RandomHorizontalFlip(), _drop_crowd] if train
                                                                  else [])
    ds = CocoDetection(os.path.join(root, split), os.path.join(root, 'annotations', f'instances_{split}.json'),
                       transforms=v2.Compose(tf))
    keys = ('boxes', 'labels', 'image_id') + (('iscrowd',) if train else ())
    ds = wrap_dataset_for_transforms_v2(ds, target_keys=keys)
    if train:  # images without boxes carry no detection loss
        keep = [i for i, img_id in enumerate(ds.ids) if ds.coco.getAnnIds(imgIds=img_id, iscrowd=False)]
        ds = torch.utils.data.Subset(ds, keep)
    return ds


def _collate(batch):
    return tuple(zip(*batch))


def main(argv=None):
    args = parse_args(argv)
    if (args.epochs is not None and args.epochs < 1) or (args.lr is not None and args.lr <= 0) \
            or args.warmup_iters < 0:
        raise ValueError(f'Need --epochs >= 1, --lr > 0 and --warmup-iters >= 0; got --epochs {args.epochs}, '
                         f'--lr {args.lr}, --warmup-iters {args.warmup_iters}.')
    distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu')
    if distributed:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)
    preset = PRESETS[args.detector]
    train_ds, val_ds = _dataset(args.data_dir, args.train_split, True), _dataset(args.data_dir, args.val_split, False)
    per_rank = math.ceil(len(train_ds) / world)  # DistributedSampler pads every rank to this
    if per_rank < args.batch_size:
        raise ValueError(f'{len(train_ds)} training images with boxes over {world} process(es) give {per_rank} per '
                         f'process, fewer than --batch-size {args.batch_size}: no full batch, nothing would train.')
    coco_train, coco_val = train_ds.dataset.coco.dataset, val_ds.coco.dataset
    category_ids = {c['id'] for c in coco_val['categories']}
    max_id = max([c['id'] for c in coco_train['categories'] + coco_val['categories']]
                 + [a['category_id'] for a in coco_train['annotations']])
    num_classes = max_id + 1 if args.num_classes is None else args.num_classes
    if num_classes <= max_id:
        raise ValueError(f'--num-classes {num_classes} is too small for category id {max_id} in the annotations '
                         f'(ids are class indices, 0 the background); use at least {max_id + 1}.')
    kw = dict(size=args.ssd_size) if args.detector == 'ssd' else dict(min_size=args.min_size, max_size=args.max_size)
    if args.score_thresh is not None:
        kw[SCORE_THRESH_ARG[args.detector]] = args.score_thresh
    model = preset['build'](args.backbone, num_classes=num_classes, weights=args.weights or None, **kw).to(device)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    sampler = DistributedSampler(train_ds, seed=args.seed) if distributed else None
    loader = DataLoader(train_ds, args.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers,
                        collate_fn=_collate, drop_last=True)
    val_sampler = DistributedSampler(val_ds, shuffle=False) if distributed else None
    val_loader = DataLoader(val_ds, args.batch_size, sampler=val_sampler, num_workers=args.workers,
                            collate_fn=_collate)
    epochs = preset['epochs'] if args.epochs is None else args.epochs
    lr = preset['lr'] * args.batch_size * world / preset['base_batch'] if args.lr is None else args.lr
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    milestones = [m * len(loader) for m in preset['milestones'] if m < epochs]
    warmup = min(args.warmup_iters, max(1, len(loader) * epochs // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: (min(1., (it + 1) / warmup) if warmup else 1.) * 0.1 ** sum(it >= m for m in milestones))
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        start, loss_sum = time.time(), 0.
        for images, targets in loader:
            images = [i.to(device) for i in images]
            targets = [{k: v.to(device) for k, v in t.items() if k in ('boxes', 'labels')} for t in targets]
            loss = sum(model(images, targets).values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch}')
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        # RetinaNet's sigmoid head also scores label 0, which is no category
        results = [r for r in evaluate(model, val_loader, device, distributed) if r['category_id'] in category_ids]
        if rank == 0:
            metrics = coco_map(coco_val, results)
            record = dict(epoch=epoch, loss=loss_sum / max(1, len(loader)), time=time.time() - start, **metrics)
            record['detections'] = len(results)
            print(json.dumps(record), flush=True)
            with open(os.path.join(args.output, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
            net = model.module if distributed else model
            save_weights(os.path.join(args.output, 'detector.safetensors'), net.state_dict(),
                         dict(detector=args.detector, backbone=args.backbone, num_classes=num_classes, epoch=epoch))
            with open(os.path.join(args.output, 'predictions.json'), 'w') as f:
                json.dump(results, f)
    if distributed:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, loader, device, distributed: bool):
    """COCO-format predictions of the whole split, gathered on every rank (each image once, although the
    distributed sampler pads the last batch with repeats)."""
    model.eval()
    per_image = {}
    for images, targets in loader:
        outputs = model([i.to(device) for i in images])
        for out, t in zip(outputs, targets):
            per_image[int(t['image_id'])] = predictions_to_coco([{k: v.cpu() for k, v in out.items()}],
                                                                [t['image_id']])
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_image)
        per_image = {k: v for part in gathered for k, v in part.items()}
    return [r for rs in per_image.values() for r in rs]


if __name__ == '__main__':
    main()
