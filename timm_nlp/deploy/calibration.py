"""Calibration images for int8 quantisation: real images from the package's data sets or an image folder,
preprocessed as the model's evaluation transform prepares them."""
import argparse
import os
from typing import Tuple

import torch
from torch import nn

from timm.data import create_dataset, create_transform, resolve_data_config

from timm_nlp.export_model import CALIBRATION_SETS
from timm_nlp.data import IMAGE_MODES, IMG_EXTENSIONS, ImageView, balanced_subset, dataset_targets, resolve_datasets

__all__ = ['calibration_images']


def _source(source: str, in_chans: int) -> ImageView:
    if source in CALIBRATION_SETS:
        args = argparse.Namespace(dataset='fashion-mnist' if source == 'fashion-mnist' else '', data_dir='',
                                  val_split='validation', dataset_download=False, in_chans=in_chans,
                                  train_subset=None, eval_subset=None, num_classes=None)
        return resolve_datasets(args)[0]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--calib '{source}' is neither {' nor '.join(CALIBRATION_SETS)} nor a folder of "
                                'images.')
    if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(source) for f in files):
        raise ValueError(f"--calib folder '{source}' holds no images ({', '.join(IMG_EXTENSIONS)}).")
    return ImageView(create_dataset('', root=source), IMAGE_MODES[in_chans])


def calibration_images(source: str, model: nn.Module, input_size: Tuple[int, int, int], count: int = 32
                       ) -> torch.Tensor:
    """``count`` images ``(count, C, H, W)`` for calibration, as the model's evaluation transform prepares them at
    ``input_size`` (its mean and std; grey images replicated for 3 channels).

    Args:
        source: 'fashion-mnist' (Debian's dataset-fashion-mnist files), 'digits' (scikit-learn's) or a folder of
            images (searched recursively); a fixed, class-balanced choice from the training split.
        model: The model (its pretrained cfg gives the preprocessing).
        input_size: (C, H, W).
        count: How many images.
    """
    if input_size[0] not in IMAGE_MODES:
        raise ValueError(f'calibration images have 1 or 3 channels, not {input_size[0]}.')
    data = _source(source, input_size[0])
    n = min(count, len(data))
    try:  # the classes as equal as they can be
        picked = balanced_subset(dataset_targets(data.dataset), n)
    except ValueError:  # too few images of some class
        picked = list(range(n))
    cfg = resolve_data_config({'input_size': input_size, 'crop_pct': 1.0}, model=model)
    for key in ('mean', 'std'):
        if len(cfg[key]) != input_size[0]:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * input_size[0]
    data.transform = create_transform(**cfg, is_training=False)
    return torch.stack([data[i][0] for i in picked])
