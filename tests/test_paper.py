"""The paper's networks exactly: checkpoints of the paper code's layout convert, load strictly and give its outputs.

In CI the paper's layout comes from the plain reference (paper_reference.py, written from the specification, not
from the paper's code); with PAPER_CODE_DIR set, the same conversion runs on the paper code's own models.
"""
import logging

import pytest
import timm
import torch

import paper_reference as pr
import timm_nlp
from test_paper_reference import (  # noqa: F401  (paper_network is a fixture)
    LAYOUT_CASES, OUTPUT_CASES, assert_close_rel, input_size, paper_network)
from timm_nlp.models import PaperCheckpointError, convert_paper_state_dict

# every backbone, every method (deformable included: the reference samples as timm-nlp does), dy, pre-pools
REFERENCE_CASES = [
    'resnet18-skip-4222', 'resnet18-maxp-2222', 'resnet18-lip-2222', 'resnet18-gaussian_pool-2222',
    'resnet18-nlp-1222', 'resnet18-nlp_headfix2_nowin_reduced-2222', 'resnet18-dfmnlp-2222', 'resnet18-mixp-2222',
    'resnet50-nlp_reduced-1222', 'resnet50-dfmixp_headfix2-4222', 'resnet18_v2-lip-4222', 'resnet18_v2-dfmnlp-2222',
    'resnet50_v2-nlp_headfix2-2222', 'mobilenet_v2-avgp-4222121', 'mobilenet_v2-nlp_headfix2-2222121',
    'mobilenet_v2-dfmnlp_reduced-2222121', 'mobilenet_v2-mixp_reduced-2222121', 'mobilenet-gaussian_pool-2222121',
    'mobilenet-nlp_headfix2_nowin-2222121', 'mobilenet-dfmixp-1222121', 'dyresnet18-nlp_headfix2-2222',
    'dyresnet18-dfmnlp_reduced-1222', 'dyresnet50_v2-lip-2222', 'dymobilenet_v2-mixp-2222121',
    'dymobilenet-dfmnlp_headfix2-1222121', 'prepool-nlp_headfix2-4-resnet18-skip-1222',
    'prepool-nlp_reduced-4-mobilenet_v2-skip-1222121', 'prepool-dfmnlp-2-dyresnet18_v2-maxp-2222',
    'prepool-gaussian_pool-2-mobilenet-lip-2222121', 'prepool-skip-4-resnet18-nlp-1222',
    'prepool-mixp_headfix2_nowin-2-dymobilenet_v2-skip-1222121',
]


def _checkpoint(state_dict):
    """What the paper's ann.py saves: DataParallel's module. prefix, beside the training state."""
    return {'accuracy': 0.5, 'epoch': 3, 'state_dict': {'module.' + k: v for k, v in state_dict.items()},
            'optimizer': {}}


def _compare(paper: torch.nn.Module, arch: str, size: int) -> None:
    """Convert ``paper``'s state, load it strictly into ours, and compare outputs and BN statistics in fp64."""
    paper = paper.double()
    ours = timm_nlp.create_model(arch, num_classes=10).double()
    ours.load_state_dict(convert_paper_state_dict(_checkpoint(paper.state_dict()), arch), strict=True)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    for train in (False, True):
        paper.train(train), ours.train(train)
        with torch.no_grad():
            torch.manual_seed(1)  # the Gaussian pools draw the same noise, one randn per layer in the same order
            expected = paper(x)
            torch.manual_seed(1)
            got = ours(x)
        assert_close_rel(got, expected, 1e-9 if not train else 1e-8, f'{arch} {"train" if train else "eval"}')
    converted = convert_paper_state_dict(paper.state_dict(), arch)
    for key, value in ours.state_dict().items():
        if key.endswith(('running_mean', 'running_var')):
            assert_close_rel(value, converted[key], 1e-8, key)
        elif key.endswith('num_batches_tracked'):
            assert value.item() == converted[key].item() == 1, key


@pytest.mark.slow
@pytest.mark.parametrize('arch', REFERENCE_CASES)
def test_reference_checkpoints_convert_and_match(arch):
    torch.manual_seed(0)
    ref = pr.randomize_reference(pr.build_reference(arch))
    _compare(ref, arch, 32 if arch.startswith('prepool-skip') else 64)


def _nlp_params(C: int, E: int, p: int = 1) -> int:
    """A non-local pool: embed conv k=p with bias and BN, two 256-row position tables of E/2, the attention's in and
    out projections with biases, the restore conv with bias and BN."""
    return C * E * p * p + 3 * E + 256 * E + 4 * E * E + 4 * E + E * C + 3 * C


def _gaussian_params(C: int) -> int:
    h = C // 2
    return C * h + 3 * h + 2 * (h * C + 3 * C)


@pytest.mark.parametrize('arch,expected,table', [
    # the table of the paper code's counts (1000 classes): stock timm base + the closed form of each pool
    ('resnet18-nlp-1222', 11_689_512 + sum(_nlp_params(c, c) for c in (128, 256, 512)), 13.99),
    ('resnet50-nlp_headfix2-2222', 25_557_032 + sum(_nlp_params(c, c) for c in (256, 512, 1024, 2048)), 60.00),
    ('resnet18-nlp_reduced-1222', 11_689_512 + _nlp_params(128, 128, 2) + _nlp_params(256, 256)
     + _nlp_params(512, 512), 14.04),
    ('mobilenet_v2-nlp_headfix2-1222121', 3_504_872 + sum(_nlp_params(c, c) for c in (24, 32, 64, 160)), 3.77),
    ('prepool-nlp_headfix2-4-resnet18-skip-1222', 11_689_512 + _nlp_params(64, 64, 2), 11.74),
    ('resnet18-gaussian_pool-2222', 11_689_512 + sum(_gaussian_params(c) for c in (64, 128, 256, 512)), 12.22),
    # _v2 keeps the 1x1 projection of stage 1 at stride 1 (64 -> 64 conv and BN)
    ('resnet18_v2-gaussian_pool-4222', 11_689_512 + 64 * 64 + 128 + sum(_gaussian_params(c) for c in (64, 128, 256,
                                                                                                       512)), 12.22),
])
def test_parameter_counts_follow_the_closed_form(arch, expected, table):
    model = timm_nlp.create_model(arch, device='meta')
    params = sum(p.numel() for p in model.parameters())
    assert params == expected and round(params / 1e6, 2) == table


