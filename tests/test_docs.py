"""Every Python and shell example of README.md and docs/ runs; every `timm-nlp` command they show parses.

A fenced ```python or ```bash block runs in a temporary folder (one per page, the page's blocks in order, so a block
can use what an earlier one wrote), offline (HF_HUB_OFFLINE=1, a temporary HF_HOME). The line before a block may
mark it: ``<!-- example: skip (REASON) -->`` for what cannot run here (a GPU, the Hub, data or files that are not
here), listed as skipped with the reason; ``<!-- example: needs PATH -->`` runs it only where PATH exists.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
MARK = re.compile(r'<!-- example: (skip \((?P<reason>.+)\)|needs (?P<path>\S+)) -->')


def _blocks():
    """(page, line, language, code, skip reason or None) of every python/bash block."""
    found = []
    for page in PAGES:
        lines = page.read_text().split('\n')
        i = 0
        while i < len(lines):
            m = re.match(r'^```(python|bash)\s*$', lines[i])
            if m:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith('```'))
                mark = MARK.match(lines[i - 1]) if i else None
                reason = None
                if mark and mark.group('reason'):
                    reason = mark.group('reason')
                elif mark and not os.path.exists(mark.group('path')):
                    reason = f"needs {mark.group('path')}, which is not here"
                found.append((page, i + 1, m.group(1), '\n'.join(lines[i + 1:end]), reason))
                i = end
            i += 1
    return found


BLOCKS = _blocks()


def _pages_blocks():
    return [pytest.param(page, [b for b in BLOCKS if b[0] == page], id=str(page.relative_to(REPO)))
            for page in PAGES if any(b[0] == page for b in BLOCKS)]


@pytest.mark.slow
@pytest.mark.parametrize('page, blocks', _pages_blocks())
def test_examples_run(page, blocks, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), PYTHONPATH=str(REPO),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    skipped = []
    for _, line, lang, code, reason in blocks:
        if reason:
            skipped.append(f'{page.name}:{line} ({reason})')
            continue
        if lang == 'python':
            cmd = [sys.executable, '-c', code]
        else:
            cmd = ['bash', '-euo', 'pipefail', '-c', code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f'{page.name}:{line} failed:\n{code}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}'
        # a print whose line says what it prints ("print(x)  # [4, 8]") prints that
        prints = [c.strip() for c in code.split('\n') if c.strip().startswith('print(')]
        if lang == 'python' and prints and all('  # ' in c for c in prints):
            out = [o for o in proc.stdout.split('\n') if o.strip()]
            said = [c.split('  # ', 1)[1] for c in prints]
            assert len(out) == len(said) and all(s.startswith(o) for o, s in zip(out, said)), (page.name, line, out)
    if skipped and len(skipped) == len(blocks):
        pytest.skip('; '.join(skipped))
    if skipped:
        print('skipped: ' + '; '.join(skipped))


def test_every_block_either_runs_or_says_why():
    reasons = [b[4] for b in BLOCKS if b[4]]
    assert len(BLOCKS) > len(reasons) > 0
    words = ('GPU', 'Hub', 'needs', 'checkpoint', 'STL-10', 'train.py', 'validate.py', 'test suite', 'set')
    assert all(any(w in r for w in words) for r in reasons), reasons


def _commands():
    """Every `timm-nlp ...` command line of the docs' code blocks (continuations joined, comments dropped)."""
    cmds = []
    for page in PAGES:
        text = page.read_text().replace('\\\n', ' ')
        for block in re.findall(r'```(?:bash|text)\n(.*?)```', text, re.S):
            for line in block.split('\n'):
                line = line.split(' #')[0].split(' > ')[0].strip()
                if line.startswith('timm-nlp '):
                    cmds.append((page.name, line))
    return cmds


def test_every_documented_command_parses():
    from timm_nlp.cli import build_parser
    cmds = _commands()
    assert len(cmds) >= 10 and {c.split()[1] for _, c in cmds} >= {'train', 'compare', 'profile', 'push'}
    for page, cmd in cmds:
        argv = shlex.split(cmd.replace('$MODELS', 'resnet18'))[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f'{page}: `{cmd}` does not parse') from e


