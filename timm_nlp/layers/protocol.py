"""What a layer of timm-nlp answers for itself: the one description of the protocol that the profiler, patch-based
execution and the exporter ask, so that none of them reads a layer's internals or copies its math.

A ``CompoundLayer`` is a layer with internal steps (an importance branch, a routing branch, offsets). It says

- what it holds in memory besides its input and output: ``operand_numel`` (the map it computes with, e.g. a pool's
  importance map), ``held_numel`` (maps computed before its internal steps and held while they run) and
  ``held_outputs`` (children whose outputs stay live through the later internal steps);
- how it runs patch by patch: ``patch_support()``, a ``PatchSupport`` that is local (each output needs a bounded
  neighbourhood of the input), two-pass (a global first pass, e.g. attention over every token, then a local pass) or
  refused with the reason.

A ``PoolLayer`` is a pooling layer (a drop-in for ``nn.MaxPool2d(stride)``). Besides the above it gives

- its output shape (``output_shape``), which patch-based execution uses to plan at any size without running it;
- the two passes where it has them: ``first_pass`` on a region of its input (the part of the global statistics
  that region contributes), ``global_state`` from all regions' parts, ``pool_patch`` on a crop with that state, and
  for the memory count ``two_pass_numel`` and ``global_step``;
- its export form (``export_form(in_size, chunk)``): the module a deployment exports in its place, for one input
  size and batch 1, in the ops that TensorFlow Lite Micro runs (``timm_nlp.layers.export_ops``), or an
  ``ExportError`` with the reason it has none.

A new pooling method is one ``PoolLayer`` subclass: the profiler, patch-based execution and the exporter then take
it without change.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .export_ops import ExportError

__all__ = ['PatchSupport', 'CompoundLayer', 'PoolLayer', 'pool_output_size', 'ShapeOnly']

Shape = Sequence[int]


def pool_output_size(size: int, stride: int, ceil_mode: bool = False) -> int:
    """Output side of a window pool over ``size`` positions: ``size // stride`` (at least 1), or the ceiling."""
    if ceil_mode:
        return -(-size // stride)
    return max(1, size // stride)


@dataclass(frozen=True)
class PatchSupport:
    """How a layer runs patch by patch.

    Args:
        mode: 'local' (each output needs a bounded neighbourhood of the input), 'two-pass' (a global first pass over
            all patches, then the layer patch by patch with its result) or 'whole-map' (refused).
        reason: Why a 'whole-map' layer needs the whole map.
        token_size: Two-pass: the side, in input pixels, of the regions its first pass reads as units (a non-local
            pool's tokens); crops are aligned to it.
        label: Two-pass: a short name of the first pass in profiles ('nlp', 'gaussian').
    """
    mode: str
    reason: str = ''
    token_size: int = 1
    label: str = ''

    @classmethod
    def local(cls) -> 'PatchSupport':
        return cls('local')

    @classmethod
    def whole_map(cls, reason: str) -> 'PatchSupport':
        return cls('whole-map', reason)

    @classmethod
    def two_pass(cls, label: str, token_size: int = 1) -> 'PatchSupport':
        return cls('two-pass', token_size=token_size, label=label)


class CompoundLayer(nn.Module):
    """A layer with internal steps, which memory accountings count as one step after them (see the module docstring).
    The defaults describe a layer that holds nothing besides its input and output and runs locally."""

    held_outputs: Tuple[str, ...] = ()

    def operand_numel(self, x: torch.Tensor, out: torch.Tensor) -> int:
        """Elements of the map this layer computes with besides its input ``x`` and output ``out``."""
        return 0

    def held_numel(self, x: torch.Tensor) -> int:
        """Elements of the maps it computes before its internal steps and holds while they run."""
        return 0

    def step_output(self, output) -> torch.Tensor:
        """The output tensor of a forward's return value (its other values are operands)."""
        return output

    def patch_support(self) -> PatchSupport:
        return PatchSupport.local()

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        """The module a deployment exports in this layer's place (see ``PoolLayer.export_form``)."""
        return self


class PoolLayer(CompoundLayer):
    """A pooling layer over ``stride x stride`` windows (see the module docstring). Subclasses set ``stride`` and
    ``ceil_mode``; a two-pass layer overrides the two-pass methods."""

    stride: int
    ceil_mode: bool

    def output_shape(self, shape: Shape) -> Tuple[int, ...]:
        """The output shape of an input of ``shape`` (B, C, H, W)."""
        *lead, H, W = shape
        return (*lead, pool_output_size(H, self.stride, self.ceil_mode), pool_output_size(W, self.stride,
                                                                                          self.ceil_mode))

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """Two-pass layers: what a region ``x`` of the input (whole tokens) contributes to the global state."""
        raise NotImplementedError(f'{type(self).__name__} has no two-pass execution.')

    def global_state(self, parts: List[Tuple[Tuple[int, int], torch.Tensor]], in_size: Tuple[int, int]
                     ) -> torch.Tensor:
        """Two-pass layers: the state of the whole input of ``in_size`` from ``first_pass`` parts, each with the
        (row, column) of its region's origin; the regions cover the input (whole tokens may be covered twice)."""
        raise NotImplementedError(f'{type(self).__name__} has no two-pass execution.')

    def pool_patch(self, x: torch.Tensor, state: torch.Tensor, origin: Tuple[int, int]) -> torch.Tensor:
        """Two-pass layers: the output of the crop ``x`` of the input whose origin is ``origin``, given the global
        ``state``."""
        raise NotImplementedError(f'{type(self).__name__} has no two-pass execution.')

    def two_pass_numel(self, in_size: Tuple[int, int]) -> Tuple[int, int]:
        """Two-pass layers, per sample: the elements the first pass assembles and those of the global state."""
        raise NotImplementedError(f'{type(self).__name__} has no two-pass execution.')

    def global_step(self, in_size: Tuple[int, int]) -> Optional[Tuple[nn.Module, Tuple[int, ...]]]:
        """Two-pass layers: the module computing the global state from the assembled first pass, and its input shape
        (C, H, W), for memory accounting; None where it is negligible."""
        return None

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        """The module a deployment exports in this layer's place for an input of ``in_size`` (batch 1, eval), in the
        ops of ``timm_nlp.layers.export_ops``; ``chunk``: the query rows an attention computes at a time. Raises an
        ``ExportError`` with the reason where there is no exact one."""
        if self.ceil_mode:
            raise ExportError('its ceil-mode windows have no TFLite pooling')
        return self


class ShapeOnly(nn.Module):
    """A pooling layer's stand-in that gives its output shape and computes nothing: for planning on the meta device at
    any size (a non-local pool would attend over every token)."""

    def __init__(self, pool: PoolLayer):
        super().__init__()
        self.__dict__['pool'] = pool  # not a child: no parameters of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(self.pool.output_shape(x.shape))