def test_converter_errors_name_the_problem(caplog):
    ref = pr.build_reference('resnet18-lip-2222')
    with pytest.raises(PaperCheckpointError, match=r'does not match resnet18-nlp-2222: \d+ unexpected, 0 mismatched, '
                                                   r'\d+ missing tensors: unexpected layer1\.pool\.logit'):
        convert_paper_state_dict(ref.state_dict(), 'resnet18-nlp-2222')
    with pytest.raises(PaperCheckpointError, match=r'0 unexpected, 2 mismatched, 0 missing tensors: layer1\.pool\.'
                                                   r'non_local\.patch_embed\.weight \(64, 64, 1, 1\) vs model '
                                                   r'\(64, 64, 4, 4\)'):
        convert_paper_state_dict(pr.build_reference('resnet18-nlp-2222').state_dict(), 'resnet18-nlp_reduced-2222')
    # the paper code's mixp is its dfmixp network
    paper_mixp = pr.build_reference('resnet18-dfmixp-2222').state_dict()
    with pytest.raises(PaperCheckpointError, match=r"'mixp' builds its dfmixp network .* Convert it as "
                                                   r"'resnet18-dfmixp-2222'"):
        convert_paper_state_dict(paper_mixp, 'resnet18-mixp-2222')
    with caplog.at_level(logging.WARNING):
        sd = convert_paper_state_dict({'state_dict': {'module.' + k: v for k, v in paper_mixp.items()}},
                                      'RESNET18-DFMIXP-2222')
    assert "the paper code's deformable sampler" in caplog.text
    timm.create_model('resnet18_dfmixp_2222', num_classes=10).load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match="Unknown backbone 'resnet34'"):
        convert_paper_state_dict(paper_mixp, 'resnet34-lip-2222')


@pytest.mark.parametrize('arch', OUTPUT_CASES)
def test_paper_code_checkpoints_convert_and_match(arch, paper_network):  # noqa: F811
    """The paper code's own models (PAPER_CODE_DIR): converted weights load strictly and give its outputs."""
    torch.manual_seed(0)
    paper = pr.randomize_reference(paper_network(arch))
    _compare(paper, arch, input_size(arch))


@pytest.mark.parametrize('arch', [a for a in LAYOUT_CASES if 'prepool-skip' not in a])
def test_paper_code_deformable_checkpoints_convert(arch, paper_network):  # noqa: F811
    """The deformable networks (whose sampler differs, docs/fidelity.md) convert and load strictly; the paper's 'mixp'
    as dfmixp."""
    sd = paper_network(arch).state_dict()
    target = arch.replace('-mixp', '-dfmixp').replace('prepool-mixp', 'prepool-dfmixp')
    if target != arch:
        with pytest.raises(PaperCheckpointError, match='Convert it as'):
            convert_paper_state_dict(sd, arch)
    timm_nlp.create_model(target, num_classes=10).load_state_dict(convert_paper_state_dict(sd, target), strict=True)


def test_convert_paper_cli_writes_weights_that_push_reads(tmp_path):
    import subprocess
    import sys
    from timm_nlp.checkpoint import load_weights, read_metadata
    torch.manual_seed(0)
    arch = 'dymobilenet-nlp_headfix2-2222121'
    ref = pr.randomize_reference(pr.build_reference(arch, num_classes=7)).eval()
    pth = tmp_path / 'paper.pth'
    torch.save(dict(_checkpoint(ref.state_dict()), accuracy=0.8125, epoch=41), pth)
    out = tmp_path / 'converted'
    cmd = [sys.executable, '-m', 'timm_nlp.cli', 'convert-paper', str(pth), '--arch', arch, '--out', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = read_metadata(str(out / 'model.safetensors'))
    assert meta['architecture'] == 'dymobilenetv2b0_nlp_headfix2_2222121' and meta['num_classes'] == 7
    assert meta['top1'] == 81.25 and meta['epoch'] == 41
    model = timm.create_model(meta['architecture'], num_classes=7).eval()
    model.load_state_dict(load_weights(str(out / 'model.safetensors')), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close_rel(model(x), ref(x), 1e-5, 'converted')
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(out / 'model.safetensors'), '--repo',
                           'org/name', '--dry-run', '--out', str(tmp_path / 'hub')], capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / 'hub' / 'config.json').is_file(), proc.stderr[-2000:]
    # a pickle that is more than tensors is refused, never unpickled; a wrong architecture is named
    torch.save({'state_dict': {}, 'model': torch.nn.Linear(2, 2)}, tmp_path / 'unsafe.pth')
    proc = subprocess.run(cmd[:4] + [str(tmp_path / 'unsafe.pth')] + cmd[5:], capture_output=True, text=True)
    assert proc.returncode == 2 and 'not loadable with weights_only=True' in proc.stderr
    proc = subprocess.run(cmd[:6] + ['mobilenet_v2-nlp_headfix2-2222121'] + cmd[7:], capture_output=True, text=True)
    assert proc.returncode == 2 and 'does not match mobilenet_v2-nlp_headfix2-2222121' in proc.stderr
