"""Weights for the pooled backbones: stock timm weights into a pooled model, and the filter of published weights."""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import timm
from timm.models import adapt_input_conv

from timm_nlp.checkpoint import load_weights
from timm_nlp.layers import DynamicConv2d, rename_legacy_keys

__all__ = [
    'TransferReport', 'adapt_stock_state_dict', 'load_stock_weights', 'load_stock_source', 'checkpoint_filter_fn',
    'adapt_input_channels',
]

_logger = logging.getLogger(__name__)


@dataclass
class TransferReport:
    """What a stock-checkpoint transfer did to each tensor of the model."""
    loaded: List[str] = field(default_factory=list)
    expanded: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    new_modules: List[str] = field(default_factory=list)

    def summary(self) -> str:
        in_modules = [k for k in self.new if any(k.startswith(m + '.') for m in self.new_modules)]
        lines = [f'{len(self.loaded)} tensors loaded, {len(self.expanded)} expanded to dynamic kernels, '
                 f'{len(self.new)} new tensors keep their initialisation']
        lines += [f'  new module: {m}' for m in self.new_modules]
        lines += [f'  new tensor: {k}' for k in self.new if k not in in_modules]
        lines += [f'  unused stock tensor: {k}' for k in self.unused]
        lines += [f'  shape mismatch: {k} stock {a} vs model {b}' for k, a, b in self.mismatched]
        return '\n'.join(lines)


def _tile_kernels(value: torch.Tensor, num_kernels: int, shape: torch.Size) -> Optional[torch.Tensor]:
    """A stock conv tensor repeated for each kernel of the dynamic conv that replaced the conv, in its layout
    (weight ``(K * O, I, k, k)``, bias ``(K, O)``); None where it does not fit."""
    tiled = value.unsqueeze(0).expand(num_kernels, *value.shape)
    for t in (tiled, tiled.flatten(0, 1)):
        if t.shape == shape:
            return t
    return None


def adapt_stock_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
) -> Tuple[Dict[str, torch.Tensor], TransferReport]:
    """Map a stock timm state dict onto a pooled model.

    Tensors with the same key and shape load; a stock conv weight ``(O, I, k, k)`` fills every kernel of the
    dynamic conv that replaced it (so the model starts as the stock function); everything else is reported.
    """
    target = model.state_dict()
    dynamic = {name: m.num_kernels for name, m in model.named_modules() if isinstance(m, DynamicConv2d)}
    out, report = {}, TransferReport()
    for key, value in state_dict.items():
        if key not in target:
            report.unused.append(key)
            continue
        want, module = target[key], key.rpartition('.')[0]
        if want.shape == value.shape:
            out[key] = value
            report.loaded.append(key)
        elif module in dynamic and (tiled := _tile_kernels(value, dynamic[module], want.shape)) is not None:
            out[key] = tiled.clone()
            report.expanded.append(key)
        else:
            report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
    report.new = [k for k in target if k not in out]
    report.new_modules = _new_modules(model, set(report.new))
    return out, report


def _new_modules(model: nn.Module, new: set) -> List[str]:
    """The outermost modules all of whose state-dict tensors are new."""
    keys = list(model.state_dict())
    full = []
    for name, _ in model.named_modules():
        if not name or any(name.startswith(f + '.') for f in full):
            continue
        own = [k for k in keys if k.startswith(name + '.')]
        if own and all(k in new for k in own):
            full.append(name)
    return sorted(full)


def _first_conv_keys(model: nn.Module) -> List[str]:
    first = getattr(model, 'pretrained_cfg', {}).get('first_conv') or ()
    return [f + '.weight' for f in ((first,) if isinstance(first, str) else first)]


def _input_conv_mismatches(model: nn.Module, report: TransferReport) -> List[str]:
    """The keys of the mismatches that are only the input channels (``in_chans``) of the model's first conv, or of
    the routing layer of a dynamic first conv (it reads the input's channel means)."""
    keys = {k for w in _first_conv_keys(model) for k in (w, w[:-len('weight')] + 'fc1.weight')}
    return [k for k, a, b in report.mismatched
            if k in keys and len(a) == len(b) and len(a) in (2, 4) and a[0] == b[0] and a[2:] == b[2:]]


