"""timm's own model test-suite (tests/test_models.py from the sdist of the installed timm) on our models.

The sdist is fetched from PyPI with pip (cached under ~/.cache/timm-nlp) unless TIMM_TESTS_DIR points at a
directory holding test_models.py. The subset covers every backbone and every pooling family, the dynamic-conv
and pre-pool variants, and the paper's examples.
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

import timm_nlp  # noqa: F401  registers the models

SUITE_MODELS = [
    'resnet18_nlp_headfix2_2222', 'resnet18_gaussian_pool_4222', 'resnet50_lip_2222', 'resnet50_mixp_4222',
    'resnet18b1_dfmnlp_4222', 'resnet18b1_maxp_2222', 'resnet50b1_avgp_4222',
    'resnet50b1_nlp_headfix2_nowin_reduced_1222',
    'mobilenetv2_dfmixp_2222121', 'mobilenetv2b0_skip_1222121', 'mobilenetv2b0_nlp_reduced_2222121',
    'dyresnet18_dfmnlp_reduced_1222', 'dymobilenetv2_lip_2222121', 'prepool_lip_8_resnet18_skip_1222',
    'prepool_nlp_headfix2_4_resnet18_nlp_headfix2_1222',
]
HERE = Path(__file__).parent


def _timm_tests_dir() -> Path:
    env = os.environ.get('TIMM_TESTS_DIR')
    if env:
        return Path(env)
    root = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'timm-nlp' / f'timm-{timm.__version__}'
    tests = root / f'timm-{timm.__version__}' / 'tests'
    if not (tests / 'test_models.py').exists():
        root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
             f'timm=={timm.__version__}', '-d', str(root)], capture_output=True, text=True)
        sdists = list(root.glob('timm-*.tar.gz'))
        if proc.returncode or not sdists:
            pytest.skip(f'timm {timm.__version__} sdist unavailable (pip download failed: {proc.stderr[-300:]})')
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(root, filter='data')
    return tests


@pytest.mark.slow
def test_timm_model_suite():
    tests = _timm_tests_dir()
    missing = [m for m in SUITE_MODELS if not timm.is_model(m)]
    assert not missing, f'not registered: {missing}'
    env = dict(os.environ, TIMM_NLP_SUITE_MODELS=','.join(SUITE_MODELS),
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'timm_suite_plugin', '-p', 'no:cacheprovider',
         '-W', 'ignore', 'test_models.py'],
        cwd=tests, env=env, capture_output=True, text=True)
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    passed = re.findall(r'^PASSED test_models\.py::(\w+)\[(?:\d+-)?(.+)\]$', proc.stdout, re.M)
    kinds = {m: {test for test, model in passed if model == m} for m in SUITE_MODELS}
    ran = set().union(*kinds.values())
    # every model passes every kind of timm's tests that ran: forward, backward, cfgs, torchscript, features, fx...
    assert len(ran) >= 10, tail
    assert all(k == ran for k in kinds.values()), {m: sorted(ran - k) for m, k in kinds.items() if k != ran}
