"""CUDA: every pooling method and a pooled model of each backbone family against the same module on the CPU, the
fused attention kernels (no materialised N x N map), bf16 autocast, torch.compile and the trainer.

Skipped without a CUDA device: CI has none. The formulas are the same on both devices and the CPU suite checks them
against the plain formulation (test_layers.py, test_models.py, test_export.py, test_train.py).
"""
import contextlib
import copy
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from reference import PlainNlpPool, randomize_model
from test_layers import LAYERS, _assert_grads_close
import timm_nlp
from timm_nlp.checkpoint import load_training_checkpoint
from timm_nlp.layers import create_pool2d

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason='needs a CUDA device; the CPU suite checks the same formulas (test_layers, test_models, test_train)')
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matrix products and convolutions in full precision (no TF32), so CUDA can be held to CPU tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _fwd_bwd(module: nn.Module, x: torch.Tensor, cot: torch.Tensor):
    """Output, input gradient and parameter gradients of ``(module(x) * cot).sum()``, all on the CPU."""
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = module(xi)
    (y * cot).sum().backward()
    return y.detach().cpu(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in module.named_parameters()
                                             if p.grad is not None}


# training-mode Gaussian pooling draws noise, which differs between devices: it is compared in eval only
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('name,train', [(n, t) for n in LAYERS for t in (False, True)
                                        if not (n == 'gaussian_pool' and t)])
def test_pool_on_cuda_matches_cpu(name, train, layout):
    """Output and every gradient of each method on CUDA, in either memory format, equal the CPU's; attention may
    only run fused kernels."""
    torch.manual_seed(0)
    nonlocal_ = name.split('_')[0] in ('nlp', 'dfmnlp', 'mixp', 'dfmixp')
    cpu = create_pool2d(name, 32, 2, **(dict(patch_size=3) if nonlocal_ else {}))  # tokens of uneven pixel counts
    randomize_model(cpu)
    gpu = copy.deepcopy(cpu).cuda().to(memory_format=layout)
    cpu.train(train), gpu.train(train)
    x, cot = torch.randn(2, 32, 21, 18), torch.randn(2, 32, 11, 9)
    y_ref, gx_ref, gp_ref = _fwd_bwd(cpu, x, cot)
    with sdpa_kernel(FUSED):  # a fall-back to the math kernel (the N x N map) raises instead of passing silently
        y, gx, gp = _fwd_bwd(gpu, x.cuda().to(memory_format=layout), cot.cuda())
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    _assert_grads_close(gp, gp_ref, 5e-4, name)
    if train:  # the BN running statistics moved the same way
        for (n, b), b_ref in zip(gpu.named_buffers(), cpu.buffers()):
            torch.testing.assert_close(b.cpu(), b_ref, atol=1e-5, rtol=1e-5, msg=n)


def test_bf16_attention_is_fused_and_lean():
    """At a ResNet stage-1 size the plain formulation materialises a (B, heads, N, N) map; ours must not: its
    fwd+bwd peak is a fraction of the plain one, and its bf16 result follows the fp32 one."""
    torch.manual_seed(0)
    ours = create_pool2d('nlp_headfix2', 64, 2).cuda().train()
    plain = PlainNlpPool(ours)
    x = torch.randn(8, 64, 56, 56, device='cuda')

    def peak(module, kernels):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        xi = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16), kernels:
            y = module(xi)
            y.float().square().mean().backward()
        torch.cuda.synchronize()
        return y.float().detach(), torch.cuda.max_memory_allocated() - base

    y_ours, mem_ours = peak(ours, sdpa_kernel(FUSED))
    _, mem_plain = peak(plain, contextlib.nullcontext())  # nn.MultiheadAttention with its attention weights
    attn_map = 8 * 2 * (56 * 56) ** 2 * 2  # one bf16 (B, heads, N, N) map
    assert mem_plain > attn_map > mem_ours, (mem_plain, attn_map, mem_ours)
    assert mem_plain > 4 * mem_ours, (mem_plain, mem_ours)
    with torch.no_grad():
        y32 = ours(x)
    assert (y_ours - y32).abs().max() <= 0.05 * y32.abs().max(), 'bf16 autocast drifted from fp32'


MODELS = ['resnet18_nlp_headfix2_1222', 'resnet18_nlp_headfix2_nowin_reduced_2222', 'resnet50b1_dfmixp_2222',
          'mobilenetv2_mixp_4222121', 'mobilenetv2b0_gaussian_pool_2222121', 'dyresnet18_lip_2222',
          'dymobilenetv2_dfmnlp_reduced_2222121', 'prepool_nlp_headfix2_4_resnet18_nlp_headfix2_1222']


@pytest.mark.parametrize('name', MODELS)
def test_model_on_cuda_matches_cpu(name):
    """Eval logits on CUDA (fp32, fused attention) equal the CPU's; train-mode loss and every parameter gradient
    too, in fp64 (in fp32, train-mode gradients of a random-init model differ by ~0.5% between two correct kernels:
    test_models.py::test_channels_last_model_matches_contiguous); then a bf16, channels-last training step on CUDA
    gives a finite loss and a finite gradient for every parameter."""
    torch.manual_seed(0)
    cpu = timm_nlp.create_model(name, num_classes=10)
    randomize_model(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    x, target = torch.randn(4, 3, 64, 64), torch.tensor([3, 7, 0, 9])
    with torch.no_grad(), sdpa_kernel(FUSED):
        ref = cpu.eval()(x)
        torch.testing.assert_close(gpu.eval()(x.cuda()).cpu(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
    losses, grads = [], []
    for model, dev in ((cpu.double(), 'cpu'), (gpu.double(), 'cuda')):
        model.train().zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x.double().to(dev)), target.to(dev))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(losses[1] - losses[0]) <= 1e-10 * abs(losses[0]), losses
    _assert_grads_close(grads[1], grads[0], 1e-7, name)

    gpu = gpu.float().to(memory_format=torch.channels_last).train()
    gpu.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(gpu(x.cuda().to(memory_format=torch.channels_last)), target.cuda())
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in gpu.named_parameters():
        if n in grads[0]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f'{name}: bf16 gradient of {n}'


def test_compiled_pool_on_cuda_matches_eager():
    """torch.compile (inductor, Triton kernels) of a mixed local x non-local pool: output and gradients as eager."""
    torch.manual_seed(0)
    eager = create_pool2d('mixp_headfix2', 64, 2, patch_size=2).cuda().train()
    randomize_model(eager)
    compiled = torch.compile(copy.deepcopy(eager))
    x, cot = torch.randn(4, 64, 28, 28, device='cuda'), torch.randn(4, 64, 14, 14, device='cuda')
    y_ref, gx_ref, gp_ref = _fwd_bwd(eager, x, cot)
    y, gx, gp = _fwd_bwd(compiled, x, cot)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    _assert_grads_close({n.replace('_orig_mod.', ''): g for n, g in gp.items()}, gp_ref, 5e-4, 'compiled')


def test_trainer_learns_digits_on_cuda(tmp_path):
    out = tmp_path / 'run'
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'train', '--model', 'resnet18_nlp_headfix2_2222',
                           '--epochs', '3', '--output', str(out), '--device', 'cuda', '-b', '64', '--lr', '0.1',
                           '--img-size', '16', '--no-progress'], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    # 10 balanced classes: chance is 10%; the CPU run of the same command (test_train.py) passes the same bar
    assert [int(r['epoch']) for r in rows] == [0, 1, 2] and float(rows[-1]['eval_top1']) > 80., rows
    assert load_training_checkpoint(str(out / 'last.safetensors'))['epoch'] == 2
