"""Safe checkpoints: weights and training state as safetensors; pickles are read only with ``weights_only=True``.

A training checkpoint mirrors timm's checkpoint dict in one safetensors file: tensors under ``state_dict.``,
``state_dict_ema.`` and ``optimizer.`` prefixes, everything else (epoch, arch, args, metric, optimizer
hyper-parameters, saver bookkeeping) as JSON in the file's metadata.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from timm.utils import CheckpointSaver
from timm.utils.model import get_state_dict, unwrap_model

__all__ = [
    'save_training_checkpoint', 'load_training_checkpoint', 'load_weights', 'save_weights',
    'SafetensorsCheckpointSaver', 'CheckpointError',
]

_META_KEY = 'timm_nlp'
_SECTIONS = ('state_dict', 'state_dict_ema', 'optimizer')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not match."""


def _flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, pstate in state['state'].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f'{idx}.{name}'] = value
            else:
                scalars[f'{idx}.{name}'] = value
    return tensors, {'param_groups': state['param_groups'], 'scalars': scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta['scalars'].items()):
        idx, name = key.split('.', 1)
        state.setdefault(int(idx), {})[name] = value
    return {'state': state, 'param_groups': meta['param_groups']}


def save_training_checkpoint(
        path: str,
        state_dict: Dict[str, torch.Tensor],
        meta: Dict[str, Any],
        state_dict_ema: Optional[Dict[str, torch.Tensor]] = None,
        optimizer: Optional[Dict[str, Any]] = None,
) -> None:
    """Write a training checkpoint (model, optional EMA and optimizer state, JSON metadata) as safetensors."""
    tensors = {f'state_dict.{k}': v for k, v in state_dict.items()}
    meta = dict(meta)
    if state_dict_ema is not None:
        tensors.update({f'state_dict_ema.{k}': v for k, v in state_dict_ema.items()})
    if optimizer is not None:
        opt_tensors, meta['optimizer'] = _flatten_optimizer(optimizer)
        tensors.update({f'optimizer.{k}': v for k, v in opt_tensors.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={_META_KEY: json.dumps(meta, default=str)})


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read a training checkpoint written by ``save_training_checkpoint``: timm's checkpoint dict layout."""
    meta = read_metadata(path)
    if meta is None:
        raise CheckpointError(f"'{path}' is a safetensors file without timm-nlp training metadata.")
    flat = load_file(path)
    out: Dict[str, Any] = {k: v for k, v in meta.items() if k != 'optimizer'}
    for section in _SECTIONS:
        prefix = section + '.'
        part = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if section == 'optimizer':
            if 'optimizer' in meta:
                out['optimizer'] = _unflatten_optimizer(part, meta['optimizer'])
        elif part:
            out[section] = part
    return out


def read_metadata(path: str) -> Optional[Dict[str, Any]]:
    """The JSON metadata of a timm-nlp safetensors file, None if it has none."""
    try:
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
    except SafetensorError as e:  # a corrupt or truncated file
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({e}).") from None
    return json.loads(meta[_META_KEY]) if _META_KEY in meta else None


def save_weights(path: str, state_dict: Dict[str, torch.Tensor], meta: Optional[Dict[str, Any]] = None) -> None:
    """Write plain model weights (loadable by timm's ``load_checkpoint`` and ``--checkpoint`` flags)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, path, metadata={_META_KEY: json.dumps(meta or {}, default=str)})


def load_weights(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Model weights from a file, never unpickling untrusted data.

    ``.safetensors``: plain weights, or a timm-nlp training checkpoint (its ``state_dict`` section, or
    ``state_dict_ema`` with ``use_ema``). Any other file is read with ``torch.load(weights_only=True)``, which
    refuses arbitrary pickled objects; timm checkpoint dicts are unwrapped.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    if path.endswith('.safetensors'):
        meta = read_metadata(path)
        flat = load_file(path)
        if meta is not None and any(k.startswith('state_dict.') for k in flat):
            section = 'state_dict_ema.' if use_ema and any(k.startswith('state_dict_ema.') for k in flat) \
                else 'state_dict.'
            return {k[len(section):]: v for k, v in flat.items() if k.startswith(section)}
        return flat
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # an unsafe pickle (or a corrupt file) is refused, never executed
        raise CheckpointError(f"Refusing to load '{path}': not loadable with weights_only=True ({e}). "
                              'Convert it to safetensors from a trusted environment.') from None
    if isinstance(obj, dict):
        for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors.")
    return {k[7:] if k.startswith('module.') else k: v for k, v in obj.items()}


class SafetensorsCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver (top-k history, ``last``/``model_best`` files, recovery) writing safetensors.

    ``metadata`` (a dict, updatable between saves) is merged into the metadata of every checkpoint it writes.
    """

    def __init__(self, *args: Any, metadata: Optional[Dict[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.extension = '.safetensors'
        reserved = {'epoch', 'arch', 'version', 'metric', 'saver', 'args'} & set(metadata or {})
        if reserved:
            raise ValueError(f'metadata keys {sorted(reserved)} are written by the saver itself.')
        self.metadata = dict(metadata or {})

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        meta = dict(epoch=epoch, arch=getattr(self.args, 'model', type(unwrap_model(self.model)).__name__),
                    version=2, metric=metric, saver=self.state_dict(epoch, metric),
                    args=vars(self.args) if self.args is not None else None, **self.metadata)
        if self.task is not None:
            state = self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn)
            ema = self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn).get('state_dict_ema')
            model_sd = state['state_dict']
        else:
            model_sd = get_state_dict(self.model, self.unwrap_fn)
            ema = get_state_dict(self.model_ema, self.unwrap_fn) if self.model_ema is not None else None
        save_training_checkpoint(save_path, model_sd, meta, ema, self.optimizer.state_dict())

    def load_state_dict_from_checkpoint(self, checkpoint_path: str) -> bool:
        meta = read_metadata(checkpoint_path)
        if not meta or not meta.get('saver'):
            return False
        self.load_state_dict(meta['saver'])
        return True
