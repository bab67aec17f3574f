"""Dynamic Convolution (Chen et al., CVPR 2020): K kernels mixed by input-dependent softmax attention."""
import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import register_notrace_module

__all__ = ['DynamicConv2d', 'convert_dynamic_conv', 'set_dynamic_temperature']


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'Dynamic convolution temperature must be a finite number > 0, got {temperature} (0 divides '
                         'the attention logits by zero; a negative one inverts the softmax).')


@register_notrace_module
class DynamicConv2d(nn.Module):
    """Convolution whose kernel is ``sum_k pi_k(x) W_k``, ``pi = softmax(fc2(relu(fc1(GAP(x)))) / temperature)``.

    The per-sample kernels run as one grouped convolution over the batch. With ``batch_agnostic`` set (ONNX
    export with a dynamic batch, whose graph cannot take the batch as a group count), the layer instead runs all
    K kernels as one convolution and mixes the K outputs, the same function at K times the MACs. The
    temperature is a buffer, so an annealed value travels with the checkpoint; the paper anneals it from 30 to
    1 over the first epochs. The K kernels are stored stacked along the output channels, ``(K * out, in / groups,
    k, k)``: a 4-D weight like a convolution's, so ``model.to(memory_format=torch.channels_last)`` works.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = True,
            num_kernels: int = 4,
            temperature: float = 30.,
            attn_ratio: float = 0.25,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_channels % groups or out_channels % groups or num_kernels < 1:
            raise ValueError(f'DynamicConv2d: channels ({in_channels}, {out_channels}) must divide by groups '
                             f'({groups}) and num_kernels ({num_kernels}) must be >= 1.')
        _check_temperature(temperature)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.groups = groups
        self.num_kernels = num_kernels
        hidden = max(4, int(in_channels * attn_ratio))
        self.fc1 = nn.Linear(in_channels, hidden, **dd)
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
        for kernel in self.kernels:
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel attention ``(B, K)`` of input ``x``."""
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return F.softmax(z / self.temperature, dim=1)

    def _forward_batch_agnostic(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        K, G = self.num_kernels, self.groups
        # output channels ordered (group, kernel, channel) so that each group's K kernels see that group's inputs
        weight = self.kernels.unflatten(1, (G, -1)).transpose(0, 1).flatten(0, 2)
        bias = self.bias.unflatten(1, (G, -1)).transpose(0, 1).flatten() if self.bias is not None else None
        out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, G)
        out = out.unflatten(1, (G, K, -1)) * attn[:, None, :, None, None, None]
        return out.sum(2).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        attn = self.attention(x)
        if self.batch_agnostic:
            return self._forward_batch_agnostic(x, attn)
        weight = (attn @ self.weight.reshape(self.num_kernels, -1)).reshape(
            B * self.out_channels, self.in_channels // self.groups, self.kernel_size[0], self.kernel_size[1])
        bias: Optional[torch.Tensor] = None
        if self.bias is not None:
            bias = (attn @ self.bias).flatten()
        out = F.conv2d(
            x.reshape(1, B * C, H, W), weight, bias, self.stride, self.padding, self.dilation, self.groups * B)
        return out.reshape(B, self.out_channels, out.shape[-2], out.shape[-1])

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, groups={self.groups}, num_kernels={self.num_kernels}')


def convert_dynamic_conv(
        module: nn.Module,
        kernel_sizes: Tuple[int, ...] = (1, 3),
        num_kernels: int = 4,
        temperature: float = 30.,
) -> List[str]:
    """Replace every ``nn.Conv2d`` with a square kernel in ``kernel_sizes`` by a ``DynamicConv2d``, in place.

    The new layers keep the geometry, device and dtype of the convolutions they replace (freshly initialised);
    a conv whose stride, padding or dilation differs between the axes, which ``DynamicConv2d`` does not take, is
    left as it is.

    Returns:
        The names of the replaced modules.
    """
    targets = [
        (n, m) for n, m in module.named_modules()
        if type(m) is nn.Conv2d and m.kernel_size[0] in kernel_sizes and isinstance(m.padding, tuple)
        and all(a == b for a, b in (m.kernel_size, m.stride, m.padding, m.dilation)) and m.padding_mode == 'zeros'
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
