"""The paper's training recipe, written once: ``timm-nlp train --recipe paper`` applies it, and the ``train.py
--config`` files of ``train_scripts/`` (STL-10, and the same recipe on CIFAR-100) are generated from it:

    python -m timm_nlp.tools.recipes train_scripts

The paper's ``ann.py`` (STL-10, 128 px): SGD with momentum 0.9, no weight decay, lr 1e-2 divided by 5 at 60, 80 and
90% of 300 epochs, batch 8 (two GPUs), plain cross-entropy (no label smoothing, mixup, colour jitter, EMA, dropout or
warm-up), seed 0; training images random-resized-cropped to 128 and flipped; test images resized and center-cropped
whole; mean = std = 0.5.
"""
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = ['PAPER_RECIPE', 'paper_decay_milestones', 'train_py_config', 'write_train_py_configs']

# timm-nlp train's (and timm's train.py's) option names
PAPER_RECIPE: Dict[str, Any] = dict(
    opt='sgd', momentum=0.9, weight_decay=0., lr=1e-2, sched='multistep', decay_rate=0.2, warmup_epochs=0,
    smoothing=0., drop=0., batch_size=8, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation='bilinear',
    hflip=0.5, scale=[0.08, 1.])
PAPER_EPOCHS, PAPER_IMG_SIZE, PAPER_DECAY_AT = 300, 128, (0.6, 0.8, 0.9)

# the data sets of the generated configs: STL-10 as the paper trains it (an image folder: timm-nlp stl10), CIFAR-100
# up-sampled to 128 with the mean and std the paper's code normalises it with
_DATASETS: Dict[str, Dict[str, Any]] = {
    'stl10': dict(data_dir='data/stl10', val_split='test', num_classes=10),
    'cifar100': dict(dataset='torch/cifar100', data_dir='data/cifar100', dataset_download=True, num_classes=100,
                     mean=[0.5071, 0.4867, 0.4408], std=[0.2675, 0.2565, 0.2761]),
}
_MODELS = {'resnet18': ('resnet18_skip_1222', 'resnet18_nlp_headfix2_4222'),
           'mobilenetv2': ('mobilenetv2_skip_1222121', 'mobilenetv2_nlp_headfix2_4222121')}


def paper_decay_milestones(epochs: int) -> List[int]:
    """The paper's learning-rate milestones for a run of ``epochs`` (60, 80, 90%, rounded down as its code does).

    Args:
        epochs: The run's epoch count.
    """
    return [int(f * epochs) for f in PAPER_DECAY_AT]


def train_py_config(dataset: str, backbone: str) -> Dict[str, Any]:
    """The options of timm's ``train.py --config`` for the paper's recipe on ``dataset`` with ``backbone``'s stock
    network (``--model`` picks another).

    Args:
        dataset: 'stl10' or 'cifar100'.
        backbone: 'resnet18' or 'mobilenetv2'.
    """
    data = dict(_DATASETS[dataset])
    recipe = dict(PAPER_RECIPE, **{k: data.pop(k) for k in ('mean', 'std') if k in data})
    return dict(data, model=_MODELS[backbone][0], img_size=PAPER_IMG_SIZE, epochs=PAPER_EPOCHS,
                decay_milestones=paper_decay_milestones(PAPER_EPOCHS), **recipe,
                train_interpolation=recipe['interpolation'], color_jitter=0., crop_pct=1.0, seed=0, checkpoint_hist=3)


def _header(dataset: str, backbone: str) -> str:
    what = "The paper's STL-10 recipe (its ann.py)" if dataset == 'stl10' else \
        "The paper's recipe on CIFAR-100 (timm's torch/cifar100), up-sampled to 128 as STL-10 is"
    prepare = ['timm-nlp stl10 path/to/stl10_binary data/stl10      # the binary files -> an image folder'] \
        if dataset == 'stl10' else []
    lines = [f"{what} for timm's train.py,", 'generated from timm_nlp.tools.recipes.PAPER_RECIPE by '
             '`python -m timm_nlp.tools.recipes train_scripts`',
             '(edit that, not this file); batch_size is the global batch: train.sh divides it over the processes it '
             'starts.'] + [
        f'  {c}' for c in prepare + [f'train_scripts/train.sh train_scripts/{dataset}_{backbone}.yaml 2 '
                                     f'--model {_MODELS[backbone][1]}']]
    return ''.join(f'# {line}\n' for line in lines)


def write_train_py_configs(out_dir: str) -> List[str]:
    """Write ``DATASET_BACKBONE.yaml`` for STL-10 and CIFAR-100 with ResNet-18 and MobileNetV2; returns the paths.

    Args:
        out_dir: The folder (``train_scripts``).
    """
    paths = []
    for dataset in _DATASETS:
        for backbone in _MODELS:
            path = os.path.join(out_dir, f'{dataset}_{backbone}.yaml')
            text = yaml.safe_dump(train_py_config(dataset, backbone), sort_keys=False, default_flow_style=None)
            with open(path, 'w') as f:
                f.write(_header(dataset, backbone) + text)
            paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    for path in write_train_py_configs((argv or sys.argv[1:] or ['train_scripts'])[0]):
        print(path)


if __name__ == '__main__':
    main()
