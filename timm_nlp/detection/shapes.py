"""Synthetic detection data: filled rectangles, ellipses and triangles with their boxes, for tests and demos."""
import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'draw_shapes', 'shapes_dataset', 'write_coco']

CLASSES = ('rectangle', 'ellipse', 'triangle')


def draw_shapes(rng: np.random.Generator, size: int, max_objects: int = 3,
                min_side: int = 16) -> Tuple[Image.Image, List[List[float]], List[int]]:
    """One image with 1..max_objects shapes; boxes (x1, y1, x2, y2) and 1-based labels."""
    img = Image.new('RGB', (size, size), tuple(int(c) for c in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        w, h = (int(v) for v in rng.integers(min_side, size // 2, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        label = int(rng.integers(1, len(CLASSES) + 1))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        if label == 1:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=color)
        elif label == 2:
            draw.ellipse([x, y, x + w - 1, y + h - 1], fill=color)
        else:
            draw.polygon([(x, y + h - 1), (x + w - 1, y + h - 1), (x + w // 2, y)], fill=color)
        boxes.append([float(x), float(y), float(x + w), float(y + h)])
        labels.append(label)
    return img, boxes, labels


def shapes_dataset(n: int, size: int = 128, seed: int = 0) -> List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """``n`` (image tensor in [0, 1], target dict) pairs in torchvision's detection format."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, boxes, labels = draw_shapes(rng, size)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.).permute(2, 0, 1)
        out.append((x, dict(boxes=torch.tensor(boxes), labels=torch.tensor(labels))))
    return out


def write_coco(root: str, split: str, n: int, size: int = 128, seed: int = 0) -> Dict[str, Any]:
    """Write ``root/split/*.png`` and ``root/annotations/instances_split.json``; returns the annotation dict."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        img, boxes, labels = draw_shapes(rng, size)
        name = f'{i:06d}.png'
        img.save(os.path.join(root, split, name))
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label, iscrowd=0,
                                    bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1)))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=c) for i, c in enumerate(CLASSES)])
    with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return coco
