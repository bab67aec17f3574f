"""Checkpoints: timm's training checkpoints to resume from, safetensors for the exported weights, no pickle trusted.

A run's training checkpoints (``last.pth.tar``, ``checkpoint-N.pth.tar``, ``model_best.pth.tar``) are written by
timm's ``CheckpointSaver`` (model, EMA, optimizer and AMP loss-scaler state, the saver's history) and read with
``torch.load(weights_only=True)``, as timm's ``resume_checkpoint`` reads them. The run's record (architecture, classes,
label names, recipe, the epoch's metrics), which a rerun and ``timm-nlp push`` read, travels in their ``args`` as
``args.timm_nlp``. The exported weights (``model.safetensors``) are plain safetensors with that record as JSON
metadata.
"""
import json
import os
import re
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from timm.models import load_state_dict
from timm.utils.checkpoint_saver import load_checkpoint_metadata

__all__ = [
    'load_training_checkpoint', 'checkpoint_record', 'load_weights', 'save_weights', 'read_metadata',
    'load_error_summary', 'CheckpointError', 'RECORD_KEY',
]

RECORD_KEY = 'timm_nlp'


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not match."""


def read_metadata(path: str) -> Optional[Dict[str, Any]]:
    """The JSON metadata of a timm-nlp safetensors file, None if it has none.

    Args:
        path: A ``.safetensors`` file.
    """
    try:
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
    except SafetensorError as e:  # a corrupt or truncated file
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({e}).") from None
    return json.loads(meta[RECORD_KEY]) if RECORD_KEY in meta else None


def _refuse_earlier_format(path: str, meta: Optional[Dict[str, Any]]) -> None:
    """Earlier versions wrote training checkpoints as safetensors files, the optimizer state flattened."""
    if meta and 'saver' in meta:
        raise CheckpointError(f"'{path}' is a training checkpoint of an earlier timm-nlp (safetensors), which this "
                              'version does not resume; start a new --output from its weights with '
                              '--initial-checkpoint (its model.safetensors), or finish it with the earlier version.')


def save_weights(path: str, state_dict: Dict[str, torch.Tensor], meta: Optional[Dict[str, Any]] = None) -> None:
    """Write plain model weights as safetensors, loadable by timm's ``load_checkpoint`` and ``--checkpoint`` flags.

    Args:
        path: The ``.safetensors`` file to write.
        state_dict: The model's tensors.
        meta: The run's record, stored as JSON metadata (``read_metadata``).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, path, metadata={RECORD_KEY: json.dumps(meta or {}, default=str)})


def load_weights(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Model weights from a file, never unpickling untrusted data (timm's ``load_state_dict``, ``weights_only=True``).

    Args:
        path: Safetensors weights, a training checkpoint (its ``state_dict``) or any ``torch.save`` file of tensors
            (an arbitrary pickled object is refused, never executed); ``module.`` prefixes are removed.
        use_ema: Take the checkpoint's EMA weights where it has them.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    if path.endswith('.safetensors'):
        _refuse_earlier_format(path, read_metadata(path))
    try:
        state = load_state_dict(path, use_ema=use_ema, weights_only=True)
    except Exception as e:  # an unsafe pickle (or a corrupt file) is refused, never executed
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"Refusing to load '{path}': not loadable with weights_only=True ({reason}). "
                              'Convert it to safetensors from a trusted environment.') from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors.")
    return state


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """A training checkpoint as timm's ``CheckpointSaver`` wrote it, read with ``weights_only=True``, with the run's
    record (``args.timm_nlp``: architecture, label names, recipe, metrics...) merged in at the top level.

    Args:
        path: ``last.pth.tar``, ``checkpoint-N.pth.tar`` or ``model_best.pth.tar`` of a run.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    ckpt = None
    if path.endswith('.safetensors'):
        _refuse_earlier_format(path, read_metadata(path))
    else:
        try:
            ckpt = load_checkpoint_metadata(path)
        except Exception as e:
            reason = ' '.join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"Refusing to load '{path}': not loadable with weights_only=True ({reason}).") \
                from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise CheckpointError(f"'{path}' holds plain model weights, not a training checkpoint (last.pth.tar, "
                              'checkpoint-N.pth.tar); to start from these weights, use --initial-checkpoint.')
    record = getattr(ckpt.get('args'), RECORD_KEY, None) or {}
    return dict(ckpt, **record)


def checkpoint_record(path: str) -> Dict[str, Any]:
    """The run's record a weights file carries (a safetensors file's metadata, a training checkpoint's
    ``args.timm_nlp``); empty for a file without one.

    Args:
        path: Any weights file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    if path.endswith('.safetensors'):
        return read_metadata(path) or {}
    try:
        ckpt = load_checkpoint_metadata(path)
    except Exception:  # not a checkpoint torch reads with weights_only=True: load_weights names the problem
        return {}
    return dict(getattr(ckpt.get('args'), RECORD_KEY, None) or {}) if isinstance(ckpt, dict) else {}


def load_error_summary(error: RuntimeError, limit: int = 8) -> str:
    """torch's ``load_state_dict`` error on one line: the missing, unexpected and mismatched tensors, named.

    Args:
        error: The RuntimeError of a strict ``load_state_dict``.
        limit: Tensors named per kind; the rest are counted.
    """
    parts = []
    for line in str(error).splitlines()[1:]:
        line = line.strip().rstrip('.')
        names = re.findall(r'"([^"]+)"', line)
        if names:
            more = f' and {len(names) - limit} more' if len(names) > limit else ''
            parts.append(f"{line.split(':')[0].lower()}: {', '.join(names[:limit])}{more}")
        elif line:
            parts.append(re.sub(r'torch\.Size\((\[[^]]*\])\)', r'\1', line))
    return '; '.join(parts) or ' '.join(str(error).split())
