"""The model as it is deployed: a copy whose layers take their export forms (``PoolLayer.export_form``: the same
function in the ops TensorFlow Lite Micro runs), whose batch norms are folded into their convolutions and whose stride-2
convolutions pad as TFLite pads. Used by the TFLite export (``timm_nlp.deploy``) and by the profiler's ``tflm``
accounting, which counts this model's ops as TFLite Micro plans them; it needs nothing beyond torch."""
import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from timm_nlp._modules import meta_copy
from timm_nlp.layers import CompoundLayer
from timm_nlp.layers.export_ops import ExportError
from timm_nlp.layers.self_attn_pool import balance_chunks

__all__ = ['export_form_model', 'fold_batch_norms', 'widen_stride2_convs', 'DEFAULT_CHUNK',
           'TAIL_BYTES_PER_OP', 'OBSERVERS', 'CALIBRATION_SETS']

DEFAULT_CHUNK = 64  # query rows at a time of the non-local attention over the most tokens
# TFLite Micro's arena tail per op of the attention's schedules, as measured on a 64-bit host (node, tensors and
# kernel data: 1,020,272 B for 4,831 ops of the paper's p = 1 MobileNetV2 at 224 px)
TAIL_BYTES_PER_OP = 200
OBSERVERS = ('histogram', 'minmax')  # calibration observers of the int8 quantisation
CALIBRATION_SETS = ('fashion-mnist', 'digits')  # the package's calibration images (or a folder)


def _input_sizes(model: nn.Module, input_size: Tuple[int, int, int], kinds: Tuple[type, ...]
                 ) -> Dict[str, Tuple[int, int]]:
    """The input (H, W) of every module of the given kinds in a batch-1 forward (on a meta copy)."""
    meta = meta_copy(model, drop_hooks=True)
    sizes: Dict[str, Tuple[int, int]] = {}

    def record(name: str):
        def hook(m: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))
        return hook
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in meta.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            meta(torch.empty(1, *input_size, device='meta'))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def widen_stride2_convs(model: nn.Module, input_size: Tuple[int, int, int]) -> int:
    """Give every k x k convolution of stride 2 and padding (k - 1) / 2 whose input is even a (k + 1) x (k + 1)
    kernel with a zero last row and column, in place: the same function, which TFLite's 'SAME' padding expresses
    (it pads the odd pixel after, PyTorch before), so that no PAD op copies its input. Returns how many."""
    sizes = _input_sizes(model, input_size, (nn.Conv2d,))
    widened = 0
    for name, conv in list(model.named_modules()):
        if type(conv) is not nn.Conv2d or name not in sizes:
            continue
        (k, kw), p = conv.kernel_size, conv.padding
        if conv.stride != (2, 2) or conv.dilation != (1, 1) or k != kw or k % 2 == 0 or k == 1 or \
                p != ((k - 1) // 2, (k - 1) // 2) or any(d % 2 for d in sizes[name]):
            continue
        wide = nn.Conv2d(conv.in_channels, conv.out_channels, k + 1, 2, p, 1, conv.groups, conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, :, :k, :k] = conv.weight
            if conv.bias is not None:
                wide.bias.copy_(conv.bias)
        model.set_submodule(name, wide)
        widened += 1
    return widened


def fold_batch_norms(model: nn.Module, input_size: Tuple[int, int, int]) -> int:
    """Fold every batch norm (eval) that directly follows a convolution into it, in place: the convolution takes the
    scale and shift, the norm becomes the identity (an ``nn.BatchNorm2d`` is replaced; a norm with more in its forward,
    as timm's ``BatchNormAct2d``, keeps an identity affine). Quantisation would fold them itself, but in the weights
    of every use of a convolution: several times where one runs on several patches. Returns how many."""
    producers: Dict[int, nn.Conv2d] = {}
    pairs: Dict[str, nn.Conv2d] = {}
    names = {m: n for n, m in model.named_modules()}

    def conv_hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        producers[id(output)] = m

    def norm_hook(m: nn.Module, inputs: tuple) -> None:
        conv = producers.get(id(inputs[0]))
        if conv is not None:
            pairs.setdefault(names[m], conv)
    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if type(m) is nn.Conv2d]
    hooks += [m.register_forward_pre_hook(norm_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    for name, conv in pairs.items():
        bn = model.get_submodule(name)
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            if type(bn) is nn.BatchNorm2d:
                model.set_submodule(name, nn.Identity())
            else:
                bn.running_mean.zero_(), bn.running_var.fill_(1. - bn.eps), bn.weight.fill_(1.), bn.bias.zero_()
    return len(pairs)


def export_form_model(model: nn.Module, input_size: Tuple[int, int, int], chunk: Optional[int] = DEFAULT_CHUNK,
                      widen: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode, batch 1, as it is exported: every layer with internal steps in its export
    form for its input size (the same function in the ops TFLite Micro runs), its batch norms folded into their
    convolutions and, with ``widen``, its stride-2 convolutions padded as TFLite pads; ``chunk`` query rows at a time
    in the attention over the most tokens, as many as hold as many scores in any other (``balance_chunks``); forms
    with two schedules lean (``timm_nlp.profiler.deployed_form`` chooses). Raises an ``ExportError`` naming a layer
    that has no exact export form."""
    model = copy.deepcopy(model).eval()
    sizes = _input_sizes(model, input_size, (CompoundLayer,))
    replaced: List[str] = []
    for name, m in list(model.named_modules()):
        if name not in sizes or any(name.startswith(r + '.') for r in replaced):
            continue
        try:
            form = m.export_form(sizes[name], chunk)
        except ExportError as e:
            raise ExportError(f"'{name}' ({type(m).__name__}) cannot be exported exactly: {e}") from None
        if form is not m:
            model.set_submodule(name, form)
            replaced.append(name)
    if chunk is not None:
        balance_chunks(model, chunk)
    fold_batch_norms(model, input_size)
    if widen:
        widen_stride2_convs(model, input_size)
    return model.eval()

