"""Dynamic Convolution (Chen et al., CVPR 2020) as the Self-Attentive Pooling paper's code builds it.

K kernels mixed per sample by softmax attention: ``pi = softmax(fc2(relu(fc1(GAP(x)))) / T)``, fc1 without bias,
``T = 34``; the output is ``conv(x, sum_k pi_k W_k) + sum_k pi_k b_k``.
"""
import math
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import register_notrace_module

from .export_ops import ExportError
from .protocol import CompoundLayer, PatchSupport

__all__ = ['DynamicConv2d', 'convert_dynamic_conv', 'set_dynamic_temperature']

PaddingArg = Union[int, str]


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'Dynamic convolution temperature must be a finite number > 0, got {temperature} (0 divides '
                         'the attention logits by zero; a negative one inverts the softmax).')


def _same_padding(kernel_size: int, dilation: int = 1) -> Tuple[int, int]:
    """(before, after) padding of ``padding='same'`` at stride 1, as torch pads it: the odd pixel goes after."""
    total = dilation * (kernel_size - 1)
    return total // 2, total - total // 2


@register_notrace_module
class DynamicConv2d(CompoundLayer):
    """Convolution whose kernel is ``sum_k pi_k(x) W_k``.

    The per-sample kernels run as one grouped convolution over the batch. With ``batch_agnostic`` set (ONNX export
    with a dynamic batch, whose graph cannot take the batch as a group count), the layer instead runs all K kernels
    as one convolution and mixes the K outputs, the same function at K times the MACs. The K kernels are stored
    stacked along the output channels, ``(K * out, in / groups, k, k)``: a 4-D weight like a convolution's, so
    ``model.to(memory_format=torch.channels_last)`` works. The temperature is a buffer, so an annealed value travels
    with the checkpoint.

    Args:
        padding: An int, or 'same' (stride 1; the odd pixel of an even kernel padded after, as torch does).
        num_kernels: K.
        temperature: Softmax temperature T (34 in the paper's code, never changed by its training).
        attn_ratio: Hidden width of the attention, ``int(in * ratio) + 1``; K for the image input (the paper's
            code: 3 channels; here up to 3, so that an RGB stem's routing adapts to another ``in_chans``).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            stride: int = 1,
            padding: PaddingArg = 0,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = True,
            num_kernels: int = 4,
            temperature: float = 34.,
            attn_ratio: float = 0.25,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_channels % groups or out_channels % groups or num_kernels < 1:
            raise ValueError(f'DynamicConv2d: channels ({in_channels}, {out_channels}) must divide by groups '
                             f'({groups}) and num_kernels ({num_kernels}) must be >= 1.')
        if padding == 'same' and stride != 1:
            raise ValueError(f"DynamicConv2d: padding='same' needs stride 1, got {stride}.")
        _check_temperature(temperature)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.dilation = (dilation, dilation)
        self.groups = groups
        self.num_kernels = num_kernels
        before, after = _same_padding(kernel_size, dilation) if padding == 'same' else (int(padding), int(padding))
        # symmetric padding goes to the convolution, the odd extra pixel of an even 'same' kernel to an F.pad
        self.padding = (before, before)
        self.extra_pad = after - before
        hidden = num_kernels if in_channels <= 3 else int(in_channels * attn_ratio) + 1
        self.fc1 = nn.Linear(in_channels, hidden, bias=False, **dd)
        self.fc2 = nn.Linear(hidden, num_kernels, **dd)
        self.weight = nn.Parameter(
            torch.empty(num_kernels * out_channels, in_channels // groups, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **dd)) if bias else None
        self.register_buffer('temperature', torch.full((), float(temperature), **dd))
        self.batch_agnostic = False
        self.reset_parameters()

    @property
    def kernels(self) -> torch.Tensor:
        """The K kernels, ``(K, out, in / groups, k, k)`` (a view of the weight)."""
        return self.weight.unflatten(0, (self.num_kernels, self.out_channels))

    def reset_parameters(self) -> None:
        """The paper code's init: each kernel kaiming-uniform (a=0), biases 0; the attention kaiming-normal
        (fan_out), its bias 0."""
        for kernel in self.kernels:
            nn.init.kaiming_uniform_(kernel)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(self.fc2.bias)

    def attention_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Kernel attention ``(B, K)`` from the per-channel mean ``(B, in)`` of the input."""
        z = self.fc2(F.relu(self.fc1(mean)))
        return F.softmax(z / self.temperature, dim=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel attention ``(B, K)`` of input ``x``."""
        return self.attention_from_mean(x.mean((2, 3)))

    def mixed_weight(self, attn: torch.Tensor) -> torch.Tensor:
        """The per-sample kernels ``(B * out, in / groups, k, k)`` of attention ``attn`` (B, K)."""
        B = attn.shape[0]
        return (attn @ self.weight.reshape(self.num_kernels, -1)).reshape(
            B * self.out_channels, self.in_channels // self.groups, self.kernel_size[0], self.kernel_size[1])

    def mixed_bias(self, attn: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-sample biases ``(B * out,)``, or None."""
        if self.bias is None:
            return None
        return (attn @ self.bias).flatten()

    def patch_support(self) -> PatchSupport:
        return PatchSupport.whole_map('its kernel mixture is routed by a global average of its input')

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        raise ExportError('its dynamic convolution mixes per-sample kernels at run time; TFLite convolutions take '
                          'constant weights')

    def _forward_batch_agnostic(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        K, G = self.num_kernels, self.groups
        # output channels ordered (group, kernel, channel) so that each group's K kernels see that group's inputs
        weight = self.kernels.unflatten(1, (G, -1)).transpose(0, 1).flatten(0, 2)
        out = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, G)
        out = (out.unflatten(1, (G, K, -1)) * attn[:, None, :, None, None, None]).sum(2).flatten(1, 2)
        if self.bias is not None:
            out = out + (attn @ self.bias)[:, :, None, None]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention(x)
        if self.extra_pad:
            x = F.pad(x, (0, self.extra_pad, 0, self.extra_pad))
        if self.batch_agnostic:
            return self._forward_batch_agnostic(x, attn)
        B, C, H, W = x.shape
        out = F.conv2d(x.reshape(1, B * C, H, W), self.mixed_weight(attn), self.mixed_bias(attn), self.stride,
                       self.padding, self.dilation, self.groups * B)
        return out.reshape(B, self.out_channels, out.shape[-2], out.shape[-1])

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, groups={self.groups}, num_kernels={self.num_kernels}')


def convert_dynamic_conv(
        module: nn.Module,
        num_kernels: int = 4,
        temperature: float = 34.,
) -> List[str]:
    """Replace every ``nn.Conv2d`` of ``module`` by a ``DynamicConv2d`` of the same geometry, in place.

    The new layers keep the device and dtype of the convolutions they replace (freshly initialised); a conv whose
    stride, padding or dilation differs between the axes, or that pads other than with zeros, which
    ``DynamicConv2d`` does not take, is left as it is.

    Returns:
        The names of the replaced modules.
    """
    targets = [
        (n, m) for n, m in module.named_modules()
        if type(m) is nn.Conv2d and isinstance(m.padding, tuple) and m.padding_mode == 'zeros'
        and all(a == b for a, b in (m.kernel_size, m.stride, m.padding, m.dilation))
    ]
    for name, conv in targets:
        parent_name, _, child = name.rpartition('.')
        parent = module.get_submodule(parent_name) if parent_name else module
        dyn = DynamicConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
            conv.dilation[0], conv.groups, conv.bias is not None, num_kernels, temperature,
            device=conv.weight.device, dtype=conv.weight.dtype)
        setattr(parent, child, dyn)
    return [n for n, _ in targets]


def set_dynamic_temperature(module: nn.Module, temperature: float) -> int:
    """Set the softmax temperature of every DynamicConv2d in ``module``; returns how many were set."""
    _check_temperature(temperature)
    count = 0
    for m in module.modules():
        if isinstance(m, DynamicConv2d):
            m.temperature.fill_(temperature)
            count += 1
    return count
