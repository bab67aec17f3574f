"""Model cost accounting: multiply-accumulates (attention included)."""
import copy
from typing import Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_macs']


def _deform_conv2d_flops(x_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None, **kw):
    """FLOPs of torchvision's deform_conv2d: those of the convolution it computes (bilinear sampling excluded)."""
    batch, out_ch, out_h, out_w = out_shape
    _, in_per_group, kh, kw_ = weight_shape
    return 2 * batch * out_ch * out_h * out_w * in_per_group * kh * kw_


def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass: convolutions, linear layers and matmuls, attention included.

    Runs on a meta-device copy in eval mode (no memory, any size) under the math SDPA backend, because torch's
    FlopCounterMode does not see inside the fused CPU attention kernel; deformable convolutions count as
    convolutions. Element-wise operations, normalisation and pooling are not counted.
    """
    import torchvision.ops  # noqa: F401  registers torch.ops.torchvision
    meta = copy.deepcopy(model).to('meta').eval()
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops})
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        meta(torch.empty(batch_size, *input_size, device='meta'))
    return counter.get_total_flops() // 2
