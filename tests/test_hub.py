"""Hugging Face Hub: push --dry-run, then loading offline from a real huggingface_hub cache layout."""
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_nlp

from timm_nlp.checkpoint import CheckpointError, load_weights, save_weights

REPO = Path(__file__).resolve().parent.parent
ARCH = 'resnet18_lip_2222'
RECIPE = dict(dataset='sklearn-digits', epochs=3, batch_size=64, img_size=28, opt='sgd', lr=0.1)


def _place_in_hf_cache(hf_home: Path, repo_id: str, files: dict) -> Path:
    """Lay files out exactly as hf_hub_download does: blobs by sha256, snapshot symlinks, refs/main."""
    repo = hf_home / 'hub' / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / 'snapshots' / commit
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A known state (seeded init, 10 classes) exported by `timm-nlp push --dry-run`."""
    root = tmp_path_factory.mktemp('hub')
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong load would show in the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = root / 'model.safetensors'
    save_weights(str(ckpt), model.state_dict(), dict(architecture=ARCH, num_classes=10, top1=97.5, epoch=2,
                                                     label_names=[str(i) for i in range(10)], recipe=RECIPE))
    out = root / 'export'
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(ckpt), '--repo', 'test-org/digits-lip',
                           '--dry-run', '--out', str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'nothing uploaded' in proc.stdout
    return root, model.eval(), out


def test_export_files_and_config(exported):
    _, model, out = exported
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == ARCH and cfg['num_classes'] == 10
    assert cfg['label_names'] == [str(i) for i in range(10)] and cfg['arch_seed'] == 'resnet18-lip-2222'
    pcfg = cfg['pretrained_cfg']
    assert tuple(pcfg['input_size']) == (3, 28, 28) and pcfg['crop_pct'] == 1.0
    assert tuple(pcfg['mean']) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(pcfg['std']) == timm.data.IMAGENET_DEFAULT_STD
    weights = load_file(str(out / 'model.safetensors'))
    assert weights.keys() == model.state_dict().keys()
    # config.json alone lets timm rebuild the model
    args = dict(cfg.get('model_args', {}))
    args.setdefault('num_classes', cfg['num_classes'])
    rebuilt = timm.create_model(cfg['architecture'], **args)
    rebuilt.load_state_dict(weights)
    local = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(local(x), model(x), rtol=0, atol=0)
        # timm_nlp.create_model passes timm's sources (local-dir:, hf-hub:) to timm instead of parsing them
        torch.testing.assert_close(timm_nlp.create_model(f'local-dir:{out}', pretrained=True).eval()(x), model(x))
    # another in_chans: timm adapts the stem after the checkpoint filter (RGB summed), the rest loads as is
    gray = timm.create_model(f'local-dir:{out}', pretrained=True, in_chans=1).state_dict()
    assert torch.equal(gray['conv1.weight'], weights['conv1.weight'].sum(1, keepdim=True))
    assert all(torch.equal(gray[k], weights[k]) for k in weights if k != 'conv1.weight')


def test_model_card(exported):
    _, model, out = exported
    text = (out / 'README.md').read_text()
    params = sum(p.numel() for p in model.parameters())
    front = text.split('---')[1]
    for line in ('license: apache-2.0', 'library_name: timm', '- image-classification', '- timm-nlp',
                 'datasets:\n- sklearn-digits', 'metrics:\n- accuracy'):
        assert line in front, line
    for fragment in ('Self-Attentive Pooling', 'arXiv 2209.07659', f'`{ARCH}`', '`resnet18-lip-2222`',
                     'timm `resnet18`', '| top-1 on sklearn-digits | 97.50 % |', f'| params | {params / 1e6:.2f} M |',
                     'MACs @28x28', 'peak activation memory @28x28', '- lr: 0.1', '- img_size: 28'):
        assert fragment in text, fragment
    usage = text.split('```python\n')[1]
    assert usage.startswith('import timm_nlp') and "timm.create_model('hf-hub:test-org/digits-lip'" in usage


_LOAD = '''
import json, os, sys, torch, timm, timm_nlp
from safetensors.torch import load_file
ref = load_file(sys.argv[1])
x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
ref_model = timm.create_model({arch!r}, num_classes=10).eval()
ref_model.load_state_dict(ref)
for name in sys.argv[2:]:
    model = timm.create_model(name, pretrained=True).eval()
    sd = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), name
    with torch.no_grad():
        assert torch.equal(model(x), ref_model(x)), name
    print('loaded', name, model.pretrained_cfg.get('hf_hub_id'), tuple(model.pretrained_cfg['input_size']))
    # another class count: the head is reset as timm does, every other tensor loads
    model = timm.create_model(name, pretrained=True, num_classes=5)
    sd = model.state_dict()
    assert sd['fc.weight'].shape == (5, 512)
    assert all(torch.equal(sd[k], ref[k]) for k in ref if not k.startswith('fc.')), name
    print('head reset', name)
'''


def _offline(hf_home: Path, code: str, *args, manifest: Path = None):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE='1')
    env.pop('HF_HUB_CACHE', None)
    if manifest is not None:
        env['TIMM_NLP_MANIFEST'] = str(manifest)
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_round_trip_through_offline_hub_cache(exported, tmp_path):
    _, _, out = exported
    hf_home = tmp_path / 'hf'
    _place_in_hf_cache(hf_home, 'test-org/digits-lip', {p.name: p for p in out.iterdir()})
    manifest = tmp_path / 'manifest.json'
    manifest.write_text(json.dumps([dict(model=ARCH, tag='digits_e3', hf_hub_id='test-org/digits-lip',
                                         num_classes=10, input_size=[3, 28, 28], crop_pct=1.0)]))
    proc = _offline(hf_home, _LOAD.format(arch=ARCH), out / 'model.safetensors', f'{ARCH}.digits_e3',
                    'hf-hub:test-org/digits-lip', manifest=manifest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('loaded') == 2 and 'test-org/digits-lip (3, 28, 28)' in proc.stdout
    assert proc.stdout.count('head reset') == 2


@pytest.mark.slow
def test_error_paths(exported, tmp_path):
    _, _, out = exported
    hf_home = tmp_path / 'hf'
    snapshot = _place_in_hf_cache(hf_home, 'test-org/digits-lip', {'config.json': out / 'config.json'})
    manifest = tmp_path / 'manifest.json'
    manifest.write_text(json.dumps([
        dict(model=ARCH, tag='digits_e3', hf_hub_id='test-org/digits-lip', num_classes=10),
        dict(model='mobilenetv2_lip_2222121', tag='wrong', hf_hub_id='test-org/digits-lip', num_classes=10),
    ]))
    code = 'import sys, timm, timm_nlp\ntimm.create_model(sys.argv[1], pretrained=True)\n'
    # the weights file is missing from the cache
    proc = _offline(hf_home, code, f'{ARCH}.digits_e3', manifest=manifest)
    assert proc.returncode and re.search(r'LocalEntryNotFound|not found|Cannot find', proc.stderr), proc.stderr[-1500:]
    (snapshot / 'model.safetensors').symlink_to(out / 'model.safetensors')
    # an unknown tag (timm's own check)
    proc = _offline(hf_home, code, f'{ARCH}.nope', manifest=manifest)
    assert proc.returncode and f'Invalid pretrained tag (nope) for {ARCH}' in proc.stderr
    # a name without weights: the message lists what exists and how to start from stock weights
    proc = _offline(hf_home, code, 'resnet50_nlp_2222', manifest=manifest)
    assert proc.returncode and "No published weights for 'resnet50_nlp_2222'" in proc.stderr
    assert f'{ARCH}.digits_e3 (test-org/digits-lip)' in proc.stderr and "stock_weights='resnet50.<tag>'" in proc.stderr
    # weights of another architecture
    proc = _offline(hf_home, code, 'mobilenetv2_lip_2222121.wrong', manifest=manifest)
    assert proc.returncode and 'Checkpoint does not match mobilenet_v2-lip-2222121' in proc.stderr
    assert re.search(r'conv_stem.weight checkpoint|unexpected (conv1|layer)', proc.stderr), proc.stderr[-1500:]


_LOAD_GREY = '''
import sys, torch, timm, timm_nlp
from safetensors.torch import load_file
ref = load_file(sys.argv[1])
model = timm.create_model('hf-hub:test-org/grey', pretrained=True).eval()
sd = model.state_dict()
assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
own = timm.create_model(sys.argv[2], num_classes=10, in_chans=1).eval()
own.load_state_dict(ref)
x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    assert torch.equal(model(x), own(x))
cfg = timm.data.resolve_data_config({}, model=model)
print('conv1', tuple(model.conv1.weight.shape), 'input', cfg['input_size'], 'mean', len(cfg['mean']), cfg['mean'][0])
'''


@pytest.mark.slow
def test_a_grey_model_trains_pushes_and_loads_back(tmp_path):
    """--in-chans 1 end to end: trained, pushed (weights, config, card) and loaded with timm.create_model(...,
    pretrained=True) from the Hub's cache layout, it is the trained one-channel model with its grey preprocessing."""
    from timm_nlp.checkpoint import read_metadata
    run, out = tmp_path / 'run', tmp_path / 'export'
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'train', '--model', ARCH, '--in-chans', '1',
                           '--epochs', '1', '--img-size', '16', '-b', '64', '--no-progress', '--output', str(run)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(run / 'model.safetensors'), '--repo',
                           'test-org/grey', '--dry-run', '--out', str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mean = read_metadata(str(run / 'model.safetensors'))['recipe']['mean']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['model_args']['in_chans'] == 1 and cfg['pretrained_cfg']['input_size'] == [1, 16, 16]
    assert cfg['pretrained_cfg']['mean'] == mean and len(mean) == 1
    card = (out / 'README.md').read_text()
    assert '| input channels | 1 |' in card and '| MACs @16x16 |' in card
    hf_home = tmp_path / 'hf'
    _place_in_hf_cache(hf_home, 'test-org/grey', {p.name: p for p in out.iterdir()})
    proc = _offline(hf_home, _LOAD_GREY, run / 'model.safetensors', ARCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'conv1 (64, 1, 7, 7) input (1, 16, 16) mean 1 {mean[0]}' in proc.stdout


def test_push_refuses_a_checkpoint_that_lacks_tensors(exported, tmp_path):
    """A checkpoint that does not hold every tensor of its model is refused, in one line naming the tensors."""
    root, _, _ = exported
    weights = load_file(str(root / 'model.safetensors'))
    save_weights(str(tmp_path / 'lacking.safetensors'), {k: v for k, v in weights.items() if not k.startswith('fc.')},
                 dict(architecture=ARCH, num_classes=10))
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(tmp_path / 'lacking.safetensors'),
                           '--repo', 'org/x', '--dry-run', '--out', str(tmp_path / 'out')], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"timm-nlp push: error: '{tmp_path / 'lacking.safetensors'}' does not match {ARCH}: missing "
                    'key(s) in state_dict: fc.weight, fc.bias.')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name', ['model.safetensors', 'last.pth.tar'])
