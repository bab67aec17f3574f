"""Export to TFLite with static int8 post-training quantisation, for TFLite Micro.

The path: a copy of the model in eval mode whose layers take their export forms (``PoolLayer.export_form``: the ops
TFLite Micro runs) and whose stride-2 convolutions pad as TFLite does (``widen_stride2_convs``); optionally its
high-resolution prefix patch by patch in the same graph (``timm_nlp.patch_based``); an NHWC int8 interface
(``litert_torch.to_channel_last_io``); ``torch.export``; PT2E quantisation (``FullInt8Quantizer``) calibrated on real
images; litert-torch's converter; int8 inputs and outputs; the ops TFLite Micro runs in float only moved to float.
"""
import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import litert_torch
from litert_torch.quantize.quant_config import QuantConfig
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from timm_nlp._modules import meta_copy
from timm_nlp.layers import CompoundLayer
from timm_nlp.layers.export_ops import ExportError, FloatIsland
from timm_nlp.patching import PatchBased, lowest_patched_profile
from .flatbuffer import float_ops, floatify_ops, io_quantization, op_census, to_int8_io
from .quantizer import FullInt8Quantizer

__all__ = ['TFLiteModel', 'export_tflite', 'export_form_model', 'fold_batch_norms', 'widen_stride2_convs',
           'DEFAULT_CHUNK']

DEFAULT_CHUNK = 64


@dataclass
class TFLiteModel:
    """An exported model: the flatbuffer and what it holds."""
    flatbuffer: bytes
    input_size: Tuple[int, int, int]
    ops: Dict[str, int]
    float_ops: List[str]
    float_islands: List[str]
    io: Dict[str, list]
    patches: Optional[int] = None
    split: Optional[str] = None
    chunk: Optional[int] = None
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def fully_int8(self) -> bool:
        """No op computes in float and none quantises or dequantises inside the graph."""
        return not self.float_ops

    def save(self, path: str) -> None:
        with open(path, 'wb') as f:
            f.write(self.flatbuffer)


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
            model(torch.zeros(1, *input_size))
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
    convolutions and, with ``widen``, its stride-2 convolutions padded as TFLite pads. Raises an ``ExportError``
    naming a layer that has no exact export form."""
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
    fold_batch_norms(model, input_size)
    if widen:
        widen_stride2_convs(model, input_size)
    return model.eval()


def export_tflite(
        model: nn.Module,
        calibration: torch.Tensor,
        patches: Optional[int] = None,
        split: Optional[str] = None,
        chunk: Optional[int] = DEFAULT_CHUNK,
        widen: bool = True,
        observer: str = 'histogram',
) -> TFLiteModel:
    """Export ``model`` as an int8 TFLite model for TFLite Micro: int8 NHWC input, int8 output, static int8
    quantisation calibrated on ``calibration``.

    Args:
        model: A timm or timm-nlp model.
        calibration: Calibration images ``(N, C, H, W)``, preprocessed as the model takes them; their size is the
            model's input size.
        patches: Run the high-resolution prefix on ``patches x patches`` patches in the same graph
            (``timm_nlp.patch_based``; two-pass pools included).
        split: The last unit of the patch-based prefix (default: the lowest counted peak).
        chunk: Query rows a non-local pool's attention computes at a time (None: all).
        widen: Pad stride-2 convolutions as TFLite does (no PAD copies; exact).
        observer: Calibration observer, 'histogram' or 'minmax' (faster).

    Returns:
        The flatbuffer with its op census, the ops left in float and the float islands the layers declared.
    """
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    input_size = tuple(calibration.shape[1:])
    form = export_form_model(model, input_size, chunk, widen)
    if patches:
        if split is None:
            split = lowest_patched_profile(model, input_size, patches)[0]
        form = PatchBased(form, patches, split).eval()
        form.plan(input_size)  # planned (on meta copies) before the tracing, not inside it
    islands = sorted({m.name for m in form.modules() if isinstance(m, FloatIsland)})
    wrapped = litert_torch.to_channel_last_io(form, args=[0]).eval()
    nhwc = calibration.permute(0, 2, 3, 1).contiguous()
    with torch.no_grad():
        program = torch.export.export(wrapped, (nhwc[:1],), strict=False)
    quantizer = FullInt8Quantizer(observer)
    prepared = prepare_pt2e(program.module(), quantizer)
    seconds['export'] = time.perf_counter() - start
    with torch.no_grad():
        for i in range(len(nhwc)):
            prepared(nhwc[i:i + 1])
    seconds['calibrate'] = time.perf_counter() - start - seconds['export']
    converted = convert_pt2e(prepared, fold_quantize=False)
    flat = litert_torch.convert(converted, (nhwc[:1],), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    flat, _ = floatify_ops(to_int8_io(flat.model_content()))
    seconds['convert'] = time.perf_counter() - start - seconds['export'] - seconds['calibrate']
    return TFLiteModel(flat, input_size, op_census(flat), float_ops(flat), islands, io_quantization(flat),
                       patches, split if patches else None, chunk, seconds)