def adapt_input_channels(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict`` with its first conv's weight adapted to the model's ``in_chans`` as timm does (summed or
    repeated over the input channels) where the two differ."""
    target = model.state_dict()
    stems = {k: adapt_input_conv(target[k].shape[1], state_dict[k], base_chans=state_dict[k].shape[1])
             for k in _first_conv_keys(model) if k in state_dict and k in target and state_dict[k].ndim == 4
             and state_dict[k].shape[1] != target[k].shape[1]}
    return dict(state_dict, **stems)


def load_stock_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> TransferReport:
    """Load a stock timm checkpoint of the base model into ``model``; the pooling modules keep their init.

    A classifier of another class count is left at its initialisation (reset, as timm does when
    ``num_classes`` differs from the checkpoint's); a first conv of another ``in_chans`` is adapted as timm does
    (summed or repeated over the input channels); any other shape mismatch is an error naming the tensors.
    """
    head = getattr(model, 'pretrained_cfg', {}).get('classifier')
    if head:
        target = model.state_dict()
        state_dict = {k: v for k, v in state_dict.items()
                      if not (k.startswith(head + '.') and k in target and target[k].shape != v.shape)}
    adapted, report = adapt_stock_state_dict(adapt_input_channels(state_dict, model), model)
    if report.mismatched or report.unused:
        # a checkpoint of another base model (e.g. a resnetv2_18 file for a resnet18 model) names no model tensor
        shown = [f'{k} checkpoint {a} vs model {b}' for k, a, b in report.mismatched[:8]]
        shown += [f'unexpected {k}' for k in report.unused[:8 - len(shown)]]
        more = len(report.mismatched) + len(report.unused) - len(shown)
        arch = getattr(model, 'arch', None)
        raise ValueError(f'Checkpoint does not match {arch.seed if arch else type(model).__name__}; '
                         f'{len(report.mismatched)} shape mismatches, {len(report.unused)} unexpected tensors: '
                         + ', '.join(shown) + (f' and {more} more' if more else ''))
    model.load_state_dict(adapted, strict=False)
    _logger.warning('Stock-weight transfer: ' + report.summary())
    return report


def load_stock_source(model: nn.Module, source: str) -> TransferReport:
    """Start ``model`` from stock timm weights of its base model: a timm name with tag (weights from the Hub,
    e.g. ``resnet18.a1_in1k``) or a checkpoint file (read safely, see ``timm_nlp.checkpoint.load_weights``)."""
    arch = getattr(model, 'arch', None)
    if os.path.isfile(source):
        state_dict = load_weights(source)
    elif source.endswith(('.safetensors', '.pth', '.pt', '.bin', '.tar')):  # a file path, not a timm name.tag
        raise FileNotFoundError(f"stock_weights file '{source}' does not exist.")
    else:
        base = source.split('.')[0]
        if arch is not None and base != arch.base_name:
            raise ValueError(f"stock_weights='{source}' are weights of {base}, but {arch.seed} is built from "
                             f'{arch.base_name}; use {arch.base_name}.<tag>, e.g. one of '
                             f"{timm.list_pretrained(arch.base_name + '.*')[:4]}.")
        state_dict = timm.create_model(source, pretrained=True).state_dict()
    return load_stock_weights(model, state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``pretrained_filter_fn`` for timm's ``pretrained=True`` loading of published timm-nlp weights.

    Unwraps ``state_dict``/``model`` containers and renames the keys of earlier versions (``rename_legacy_keys``);
    a checkpoint of another architecture raises, naming the mismatching tensors, instead of loading partially.
    """
    for wrapper in ('state_dict', 'model', 'state_dict_ema'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = rename_legacy_keys(state_dict)
    adapted, report = adapt_stock_state_dict(state_dict, model)
    head = getattr(model, 'pretrained_cfg', {}).get('classifier') or ''
    is_head = lambda k: bool(head) and k.startswith(head + '.')  # noqa: E731
    target = model.state_dict()
    in_conv = _input_conv_mismatches(model, report)
    for k in in_conv:
        # timm adapts the first conv's weight to the model's in_chans after this filter; a routing layer is done here
        w = state_dict[k]
        adapted[k] = w if w.ndim == 4 else \
            adapt_input_conv(target[k].shape[1], w[..., None, None], base_chans=w.shape[1])[..., 0, 0]
    # a classifier of another class count (or none, num_classes=0) is dropped here; timm then resets the head
    wrong = [m for m in report.mismatched if not is_head(m[0]) and m[0] not in in_conv]
    unused = [k for k in report.unused if not is_head(k)]
    # torch's strict loading fills in the BN counters itself
    missing = [k for k in report.new if k not in {m[0] for m in report.mismatched} and not is_head(k)
               and not k.endswith('num_batches_tracked')]
    if wrong or unused or missing:
        arch = getattr(model, 'arch', None)
        raise ValueError(f'Checkpoint does not match {arch.seed if arch else type(model).__name__}: '
                         + ', '.join([f'{k} checkpoint {a} vs model {b}' for k, a, b in wrong[:8]]
                                     + [f'unexpected {k}' for k in unused[:8]] + [f'missing {k}' for k in missing[:8]]))
    return adapted