def test_push_of_a_missing_checkpoint_is_one_line(tmp_path, name):
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(tmp_path / name), '--repo', 'org/x',
                           '--dry-run', '--out', str(tmp_path / 'out')], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line == f"timm-nlp push: error: Checkpoint '{tmp_path / name}' does not exist."


def test_push_of_a_stock_timm_model(tmp_path):
    """`timm-nlp train --model resnet18` (the baseline) writes a stock timm model: it pushes without pooling rows."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=3).eval()
    ckpt = tmp_path / 'model.safetensors'
    save_weights(str(ckpt), model.state_dict(), dict(architecture='resnet18', num_classes=3, top1=50.0,
                                                     label_names=['a', 'b', 'c'], recipe=dict(img_size=16)))
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(ckpt), '--repo', 'org/stock',
                           '--dry-run', '--out', str(tmp_path / 'out')], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet18' and 'arch_seed' not in cfg and cfg['label_names'] == ['a', 'b', 'c']
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'The stock timm `resnet18` image classifier' in card and '| base model | timm `resnet18` |' in card
    assert 'seed form' not in card and 'self-attentive-pooling' not in card.split('---')[1]
    local = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(local(x), model(x))


def test_push_checks_before_touching_the_hub(exported, tmp_path):
    root, _, _ = exported
    bad = tmp_path / 'corrupt.safetensors'
    bad.write_bytes(b'not a safetensors file')
    with pytest.raises(CheckpointError, match='is not a readable safetensors file'):
        load_weights(str(bad))
    # offline, any Hub call fails: the corrupt checkpoint must be reported before the repository is created
    code = ('import sys\nfrom timm_nlp.hub import push\ntry:\n    push(sys.argv[1], "org/new-model", token="t")\n'
            'except Exception as e:\n    print(type(e).__name__, e)\n')
    proc = _offline(tmp_path / 'hf', code, bad)
    assert proc.stdout.startswith('CheckpointError') and 'not a readable safetensors file' in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'push', str(root / 'model.safetensors'), '--repo',
                           'noslash', '--dry-run', '--out', str(tmp_path / 'out')], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "explicit 'ORG/NAME' repository id, got 'noslash'" in proc.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, (f'touch {_Payload.marker}',))


def test_pickle_is_never_executed(tmp_path):
    _Payload.marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {'w': _Payload()}}, f)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*weights_only=True"):
        load_weights(str(path))
    assert not _Payload.marker.exists()
    # a plain tensor pickle is fine with weights_only=True
    torch.save({'state_dict': {'module.w': torch.ones(2)}}, tmp_path / 'ok.pth')
    assert torch.equal(load_weights(str(tmp_path / 'ok.pth'))['w'], torch.ones(2))


def test_stock_weight_start_from_the_hub(tmp_path):
    hf_home = tmp_path / 'hf'
    torch.manual_seed(1)
    stock = timm.create_model('resnet18')
    timm.models.save_for_hf(stock, tmp_path / 'stock', safe_serialization=True)
    _place_in_hf_cache(hf_home, 'timm/resnet18.a1_in1k', {p.name: p for p in (tmp_path / 'stock').iterdir()})
    code = '''
import sys, torch, timm, timm_nlp
from safetensors.torch import load_file
stock = load_file(sys.argv[1])
model = timm.create_model('resnet18_nlp_headfix2_2222', stock_weights='resnet18.a1_in1k', num_classes=10)
sd = model.state_dict()
same = [k for k in stock if k in sd and torch.equal(sd[k], stock[k])]
print('same', len(same), 'of', len(stock))
print('fc kept', sd['fc.weight'].shape[0])
'''
    proc = _offline(hf_home, code, tmp_path / 'stock' / 'model.safetensors')
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_stock = len(stock.state_dict())
    assert f'same {n_stock - 2} of {n_stock}' in proc.stdout and 'fc kept 10' in proc.stdout  # all but fc.*
    assert 'new module: layer1.pool' in proc.stderr and 'new module: layer4.pool' in proc.stderr
    code = "import timm, timm_nlp\ntimm.create_model('resnet18_nlp_2222', stock_weights='resnet50.a1_in1k')"
    proc = _offline(hf_home, code)
    assert proc.returncode and 'are weights of resnet50, but resnet18-nlp-2222 is built from resnet18' in proc.stderr


def test_register_pretrained_at_runtime():
    """In a subprocess: a registered tag becomes the model's default pretrained cfg, as in timm."""
    code = '''
import pytest, timm, timm_nlp
with pytest.raises(ValueError, match="unknown model 'vit_base'"):
    timm_nlp.models.register_pretrained(dict(model='vit_base', tag='x', hf_hub_id='a/b'))
timm_nlp.models.register_pretrained(dict(model='resnet18_maxp_4222', tag='demo', hf_hub_id='org/demo', num_classes=7))
assert 'resnet18_maxp_4222.demo' in timm.list_pretrained('resnet18_maxp_4222*')
cfg = timm.models.get_pretrained_cfg('resnet18_maxp_4222.demo')
assert cfg.hf_hub_id == 'org/demo' and cfg.num_classes == 7 and cfg.pool_size == (1, 1)  # 224 -> 56, 14, 7, 3, 1
# a tag with its own input size gets the pool size of that input (384 -> 3, 256 -> 2)
timm_nlp.models.register_pretrained(
    dict(model='resnet18_maxp_4222', tag='big', hf_hub_id='org/big', input_size=[3, 384, 256]))
cfg = timm.models.get_pretrained_cfg('resnet18_maxp_4222.big')
assert cfg.input_size == (3, 384, 256) and cfg.pool_size == (3, 2), cfg.pool_size
print('ok')
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == 'ok', proc.stderr[-2000:]