# validate.py's option names (argparse dests), from timm's repository (1.0.29.dev0, as test_train.TRAIN_PY_ARGS)
VALIDATE_PY_ARGS = set('''
data data_dir dataset split dataset_download class_map input_key input_img_mode target_key dataset_trust_remote_code
model pretrained workers batch_size img_size in_chans input_size use_train_size crop_pct crop_mode crop_border_pixels
mean std interpolation num_classes gp log_freq checkpoint num_gpu test_pool no_prefetcher pin_mem channels_last
device amp amp_dtype model_dtype fuser fast_norm reparam model_kwargs torchcompile_mode torchscript torchcompile
aot_autograd results_file results_format real_labels valid_labels retry use_ema tf_preprocessing naflex_loader
naflex_max_seq_len metrics_avg seed
'''.split())
SHORT = {'-b': 'batch_size', '-j': 'workers', '-c': 'config', '-m': 'model'}


def _timm_script_commands():
    """Every command of the docs' code blocks that runs timm's train.py or validate.py: (page, script, arguments)."""
    found = []
    for page in PAGES:
        text = page.read_text().replace('\\\n', ' ')
        for block in re.findall(r'```bash\n(.*?)```', text, re.S):
            for line in block.split('\n'):
                words = shlex.split(line.split(' #')[0]) if line.strip() and not line.startswith('#') else []
                script = next((w for w in words if w.endswith(('train.py', 'validate.py'))), None)
                if script:
                    found.append((page.name, os.path.basename(script), words[words.index(script) + 1:]))
    return found


def test_timm_script_commands_name_their_options_and_the_cpu():
    """timm's train.py and validate.py default to --device cuda: every documented command runs on a CPU as written,
    with options those scripts have."""
    from test_train import TRAIN_PY_ARGS
    commands = _timm_script_commands()
    assert {s for _, s, _ in commands} == {'train.py', 'validate.py'} and len(commands) >= 5
    for page, script, words in commands:
        known = (TRAIN_PY_ARGS | {'device_modules'}) if script == 'train.py' else VALIDATE_PY_ARGS
        names = {SHORT.get(w, w.lstrip('-').replace('-', '_')) for w in words if w.startswith('-')}
        assert not names - known, (page, script, sorted(names - known))
        assert '--device' in words and words[words.index('--device') + 1] == 'cpu', (page, script, words)


def test_the_readme_shows_the_main_job_of_this_version():
    """README's copy of `timm-nlp compare`'s output: the default models, the defaults' title and columns, and every
    column that training does not decide (params, MACs, memory) as the command computes it now."""
    from timm_nlp.compare import COLUMNS, COMPARE_DEFAULTS, COMPARE_MODELS, ModelResult
    from timm_nlp.models import create_model
    text = (REPO / 'README.md').read_text()
    block = next(b for b in re.findall(r'```text\n(.*?)```', text, re.S) if '| model | best-epoch' in b)
    d = COMPARE_DEFAULTS
    assert block.startswith(f"{len(COMPARE_MODELS)} models, {d['epochs']} epochs, seed 0, {d['img_size']}x"
                            f"{d['img_size']} grey input, test top-1; memory of batch 1\n")
    lines = [line for line in block.splitlines() if line.startswith('| ')]
    assert [c.strip() for c in lines[0].split('|')[1:-1]] == ['model'] + [c.header for c in COLUMNS]
    rows = [[c.strip() for c in line.split('|')[1:-1]] for line in lines[1:]]
    assert [r[0] for r in rows] == list(COMPARE_MODELS)
    size = (d['in_chans'], d['img_size'], d['img_size'])
    for row in rows:
        model = create_model(row[0], num_classes=10, in_chans=d['in_chans'], device='meta')
        result = ModelResult(row[0], [dict(params=sum(p.numel() for p in model.parameters()))], model, size)
        for column, cell in zip(COLUMNS, row[1:]):
            if column.header in ('params (M)', 'MMACs') or 'KiB' in column.header:
                assert column.value(result) == cell, (row[0], column.header)


def test_every_subcommand_has_help(run_cli):
    from timm_nlp.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == 'command')
    assert set(sub.choices) >= {'train', 'compare', 'profile', 'push', 'convert-paper', 'stl10'}
    for name in sub.choices:
        proc = run_cli(name, '--help')
        assert proc.returncode == 0 and proc.stdout.startswith(f'usage: timm-nlp {name}'), (name, proc.stderr)
