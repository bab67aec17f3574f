"""Whole-model profiles (params, MACs, activation memory, whole-map or patch-based) and their presentation: the
``timm-nlp profile`` table and plot. The numbers come from ``timm_nlp.profiler`` and ``timm_nlp.patching``."""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from timm_nlp.models import create_model
from timm_nlp.patching import lowest_patched_profile, patched_macs, patched_profile
from timm_nlp.profiler import ActivationProfile, activation_profile, count_macs

__all__ = ['ModelProfile', 'profile_model', 'compare_table', 'plot_memory']


@dataclass
class ModelProfile:
    """Costs of one model at one input size."""
    name: str
    base: str
    params: int
    macs: int
    memory: ActivationProfile
    stage_prefixes: Tuple[str, ...] = ()
    split: Optional[str] = None
    patched_macs: Optional[int] = None

    @property
    def stage_peak_bytes(self) -> int:
        """Peak over the steps of the stages, i.e. beyond the stem."""
        return max(layer.live_bytes for layer in self.memory.layers if layer.name.startswith(self.stage_prefixes))


def profile_model(name: str, img_size: int = 224, dtype: Union[torch.dtype, str] = torch.float32,
                  accounting: str = 'layers', patches: Optional[int] = None, split: Optional[str] = None
                  ) -> ModelProfile:
    """Params, MACs and activation memory of a model (any timm name or architecture string), built on the meta
    device; with ``patches``, of patch-based execution (``patched_profile``; ``split`` by default the lowest peak)."""
    model = create_model(name, device='meta')
    arch = getattr(model, 'arch', None)
    size = (3, img_size, img_size)
    stems = ('act1', 'stem', 'bn1', 'conv1', 'conv_stem')
    stages = tuple(sorted({f['module'].split('.')[0] + '.' if f['module'].startswith(('stages.', 'blocks.'))
                           else f['module'] for f in model.feature_info if not f['module'].startswith(stems)}))
    if patches and split is None:  # the split with the lowest mcunet peak, whatever the accounting counted
        split, memory = lowest_patched_profile(model, size, patches, dtype=dtype)
        if accounting != 'mcunet':
            memory = patched_profile(model, size, patches, split, dtype=dtype, accounting=accounting)
    elif patches:
        memory = patched_profile(model, size, patches, split, dtype=dtype, accounting=accounting)
    else:
        memory = activation_profile(model, size, dtype=dtype, accounting=accounting)
    return ModelProfile(name, arch.base_name if arch is not None else name,
                        sum(p.numel() for p in model.parameters()), count_macs(model, size), memory, stages,
                        split if patches else None, patched_macs(model, size, patches, split) if patches else None)


def compare_table(profiles: List[ModelProfile], bases: dict) -> List[List[str]]:
    """Rows of the ``--compare`` table; ``bases`` maps a base name to its own profile."""
    rows = []
    for p in profiles:
        b = bases[p.base]
        rows.append([p.name, f'{p.params / 1e6:.2f}', f'{p.macs / 1e9:.3f}', f'{p.macs / b.macs:.2f}x',
                     f'{p.memory.peak_bytes / 1024:.0f}', f'{b.memory.peak_bytes / p.memory.peak_bytes:.2f}x',
                     f'{p.stage_peak_bytes / 1024:.0f}', f'{b.stage_peak_bytes / p.stage_peak_bytes:.2f}x',
                     f'{p.memory.largest_map_bytes / 1024:.0f}', p.memory.peak_layer.name])
    return rows


def plot_memory(profiles: List[ModelProfile], path: str) -> None:
    """Per-step live activation memory of each model (matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('--plot needs matplotlib: pip install "timm-nlp[plot]"') from e
    fig, ax = plt.subplots(figsize=(10, 5))
    for p in profiles:
        ax.plot([layer.live_bytes / 1024 for layer in p.memory.layers], label=p.name, linewidth=1.2)
    ax.set_yscale('log')
    ax.set_xlabel('step (layer-by-layer execution order)')
    ax.set_ylabel('live activation memory (KiB, log)')
    ax.legend(fontsize=8)
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
