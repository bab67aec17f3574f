"""Convert torchvision's STL-10 binary layout (``stl10_binary/``) to an image folder for timm's train.py.

The binary files hold uint8 images of 3 x 96 x 96, each channel stored column-major, and uint8 labels 1..10;
``class_names.txt`` names the classes in label order. Output: ``DST/SPLIT/CLASS/SPLIT_INDEX.png``.
"""
import os
from typing import Dict, Sequence

import numpy as np
from PIL import Image

__all__ = ['read_stl10_split', 'convert_stl10']

_SIDE = 96


def read_stl10_split(src: str, split: str):
    """Images ``(N, 96, 96, 3)`` uint8 and 0-based labels of one split (``train`` or ``test``)."""
    x_path, y_path = os.path.join(src, f'{split}_X.bin'), os.path.join(src, f'{split}_y.bin')
    for path in (x_path, y_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"STL-10 file '{path}' not found (expected the stl10_binary folder).")
    raw = np.fromfile(x_path, dtype=np.uint8)
    if raw.size % (3 * _SIDE * _SIDE):
        raise ValueError(f"'{x_path}' has {raw.size} bytes, not a whole number of 3x96x96 images.")
    images = raw.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 3, 2, 1)  # column-major channels -> HWC
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images) or labels.min(initial=0) < 0:
        raise ValueError(f"'{y_path}' has {len(labels)} labels (1-based) for {len(images)} images.")
    return images, labels


def convert_stl10(src: str, dst: str, splits: Sequence[str] = ('train', 'test')) -> Dict[str, int]:
    """Write every image of ``splits`` as PNG into class folders; returns the image count of each split."""
    names_path = os.path.join(src, 'class_names.txt')
    if not os.path.isfile(names_path):
        raise FileNotFoundError(f"'{names_path}' not found (expected the stl10_binary folder).")
    with open(names_path) as f:
        classes = [line.strip() for line in f if line.strip()]
    counts = {}
    for split in splits:
        images, labels = read_stl10_split(src, split)
        if labels.max(initial=0) >= len(classes):
            raise ValueError(f'label {labels.max() + 1} in {split} but only {len(classes)} class names.')
        for c in classes:
            os.makedirs(os.path.join(dst, split, c), exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(os.path.join(dst, split, classes[label], f'{split}_{i:05d}.png'))
        counts[split] = len(images)
    return counts
