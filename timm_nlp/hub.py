"""Publishing trained models to the Hugging Face Hub and the manifest of published weights.

``timm-nlp push CHECKPOINT --repo ORG/NAME`` writes, with timm's own ``save_for_hf``, ``config.json`` and
``model.safetensors``, plus a model card, and uploads them (``--dry-run --out DIR`` writes them only).
Published weights become pretrained tags through the manifest (``timm_nlp.models.load_manifest``):
``timm.create_model('name.tag', pretrained=True)``.
"""
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from torch import nn

import timm
from timm.models import save_for_hf

from .checkpoint import CheckpointError, checkpoint_record, load_error_summary, load_weights
from .grammar import ArchSpec
from .models import create_model
from .tools.tables import markdown_table

__all__ = ['export_for_hub', 'push', 'model_card', 'checkpoint_model']


def checkpoint_model(checkpoint: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a trainer checkpoint describes (its architecture, classes and input channels), with its weights,
    and the checkpoint's record (``in_chans`` and ``num_classes`` filled in).

    Args:
        checkpoint: A run's ``model.safetensors`` or training checkpoint (``last.pth.tar``, ...); one that lacks
            tensors of its model, or holds others, is refused with them named.
    """
    meta = checkpoint_record(checkpoint)
    if not meta.get('architecture'):
        raise CheckpointError(f"'{checkpoint}' has no timm-nlp record (architecture, classes); push a "
                              '`model.safetensors` or a training checkpoint written by `timm-nlp train`.')
    arch = meta['architecture']
    state = load_weights(checkpoint)
    cfg = create_model(arch, device='meta').pretrained_cfg
    head, stem = state.get(f"{cfg.get('classifier')}.weight"), state.get(f"{cfg.get('first_conv')}.weight")
    num_classes = meta.get('num_classes') or (head.shape[0] if head is not None else 1000)
    in_chans = (meta.get('recipe') or {}).get('in_chans') or (stem.shape[1] if stem is not None else 3)
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"'{checkpoint}' does not match {arch}: {load_error_summary(e)}.") from None
    return model.eval(), dict(meta, architecture=arch, num_classes=num_classes, in_chans=in_chans)


def model_card(model: nn.Module, meta: Dict[str, Any], repo_id: str) -> str:
    """README.md with Hub metadata: method, paper, architecture, recipe, results and usage.

    A stock timm model (``timm-nlp train --model resnet18``, the baseline of a comparison) gets the same card
    without the pooling rows.
    """
    from .profiler import activation_profile, count_macs
    arch: Optional[ArchSpec] = getattr(model, 'arch', None)
    recipe = meta.get('recipe') or {}
    size = recipe.get('img_size') or model.pretrained_cfg['input_size'][-1]
    input_size = (meta.get('in_chans', 3), size, size)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, input_size)
    peak = activation_profile(model, input_size).peak_bytes
    dataset = recipe.get('dataset', 'unknown')
    top1 = meta.get('top1')
    pool_tags = ['- self-attentive-pooling', f'- {arch.pool.method}'] if arch else []
    front = ['---', 'license: apache-2.0', 'library_name: timm', 'pipeline_tag: image-classification',
             'tags:', '- image-classification', '- timm', '- timm-nlp', *pool_tags,
             'datasets:', f'- {dataset}', 'metrics:', '- accuracy', '---']
    seed_row = [('architecture (seed form)', f'`{arch.seed}`')] if arch else []
    base = arch.base_name if arch else model.pretrained_cfg['architecture']
    rows = [('architecture (timm name)', f'`{meta["architecture"]}`'), *seed_row, ('base model', f'timm `{base}`'),
            ('classes', meta['num_classes']), ('input channels', input_size[0]), ('params', f'{params / 1e6:.2f} M'),
            (f'MACs @{size}x{size}', f'{macs / 1e6:.1f} M'),
            (f'peak activation memory @{size}x{size}, batch 1 (layer-by-layer)', f'{peak / 1024:.1f} KiB')]
    if top1 is not None:
        rows.append((f'top-1 on {dataset}', f'{top1:.2f} %'))
    recipe_lines = [f'- {k}: {v}' for k, v in recipe.items()] or ['- not recorded in the checkpoint']
    if arch:
        prepool = f', pre-pool {arch.prepool} stride {arch.prepool_stride}' if arch.prepool else ''
        intro = (f'An image classifier with **Self-Attentive Pooling** layers ({arch.pool} pooling, stage strides '
                 f'{arch.digits}{prepool}{", dynamic convolutions" if arch.dynamic else ""}), built on timm\'s '
                 f'`{arch.base_name}` by [timm-nlp](https://pypi.org/project/timm-nlp/).')
    else:
        intro = (f'The stock timm `{base}` image classifier (no pooling layers: the baseline of the pooled models), '
                 'trained by [timm-nlp](https://pypi.org/project/timm-nlp/).')
    body = [
        f'# {repo_id.split("/")[-1]}', '', intro, '',
        'Method: F. Chen, G. Datta, S. Kundu, P. A. Beerel, *Self-Attentive Pooling for Efficient Deep Learning*, '
        'WACV 2023 ([arXiv 2209.07659](https://arxiv.org/abs/2209.07659)). The pooling weights every activation '
        'by a non-local, self-attention-derived importance map before down-sampling, so the network can '
        'down-sample early, where activation maps are largest.', '',
        '## Model', '', markdown_table(['', ''], rows),
        '', '## Training recipe', ''] + recipe_lines + [
        '', '## Usage', '', '```python', 'import timm_nlp  # registers the pooled architectures with timm',
        'import timm', '', f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
        'cfg = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**cfg)', '```', '',
        '## Citation', '', '```bibtex', '@inproceedings{chen2023self,',
        '  title={Self-Attentive Pooling for Efficient Deep Learning},',
        '  author={Chen, Fang and Datta, Gourav and Kundu, Souvik and Beerel, Peter A.},',
        '  booktitle={IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},',
        '  year={2023}, doi={10.1109/WACV56688.2023.00396}', '}', '```']
    return '\n'.join(front + [''] + body) + '\n'


def export_for_hub(checkpoint: str, out_dir: str, repo_id: str) -> Path:
    """Write exactly what ``push`` uploads: config.json, model.safetensors (timm's save_for_hf) and README.md."""
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"--repo must be an explicit 'ORG/NAME' repository id, got '{repo_id}'.")
    model, meta = checkpoint_model(checkpoint)
    recipe = meta.get('recipe') or {}
    # the preprocessing the weights were trained with: timm's data config of the pushed model
    data_config = {k: recipe[k] for k in ('mean', 'std', 'interpolation') if recipe.get(k)}
    if recipe.get('img_size'):
        data_config.update(input_size=(meta['in_chans'], recipe['img_size'], recipe['img_size']), crop_pct=1.0)
    model_config = dict(timm_nlp_version=timm_nlp_version())
    if hasattr(model, 'arch'):  # a pooled model; a stock timm model (the baseline) has no seed form
        model_config['arch_seed'] = model.arch.seed
    if meta.get('label_names'):
        model_config['label_names'] = list(meta['label_names'])
    out = Path(out_dir)
    save_for_hf(model, out, model_config=model_config, safe_serialization=True, data_config=data_config or None)
    (out / 'README.md').write_text(model_card(model, meta, repo_id), encoding='utf-8')
    return out


def push(checkpoint: str, repo_id: str, token: Optional[str] = None, private: bool = False,
         commit_message: str = 'Add timm-nlp model') -> str:
    """Upload a trained model to ``repo_id`` (needs a token: ``token`` or ``HF_TOKEN``); returns the commit URL."""
    import tempfile
    from huggingface_hub import HfApi
    token = token or os.environ.get('HF_TOKEN')
    if not token:
        raise ValueError('A real push needs a Hugging Face token: --token or the HF_TOKEN environment variable.')
    with tempfile.TemporaryDirectory() as tmp:
        export_for_hub(checkpoint, tmp, repo_id)  # checks the repo id and the checkpoint before the Hub is touched
        api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message))


def timm_nlp_version() -> str:
    from .version import __version__
    return __version__

