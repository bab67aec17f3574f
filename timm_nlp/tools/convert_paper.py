"""``timm-nlp convert-paper CKPT.pth --arch STRING --out DIR``: a checkpoint of the paper's code as timm-nlp weights.

The ``.pth`` is read with ``torch.load(weights_only=True)`` only (what the paper's ``ann.py`` saves, a dict of
``accuracy``, ``epoch``, ``state_dict`` and ``optimizer``, loads that way); the converted weights go to
``DIR/model.safetensors`` with the metadata ``timm-nlp push`` reads (architecture, classes, the checkpoint's
accuracy and epoch).
"""
import os
from pathlib import Path
from typing import Any, Dict

import torch

from timm_nlp.checkpoint import CheckpointError, save_weights
from timm_nlp.grammar import ArchSpec
from timm_nlp.models import classifier_weight_key, convert_paper_state_dict, create_model

__all__ = ['convert_paper_checkpoint']


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # an unsafe pickle (or a corrupt file) is refused, never executed
        raise CheckpointError(f"Refusing to load '{path}': not loadable with weights_only=True ({e}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict or a state dict.")
    return obj


def convert_paper_checkpoint(path: str, arch: str, out_dir: str) -> Path:
    """Convert the paper code's checkpoint ``path`` of architecture ``arch``; returns ``out_dir/model.safetensors``.

    The weights load strictly into ``timm_nlp.create_model(arch, num_classes=...)`` (the checkpoint's class count),
    checked here before anything is written.
    """
    spec = ArchSpec.parse(arch)
    ckpt = _read(path)
    state_dict = convert_paper_state_dict(ckpt, spec.seed)
    num_classes = state_dict[classifier_weight_key(spec)].shape[0]
    model = create_model(spec.timm_name, num_classes=num_classes)
    model.load_state_dict(state_dict, strict=True)
    meta: Dict[str, Any] = dict(architecture=spec.timm_name, num_classes=num_classes, label_names=None,
                                source=f"the Self-Attentive Pooling paper's code ({os.path.basename(path)}, "
                                       f'trained as {spec.seed})')
    accuracy = ckpt.get('accuracy')
    if isinstance(accuracy, (int, float)) or torch.is_tensor(accuracy):
        # ann.py records the best test accuracy as a fraction
        meta['top1'] = 100. * float(accuracy)
    if isinstance(ckpt.get('epoch'), int):
        meta['epoch'] = ckpt['epoch']
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(str(out / 'model.safetensors'), state_dict, meta)
    return out / 'model.safetensors'
