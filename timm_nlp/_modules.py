"""Module helpers shared by the profiler and patch-based execution: weight-free meta copies, a model's units (the
modules its ``forward_features`` runs one after the other) and structural views with some submodules replaced."""
import copy
from typing import Dict, List, Sequence

import torch
from torch import nn

__all__ = ['meta_copy', 'model_units', 'Units', 'substituted', 'has_submodule']


def meta_copy(module: nn.Module, drop_hooks: bool = False) -> nn.Module:
    """A copy of ``module`` on the meta device, its parameters and buffers never copied (each becomes an empty meta
    tensor; those of a ``_model`` it refers to without owning too), in eval mode; ``drop_hooks`` leaves out the
    forward hooks registered on it."""
    owners = [module] + ([module.__dict__['_model']] if '_model' in module.__dict__ else [])
    memo = {}
    for owner in owners:
        for t in list(owner.parameters()) + list(owner.buffers()):
            if id(t) not in memo:
                meta_t = torch.empty_like(t, device='meta')
                memo[id(t)] = nn.Parameter(meta_t, t.requires_grad) if isinstance(t, nn.Parameter) else meta_t
    meta = copy.deepcopy(module, memo).eval()
    if drop_hooks:
        for m in meta.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
    return meta


def has_submodule(model: nn.Module, name: str) -> bool:
    """Whether ``model`` has a submodule at the dotted path ``name``."""
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def model_units(model: nn.Module) -> List[str]:
    """The names of the modules that ``model.forward_features`` runs one after the other (timm's ResNet and
    EfficientNet/MobileNetV2 layouts)."""
    if hasattr(model, 'layer1') and hasattr(model, 'conv1'):
        names = ['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']
    elif hasattr(model, 'conv_stem') and hasattr(model, 'blocks'):
        names = ['conv_stem', 'bn1'] + [f'blocks.{i}' for i in range(len(model.blocks))] + ['conv_head', 'bn2']
    else:
        raise TypeError(f'patch-based execution takes timm ResNet and EfficientNet/MobileNetV2 models, not '
                        f'{type(model).__name__}.')
    return [n for n in names if has_submodule(model, n)]


class Units(nn.Module):
    """Units of ``model`` (dotted module names) run one after the other, registered under their own names (so that
    profiles name them as the model does), then, with ``head``, the model's ``forward_head`` (its head modules
    registered too)."""

    def __init__(self, model: nn.Module, units: Sequence[str], head: bool = False):
        super().__init__()
        self.units = list(units)
        for name in self.units:
            parent = self
            *path, leaf = name.split('.')
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, model.get_submodule(name))
        self.head = head
        if head:
            for name, child in model.named_children():
                if name not in {u.split('.')[0] for u in model_units(model)} and not hasattr(self, name):
                    self.add_module(name, child)
        self.__dict__['_model'] = model  # not a child: its head modules are, under their names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.units:
            x = self.get_submodule(name)(x)
        return self._model.forward_head(x) if self.head else x


def substituted(module: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    """A view of ``module`` with the submodules at the dotted paths of ``replacements`` replaced: the containers on
    each path are shallow copies (sharing their parameters, buffers and hooks), everything else is ``module``'s own.
    ``module`` itself is left as it is."""
    if not replacements:
        return module
    if '' in replacements:
        return replacements['']
    view = copy.copy(module)
    view._modules = dict(module._modules)
    below: Dict[str, Dict[str, nn.Module]] = {}
    for path, new in replacements.items():
        head, _, rest = path.partition('.')
        if head not in view._modules:
            raise KeyError(f"'{path}' is not a submodule of {type(module).__name__}")
        below.setdefault(head, {})[rest] = new
    for head, sub in below.items():
        view._modules[head] = substituted(module._modules[head], sub)
    return view
