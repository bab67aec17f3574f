"""Training: the digits default, interrupt/resume, torchrun, train_scripts YAMLs, STL-10 conversion, errors."""
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from timm_nlp.checkpoint import load_training_checkpoint
from timm_nlp.tools.stl10 import convert_stl10

REPO = Path(__file__).resolve().parent.parent
FAST = ['-b', '64', '--lr', '0.02', '--img-size', '16', '--no-progress']


def _cli(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def _summary(out: Path):
    with open(out / 'summary.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_digits_training_learns(tmp_path):
    out = tmp_path / 'run'
    _cli('train', '--model', 'resnet18_nlp_headfix2_2222', '--epochs', '3', '--output', out, *FAST)
    rows = _summary(out)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    # 10 balanced classes: chance is 10%; an untrained or broken model cannot reach 80%
    assert float(rows[-1]['eval_top1']) > 80.
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    ckpt = load_training_checkpoint(str(out / 'last.pth.tar'))
    assert ckpt['epoch'] == 2 and ckpt['arch'] == 'resnet18_nlp_headfix2_2222' and 'optimizer' in ckpt
    # the exported weights load into the model with timm's own checkpoint loader
    model = timm.create_model('resnet18_nlp_headfix2_2222', num_classes=10)
    timm.models.load_checkpoint(model, str(out / 'model.safetensors'))
    best = load_training_checkpoint(str(out / 'model_best.pth.tar'))
    for k, v in model.state_dict().items():
        assert torch.equal(v, best['state_dict'][k])


def _columns(stdout: str) -> dict:
    """compare's table: {model: {column header: cell}}."""
    lines = [r for r in stdout.splitlines() if r.startswith('| ')]
    header = [c.strip() for c in lines[0].split('|')[1:-1]]
    return {cells[0]: dict(zip(header, cells)) for cells in ([c.strip() for c in r.split('|')[1:-1]]
                                                             for r in lines[1:])}


@pytest.mark.slow
def test_compare_shows_what_early_down_sampling_costs(tmp_path):
    """The main job's table: memory columns that differ between the models, as counted by hand; the table and the
    plot saved next to each other."""
    proc = _cli('compare', '--models', 'mobilenetv2_skip_1222121', 'mobilenetv2_skip_4222121', '--epochs', '1',
                '--output', tmp_path / 'cmp', '--no-progress')
    table = _columns(proc.stdout)
    assert set(table) == {'mobilenetv2_skip_1222121', 'mobilenetv2_skip_4222121'}
    stock, strided = table['mobilenetv2_skip_1222121'], table['mobilenetv2_skip_4222121']
    # int8, mcunet, 32 x 32 grey (the defaults): the stock network peaks at the first strided block's depthwise conv,
    # its 96 x 16 x 16 input and 96 x 8 x 8 output; stride 4 in stage 1 moves the peak to the stem conv, its
    # 1 x 32 x 32 input and 32 x 16 x 16 output
    assert float(stock['peak int8 (KiB)']) == (96 * 16 * 16 + 96 * 8 * 8) / 1024
    assert float(strided['peak int8 (KiB)']) == (32 * 32 + 32 * 16 * 16) / 1024
    for column in ('peak fp32 (KiB)', 'int8, 4x4 patches (KiB)', 'MMACs'):
        assert float(strided[column]) < float(stock[column]), column
    assert stock['params (M)'] == strided['params (M)']
    assert '2 models, 1 epochs, seed 0, 32x32 grey input' in proc.stdout
    assert (tmp_path / 'cmp' / 'results.md').read_text().strip() in proc.stdout
    assert (tmp_path / 'cmp' / 'accuracy_vs_memory.png').read_bytes().startswith(b'\x89PNG')
    assert all((tmp_path / 'cmp' / name / 'model.safetensors').is_file() for name in table)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f'training exited before {path.name}: {proc.stderr.read()[-2000:]}')
        if time.time() - start > timeout:
            raise AssertionError(f'{path} not written in {timeout}s')
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize('workers', ['0', '1'])
def test_interrupt_and_resume(tmp_path, workers):
    """Kill after the first epoch's checkpoint, rerun: it resumes at epoch 1 and ends after the same 2 epochs.

    Tolerance: epochs are seeded (seed + epoch) and the optimizer, scheduler and BN state are restored, so the
    resumed run must match an uninterrupted one to 1e-6 in every logged metric. Its first epoch ran in the
    killed process, a second run with the same seed, so that equality also shows the runs are reproducible.
    With loader workers, each epoch's workers are seeded from that epoch's seed (as they are in a resumed run).
    """
    args = ['train', '--model', 'resnet18_lip_2222', '--epochs', '2', '-j', workers, *FAST]
    ref = _summary(_run_to(tmp_path / 'ref', args))
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, '-m', 'timm_nlp.cli', *args, '--output', str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / 'checkpoint-0.pth.tar', proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / 'checkpoint-1.pth.tar').exists(), 'the run finished before it was killed'
    done = [int(r['epoch']) for r in _summary(out)]
    rerun = _cli(*args, '--output', out)
    assert done == [0] and re.search(r'Resumed from .*last.pth.tar. at epoch 1 of 2', rerun.stderr)
    resumed = _summary(out)
    assert [int(r['epoch']) for r in resumed] == [0, 1]
    for r, r_ref in zip(resumed, ref):
        for key in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5'):
            assert abs(float(r[key]) - float(r_ref[key])) <= 1e-6 * max(1., abs(float(r_ref[key]))), key


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_epochs(tmp_path):
    """An interrupt (SIGINT, Ctrl-C) after the first epoch: the run stops, one line saying how to resume, the last
    finished epoch's checkpoint kept (a run long enough that the interrupt always lands before its end)."""
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, '-m', 'timm_nlp.cli', 'train', '--model', 'resnet18_lip_2222', '--epochs',
                             '40', *FAST, '--output', str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out / 'checkpoint-0.pth.tar', proc)
    # one Ctrl-C, as the first checkpoint is written: an interrupt landing in a finaliser there is not lost
    proc.send_signal(signal.SIGINT)
    try:
        stderr = proc.communicate(timeout=180)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError('training went on after Ctrl-C') from None
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == ('timm-nlp train: interrupted: rerun the same command to resume from '
                                               'the last finished epoch.')
    finished = len((out / 'summary.csv').read_text().strip().splitlines()) - 1
    assert 1 <= finished < 40
    # the last epoch logged, or the one before it if the interrupt landed while that epoch's checkpoint was saved
    assert load_training_checkpoint(str(out / 'last.pth.tar'))['epoch'] in {finished - 1, max(0, finished - 2)}


def _run_to(out: Path, args):
    _cli(*args, '--output', out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
         '-m', 'timm_nlp.cli', 'train', '--model', 'resnet18_nlp_headfix2_2222', '--epochs', '1',
         '--output', str(tmp_path / 'ddp'), *FAST],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = dict(re.findall(r'rank (\d) final weights sha256 ([0-9a-f]{64})', proc.stderr))
    assert set(digests) == {'0', '1'} and digests['0'] == digests['1']
    assert len(_summary(tmp_path / 'ddp')) == 1


@pytest.mark.slow
def test_torchrun_compare_trains_every_model(tmp_path):
    """Each train() call of compare reuses the process group (a second init of torchrun's group fails)."""
    data = _image_folder(tmp_path / 'data', per_class=4, size=16)
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
         '-m', 'timm_nlp.cli', 'compare', '--models', 'resnet18_skip_1222', 'resnet18_lip_2222', '--data-dir',
         str(data), '--val-split', 'val', '--epochs', '1', '-b', '2', '--img-size', '16', '--no-progress',
         '--output', str(tmp_path / 'cmp')],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r[0] for r in _table(proc.stdout)] == ['resnet18_skip_1222', 'resnet18_lip_2222']
    digests = re.findall(r'rank (\d) final weights sha256 ([0-9a-f]{64})', proc.stderr)
    assert len(digests) == 4 and digests[0][1] == digests[1][1] and digests[2][1] == digests[3][1]


# The option names timm's train.py accepts (its argparse dests), from train.py of timm's repository at the
# newest commit available here (1.0.29.dev0; the installed timm is 1.0.31, whose sdist ships no train.py).
TRAIN_PY_ARGS = set('''
config data_dir dataset train_split val_split train_num_samples val_num_samples dataset_download class_map
input_img_mode input_key target_key dataset_trust_remote_code model pretrained pretrained_path initial_checkpoint
resume no_resume_opt num_classes gp img_size in_chans input_size crop_pct mean std interpolation batch_size
validation_batch_size channels_last fuser grad_accum_steps grad_checkpointing fast_norm model_kwargs
head_init_scale head_init_bias torchcompile_mode torchscript torchcompile device amp amp_dtype model_dtype
no_ddp_bb synchronize_step device_modules opt opt_eps opt_betas momentum weight_decay clip_grad clip_mode
layer_decay layer_decay_min_scale layer_decay_no_opt_scale opt_kwargs sched sched_on_updates lr lr_base
lr_base_size lr_base_scale lr_noise lr_noise_pct lr_noise_std lr_cycle_mul lr_cycle_decay lr_cycle_limit
lr_k_decay warmup_lr min_lr epochs epoch_repeats start_epoch decay_milestones decay_epochs warmup_epochs
warmup_prefix cooldown_epochs patience_epochs decay_rate no_aug train_crop_mode scale ratio hflip vflip
color_jitter color_jitter_prob grayscale_prob gaussian_blur_prob aa aug_repeats aug_splits jsd_loss bce_loss
bce_sum bce_target_thresh bce_pos_weight reprob remode recount resplit mixup cutmix cutmix_minmax mixup_prob
mixup_switch_prob mixup_mode mixup_off_epoch smoothing train_interpolation drop drop_connect drop_path
drop_block bn_momentum bn_eps sync_bn dist_bn split_bn model_ema model_ema_force_cpu model_ema_decay
model_ema_warmup seed worker_seeding log_interval val_interval recovery_interval checkpoint_hist workers
save_images pin_mem no_prefetcher output experiment eval_metric tta use_multi_epochs_loader log_wandb
'''.split())
YAMLS = sorted((REPO / 'train_scripts').glob('*.yaml'))


def test_train_scripts_cover_the_recipes():
    assert {p.stem for p in YAMLS} == {f'{d}_{b}' for d in ('stl10', 'cifar100', 'imagenet')
                                       for b in ('resnet18', 'mobilenetv2')}


@pytest.mark.parametrize('path', YAMLS, ids=lambda p: p.name)
def test_train_script_yaml(path):
    cfg = yaml.safe_load(path.read_text())
    unknown = set(cfg) - TRAIN_PY_ARGS
    assert not unknown, f'{path.name}: train.py has no option {sorted(unknown)}'
    model = timm.create_model(cfg['model'], num_classes=cfg['num_classes'], device='meta')
    assert model.num_classes == cfg['num_classes']
    if path.stem.startswith('stl10'):  # the paper's recipe: batch 8, 128 px, SGD 1e-2, 300 epochs, /5 at 60/80/90%
        assert (cfg['batch_size'], cfg['img_size'], cfg['opt'], cfg['momentum'], cfg['lr'], cfg['epochs'],
                cfg['seed']) == (8, 128, 'sgd', 0.9, 0.01, 300, 0)
        assert cfg['decay_milestones'] == [180, 240, 270] and cfg['decay_rate'] == 0.2
        # no weight decay, label smoothing, colour jitter, dropout or warm-up; mean = std = 0.5; the test images
        # resized and center-cropped whole (crop_pct 1), bilinear
        assert (cfg['weight_decay'], cfg['smoothing'], cfg['color_jitter'], cfg['drop'], cfg['warmup_epochs']) == \
            (0, 0, 0, 0, 0)
        assert cfg['mean'] == cfg['std'] == [0.5] * 3 and cfg['crop_pct'] == 1.0
        assert cfg['interpolation'] == cfg['train_interpolation'] == 'bilinear'


def test_train_py_configs_are_generated_from_the_paper_recipe(tmp_path):
    """The recipe is written once (timm_nlp.tools.recipes.PAPER_RECIPE): the shipped configs are its output."""
    from timm_nlp.tools.recipes import PAPER_RECIPE, write_train_py_configs
    written = [Path(p) for p in write_train_py_configs(str(tmp_path))]
    assert {p.name for p in written} == {p.name for p in YAMLS if not p.stem.startswith('imagenet')}
    for path in written:
        assert path.read_text() == (REPO / 'train_scripts' / path.name).read_text(), path.name
        cfg = yaml.safe_load(path.read_text())
        assert all(cfg[k] == v for k, v in PAPER_RECIPE.items() if k not in ('mean', 'std')), path.name


def test_paper_grid_models_exist():
    script = (REPO / 'train_scripts' / 'paper_grid.sh').read_text()
    pools = re.search(r'for pool in ([a-z_0-9 ]+);', script).group(1).split()
    for backbone, patterns in (('resnet18', ('2222', '4222')), ('mobilenetv2', ('2222121', '4222121'))):
        for pattern in patterns:
            for pool in pools:
                assert timm.is_model(f'{backbone}_{pool}_{pattern}')


def _image_folder(root: Path, classes=3, per_class=6, size=24, empty_class=False):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            if empty_class and split == 'train' and c == classes - 1:
                continue
            for i in range(per_class):
                img = np.full((size, size, 3), 60 * c, np.uint8) + rng.integers(0, 40, (size, size, 3), np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return root


@pytest.mark.parametrize('args,pattern', [
    (['--data-dir', 'does/not/exist'], r"Data dir 'does/not/exist' does not exist"),
    (['--model', 'resnet18_nlp_12345'], r"Unknown model 'resnet18_nlp_12345'.*Invalid stride digits '12345'"),
    (['--model', 'resnet18-blur-1222'], r"Unknown pooling method 'blur'.*Valid methods"),
    (['--model', 'vit_nlp_1222'], r"Unknown model 'vit_nlp_1222'"),
    (['-b', '2000'], r'--batch-size 2000 is larger than the 1437 training images: .* use --batch-size 1437 or less'),
    (['--epochs', '0'], r'argument --epochs: must be at least 1, got 0'),
    (['--stock-weights', 'weights/resnet18.safetensors'],
     r"stock_weights file 'weights/resnet18.safetensors' does not exist"),
])
def test_bad_input_fails_before_training(tmp_path, args, pattern, run_cli):
    out = tmp_path / 'out'
    proc = run_cli('train', *args, '--output', out)
    assert proc.returncode == 2 and re.search(pattern, proc.stderr), proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize('args,pattern', [
    (['--dataset', 'fashion_mnist'], r"Unknown --dataset 'fashion_mnist' \(did you mean 'fashion-mnist'\?\): choose "
                                     r'from fashion-mnist, torch/cifar10, .*torch/qmnist'),
    (['--dataset', 'torch/cifar100', '--data-dir', 'no/such/dir'],
     r"--dataset torch/cifar100: Dataset not found.* \(looked in --data-dir 'no/such/dir'; --dataset-download fetches"),
    (['--dataset', 'fashion-mnist', '--data-dir', 'no/such/dir'], r"Fashion-MNIST folder 'no/such/dir' does not exist"),
    (['--mean', '0.4', '0.5'], r'--mean has 2 values, and --in-chans 3 takes 3 \(or one for every channel\)'),
    (['--in-chans', '2'], r'argument --in-chans: invalid choice: 2 \(choose from 1, 3\)'),
    (['--sched', 'none'], r"argument --sched: invalid choice: 'none' \(choose from 'cosine', "),
    (['--opt', 'adamw2'], r"--opt adamw2: not one of timm's optimizers: .*adamw,"),
    (['--num-classes', '5'], r'--num-classes 5 is fewer than the 10 classes of the training data'),
    (['--val-split', 'test'], r"--val-split test: scikit-learn's digits have one test split"),
    (['--dataset-download'], r'--dataset-download applies to torch/ data sets only'),
    (['--dy-anneal-epochs', '2'], r'--dy-anneal-epochs: resnet18_nlp_headfix2_2222 has no dynamic convolutions'),
    (['--resume', 'no/such/last.pth.tar'], r"Resume checkpoint 'no/such/last.pth.tar' does not exist"),
    (['--initial-checkpoint', 'no/such.safetensors'], r"Checkpoint 'no/such.safetensors' does not exist"),
])
def test_bad_input_is_one_line_naming_the_option(tmp_path, args, pattern, run_cli):
    out = tmp_path / 'out'
    line = _one_line_error(run_cli('train', *args, '--output', out))
    assert re.search(pattern, line), line
    assert not out.exists()


def test_compare_refuses_one_resume_file_for_every_model(tmp_path, run_cli):
    line = _one_line_error(run_cli('compare', '--resume', 'last.pth.tar', '--output', tmp_path / 'out'), 'compare')
    assert "--resume last.pth.tar: compare resumes each model from its own folder; use 'auto' or 'none'" in line


def _grey_folder(root: Path, mode: str, classes: int = 2, per_class: int = 6, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(classes):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(100 * c, 100 * c + 60, (size, size), np.uint8), mode='L')
                img.convert(mode).save(root / split / f'c{c}' / f'{i}.png')
    return root


@pytest.mark.slow
@pytest.mark.parametrize('source,in_chans', [('torch/fashion_mnist', 3), ('torch/fashion_mnist', 1),
                                             ('grey-folder', 1), ('grey-folder', 3), ('rgb-folder', 1)])
def test_in_chans_through_every_data_source(tmp_path, source, in_chans):
    """A torch/ data set (timm's create_dataset) and image folders, grey or RGB, train a model of --in-chans."""
    from test_data import _fake_fmnist
    from timm_nlp.checkpoint import read_metadata
    if source.startswith('torch/'):
        root = tmp_path / 'torch'
        _fake_fmnist(root / 'FashionMNIST' / 'raw', n_train=20, n_test=10, gz=False)  # torchvision's layout
        data = ['--dataset', source, '--data-dir', root]
    else:
        data = ['--data-dir', _grey_folder(tmp_path / 'folder', 'L' if source == 'grey-folder' else 'RGB'),
                '--val-split', 'val']
    out = tmp_path / 'out'
    _cli('train', *data, '--model', 'resnet18_lip_2222', '--in-chans', in_chans, '--epochs', '1', '-b', '4',
         '--img-size', '16', '--no-progress', '--output', out)
    weights = load_training_checkpoint(str(out / 'last.pth.tar'))['state_dict']
    assert weights['conv1.weight'].shape[1] == in_chans
    assert read_metadata(str(out / 'model.safetensors'))['recipe']['in_chans'] == in_chans


def test_empty_class_folder_fails_before_training(tmp_path, run_cli):
    data = _image_folder(tmp_path / 'data', empty_class=True)
    proc = run_cli('train', '--data-dir', data, '--output', tmp_path / 'out')
    assert proc.returncode == 2 and "Class folder" in proc.stderr and 'class2' in proc.stderr
    assert 'contains no images' in proc.stderr and not (tmp_path / 'out').exists()


def test_eval_classes_missing_from_train_fail_before_training(tmp_path, run_cli):
    data = _image_folder(tmp_path / 'data', per_class=1)
    for name in ('zebra', 'yak'):
        (data / 'val' / name).mkdir()
        Image.new('RGB', (8, 8)).save(data / 'val' / name / '0.png')
    proc = run_cli('train', '--data-dir', data, '--val-split', 'val', '--output', tmp_path / 'out')
    assert proc.returncode == 2 and re.search(r"val' has classes that .*train' lacks: yak, zebra", proc.stderr)
    assert not (tmp_path / 'out').exists()


def test_profile_rejects_image_sizes_below_one(capsys):
    from timm_nlp.cli import build_parser
    for size in ('0', '-8'):
        with pytest.raises(SystemExit):
            build_parser().parse_args(['profile', 'resnet18', '--img-size', size])
        assert f'argument --img-size: must be at least 1, got {size}' in capsys.readouterr().err


def test_image_folder_training(tmp_path):
    data = _image_folder(tmp_path / 'data')
    out = tmp_path / 'out'
    _cli('train', '--data-dir', data, '--model', 'mobilenetv2_lip_2222121', '--epochs', '1', '--output', out,
         '-b', '6', '--img-size', '24', '--no-progress')
    meta = load_training_checkpoint(str(out / 'last.pth.tar'))
    assert meta['state_dict']['classifier.weight'].shape[0] == 3


# an architecture string that is not a registered name; lr 0.003 over 9 steps puts the model at 100% top-1 and its
# EMA (decay 0.998) at 67%, so a metric or weights of the wrong one show
EMA_RUN = ['compare', '--models', 'resnet18-lip-1211', '--model-ema', '--val-split', 'val', '--epochs', '1', '-b', '4',
           '--lr', '0.003', '--img-size', '16', '--in-chans', '3', '--no-progress']


def _table(stdout: str):
    return [[c.strip() for c in r.split('|')[1:-1]] for r in stdout.splitlines() if r.startswith('| resnet18')]


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('ema')
    data = _image_folder(root / 'data', per_class=12, size=16)
    proc = _cli(*EMA_RUN, '--data-dir', data, '--output', root / 'cmp')
    return data, root / 'cmp', proc.stdout


@pytest.mark.slow
def test_compare_trains_an_architecture_string(ema_run):
    data, out, stdout = ema_run
    (row,) = _table(stdout)
    assert row[0] == 'resnet18-lip-1211' and (out / row[0] / 'model.safetensors').is_file()
    assert float(row[5]) == 32  # profiled at 16x16: the stem norm's 64 x 8 x 8 float32 input and output
    # with EMA, both top-1 columns are the EMA's, as are the weights (the model's own top-1 differs, EMA_RUN)
    (last,) = _summary(out / 'resnet18-lip-1211')
    assert float(row[1]) == pytest.approx(float(last['eval_ema_top1']), abs=5e-3) == float(row[2])
    assert float(row[1]) != pytest.approx(float(last['eval_top1']), abs=5e-3)
    assert '1 models, 1 epochs, seed 0, 16x16 RGB input, test top-1, top-1 of the EMA weights' in stdout


@pytest.mark.slow
def test_ema_run_exports_and_scores_the_ema_weights(ema_run):
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm_nlp import create_model
    from timm_nlp.checkpoint import load_weights, read_metadata
    data, out, _ = ema_run
    run = out / 'resnet18-lip-1211'
    (row,) = _summary(run)
    meta = read_metadata(str(run / 'model.safetensors'))
    assert meta['top1'] == float(row['eval_ema_top1']) != float(row['eval_top1'])
    ema = load_training_checkpoint(str(run / 'model_best.pth.tar'))['state_dict_ema']
    weights = load_weights(str(run / 'model.safetensors'))
    assert all(torch.equal(weights[k], v) for k, v in ema.items())
    model = create_model('resnet18-lip-1211', num_classes=3)
    model.load_state_dict(weights)
    cfg = resolve_data_config(dict(input_size=(3, 16, 16)), model=model)
    loader = create_loader(create_dataset('', root=str(data / 'val')), input_size=cfg['input_size'], batch_size=4,
                           crop_pct=1.0, mean=cfg['mean'], std=cfg['std'], interpolation=cfg['interpolation'],
                           use_prefetcher=False)
    with torch.no_grad():
        correct = sum((model.eval()(x).argmax(1) == y).sum().item() for x, y in loader)
    assert 100 * correct / 36 == pytest.approx(meta['top1'])


@pytest.mark.slow
def test_last_checkpoint_records_recipe_and_its_metrics(ema_run, tmp_path):
    from timm_nlp.hub import export_for_hub
    _, out, _ = ema_run
    run = out / 'resnet18-lip-1211'
    (row,) = _summary(run)
    card = (export_for_hub(str(run / 'last.pth.tar'), str(tmp_path / 'hub'), 'org/x') / 'README.md').read_text()
    # last.safetensors pushes its state_dict (not the EMA): the card scores that model, at the trained size
    assert f"| top-1 on data | {float(row['eval_top1']):.2f} % |" in card
    assert '| MACs @16x16 |' in card and '- img_size: 16' in card and '- model_ema: True' in card
    assert load_training_checkpoint(str(run / 'last.pth.tar'))['label_names'] == ['class0', 'class1', 'class2']


@pytest.mark.slow
def test_rerun_of_a_finished_run_returns_its_recorded_results(ema_run):
    data, out, stdout = ema_run
    proc = _cli(*EMA_RUN, '--data-dir', data, '--output', out)
    assert re.search(r'Resumed from .*last.pth.tar. at epoch 1 of 1', proc.stderr)
    assert _table(proc.stdout) == _table(stdout)  # metrics, throughput and weights of the finished run


@pytest.mark.slow
def test_rerun_with_model_ema_toggled_keeps_the_ranked_weights(ema_run, tmp_path):
    """model.safetensors holds the weights its checkpoint's own metric ranked, whatever --model-ema says now."""
    import shutil
    from timm_nlp.checkpoint import load_weights, read_metadata
    data, out, stdout = ema_run
    shutil.copytree(out, tmp_path / 'ema')
    run = tmp_path / 'ema' / 'resnet18-lip-1211'
    model_file = run / 'model.safetensors'
    model_file.unlink()  # written again by the rerun
    proc = _cli(*[a for a in EMA_RUN if a != '--model-ema'], '--data-dir', data, '--output', tmp_path / 'ema')
    assert _table(proc.stdout) == [[c.replace(str(out), str(tmp_path / 'ema')) for c in r] for r in _table(stdout)]
    best = load_training_checkpoint(str(run / 'model_best.pth.tar'))
    weights = load_weights(str(model_file))
    assert all(torch.equal(weights[k], v) for k, v in best['state_dict_ema'].items())
    assert read_metadata(str(model_file))['top1'] == best['metric'] == float(_summary(run)[0]['eval_ema_top1'])
    assert read_metadata(str(model_file))['recipe']['model_ema'] is True
    # a run without EMA, rerun with --model-ema: its own weights (there is no EMA to export)
    args = ['train', '--model', 'resnet18_skip_1222', '--data-dir', data, '--val-split', 'val', '--epochs', '1',
            '-b', '12', '--img-size', '16', '--no-progress', '--output', tmp_path / 'plain']
    _cli(*args)
    model_file = tmp_path / 'plain' / 'model.safetensors'
    model_file.unlink()
    _cli(*args, '--model-ema')
    best = load_training_checkpoint(str(tmp_path / 'plain' / 'model_best.pth.tar'))
    weights = load_weights(str(model_file))
    assert 'state_dict_ema' not in best and all(torch.equal(weights[k], v) for k, v in best['state_dict'].items())
    assert read_metadata(str(model_file))['top1'] == float(_summary(tmp_path / 'plain')[0]['eval_top1'])


@pytest.mark.slow
def test_resume_of_a_run_ranked_by_another_metric(ema_run, tmp_path):
    import shutil
    data, out, _ = ema_run
    shutil.copytree(out, tmp_path / 'cmp')
    run = tmp_path / 'cmp' / 'resnet18-lip-1211'
    # last.pth.tar as a run ranked by the model's own top1 wrote it (the EMA run's checkpoints, re-ranked)
    ckpt = torch.load(run / 'last.pth.tar', weights_only=False)  # written by this test's own run
    record = getattr(ckpt['args'], 'timm_nlp')
    assert record.pop('eval_metric') == 'ema_top1'
    top1 = record['metrics']['top1']
    ckpt['saver'].update(best_metric=top1, checkpoint_files=[(n, top1) for n, _ in ckpt['saver']['checkpoint_files']])
    torch.save(ckpt, run / 'last.pth.tar')
    i = EMA_RUN.index('--epochs') + 1
    proc = _cli(*EMA_RUN[:i], '2', *EMA_RUN[i + 1:], '--data-dir', data, '--output', tmp_path / 'cmp')  # one more
    assert 'ranked its checkpoints by top1; this run ranks by ema_top1' in proc.stderr
    rows = _summary(run)
    best = load_training_checkpoint(str(run / 'model_best.pth.tar'))
    assert len(rows) == 2 and best['epoch'] == 1 and best['metric'] == float(rows[1]['eval_ema_top1'])


def test_initial_checkpoint_of_another_class_count_resets_the_head(tmp_path):
    import argparse
    from timm_nlp.checkpoint import save_weights
    from timm_nlp.trainer import _build_model, add_train_args
    src = timm.create_model('resnet18_lip_2222', num_classes=3, in_chans=1)
    save_weights(str(tmp_path / 'c3.safetensors'), src.state_dict())
    args = add_train_args(argparse.ArgumentParser()).parse_args(
        ['--model', 'resnet18_lip_2222', '--initial-checkpoint', str(tmp_path / 'c3.safetensors')])
    torch.manual_seed(0)
    model = _build_model(args, 10)
    torch.manual_seed(0)
    assert torch.equal(model.fc.weight, timm.create_model('resnet18_lip_2222', num_classes=10).fc.weight)  # init
    assert torch.allclose(model.conv1.weight, src.conv1.weight.repeat(1, 3, 1, 1) / 3)  # 1-channel stem, as timm does
    loaded = {k: v for k, v in src.state_dict().items() if not k.startswith(('fc.', 'conv1.'))}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded.items())


def test_initial_checkpoint_of_another_architecture_fails_before_training(tmp_path, run_cli):
    from timm_nlp.checkpoint import save_weights
    save_weights(str(tmp_path / 'skip.safetensors'), timm.create_model('resnet18_skip_1222').state_dict())
    proc = run_cli('train', '--model', 'resnet18_lip_2222', '--initial-checkpoint', tmp_path / 'skip.safetensors',
                   '--output', tmp_path / 'out')
    assert proc.returncode == 2 and 'Checkpoint does not match resnet18-lip-2222' in proc.stderr, proc.stderr[-2000:]
    assert 'layer1.pool' in proc.stderr and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('recorded,model,error', [
    ('resnet18_avgp_2222', 'resnet18_maxp_2222', 'resnet18_avgp_2222, not of resnet18-maxp-2222'),  # no parameters
    ('resnet18_nlp_2222', 'resnet18_nlp_nowin_2222', 'resnet18_nlp_2222, not of resnet18-nlp_nowin-2222'),
    ('resnet18_maxp_2222', 'resnet18_maxp_4222', 'resnet18_maxp_2222, not of resnet18-maxp-4222'),  # strides
    ('resnet18', 'resnet18_skip_1222', 'resnet18, not of resnet18-skip-1222'),  # a stock timm model
    ('RESNET18-MAXP-2222', 'resnet18_maxp_2222', None),  # the seed spelling of the same architecture
])
def test_initial_checkpoint_of_another_recorded_architecture(tmp_path, recorded, model, error):
    """Architectures with the same tensors are told apart by the architecture the checkpoint records."""
    import argparse
    from timm_nlp.checkpoint import save_weights
    from timm_nlp.models import create_model
    from timm_nlp.trainer import _build_model, add_train_args
    path = str(tmp_path / 'src.safetensors')
    save_weights(path, create_model(model, num_classes=3).state_dict(), dict(architecture=recorded))
    args = add_train_args(argparse.ArgumentParser()).parse_args(['--model', model, '--initial-checkpoint', path])
    if error is None:
        _build_model(args, 3)
    else:
        with pytest.raises(ValueError, match=f"holds weights of {error}: --initial-checkpoint needs the same"):
            _build_model(args, 3)


def _one_line_error(proc: subprocess.CompletedProcess, command: str = 'train') -> str:
    """The CLI's error: exit status 2, no traceback, the last line of stderr ``timm-nlp CMD: error: ...``."""
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f'timm-nlp {command}: error: '), proc.stderr[-3000:]
    return line


@pytest.mark.slow
def test_resume_checks_the_architecture_channels_and_tensors(tmp_path, run_cli):
    """A rerun resumes under any spelling of the architecture; another architecture, input-channel count, or a
    checkpoint that lacks tensors of the model is refused in one line that names the problem."""
    out = tmp_path / 'run'
    args = ['--epochs', '1', *FAST, '--output', out]
    _cli('train', '--model', 'resnet18_lip_2222', *args)
    for extra, pattern in (
            (['--model', 'resnet18_maxp_2222'], r"is a checkpoint of 'resnet18_lip_2222', not of 'resnet18_maxp_2222'"),
            (['--model', 'resnet18_lip_2222', '--in-chans', '1'],
             r'was trained with --in-chans 3: rerun with --in-chans 3, or use another --output')):
        line = _one_line_error(run_cli('train', *extra, *args))
        assert re.search(pattern, line), line
    ckpt = torch.load(out / 'last.pth.tar', weights_only=False)  # written by this test's own run
    lacking = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('layer1.pool.')}
    torch.save(dict(ckpt, state_dict=lacking), tmp_path / 'lacking.pth.tar')
    line = _one_line_error(run_cli('train', '--model', 'resnet18_lip_2222', *args, '--resume',
                                   tmp_path / 'lacking.pth.tar'))
    assert "lacking.pth.tar' does not match resnet18_lip_2222: missing key(s) in state_dict: layer1.pool." in line
    i = args.index('--epochs') + 1
    proc = _cli('train', '--model', 'RESNET18-LIP-2222', *args[:i], '2', *args[i + 1:])
    assert re.search(r'Resumed from .*last.pth.tar. at epoch 1 of 2', proc.stderr)
    assert [int(r['epoch']) for r in _summary(out)] == [0, 1]


def test_a_run_in_the_earlier_safetensors_format_is_refused(tmp_path, run_cli):
    """Nothing of a run that an earlier timm-nlp wrote is overwritten: its resume file is refused, saying what to do."""
    import json
    from safetensors.torch import save_file
    out = tmp_path / 'run'
    out.mkdir()
    save_file({'state_dict.fc.weight': torch.zeros(10, 512)}, str(out / 'last.safetensors'),
              metadata={'timm_nlp': json.dumps(dict(epoch=0, arch='resnet18_lip_2222', saver={}))})
    line = _one_line_error(run_cli('train', '--model', 'resnet18_lip_2222', '--output', out))
    assert 'a training checkpoint of an earlier timm-nlp (safetensors)' in line and '--initial-checkpoint' in line
    assert sorted(p.name for p in out.iterdir()) == ['last.safetensors']


def test_resume_restores_the_amp_loss_scaler(tmp_path):
    """timm's checkpoint keeps the float16 loss scaler's state and resume() restores it (resume_checkpoint)."""
    import argparse
    from timm.task import ClassificationTask
    from timm.utils import CheckpointSaver, NativeScaler
    from timm_nlp.trainer import add_train_args, resume
    args = add_train_args(argparse.ArgumentParser()).parse_args(['--model', 'resnet18_skip_1222', '--amp', '--output',
                                                                 str(tmp_path)])
    model = timm.create_model('resnet18_skip_1222', num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = NativeScaler(device='cpu')
    scaler.load_state_dict(dict(scaler.state_dict(), scale=256., _growth_tracker=7))
    run_args = argparse.Namespace(**vars(args), timm_nlp=dict(architecture=args.model))
    CheckpointSaver(model, optimizer, args=run_args, amp_scaler=scaler, checkpoint_dir=str(tmp_path)).save_checkpoint(0)
    fresh = NativeScaler(device='cpu')
    start, finished = resume(args, model, ClassificationTask(model), optimizer, fresh, None, num_epochs=2)
    assert (start, finished) == (1, None)
    assert (fresh.state_dict()['scale'], fresh.state_dict()['_growth_tracker']) == (256., 7)


@pytest.mark.slow
def test_amp_trains_and_resumes_the_loss_scaler(tmp_path):
    data = _image_folder(tmp_path / 'data', per_class=6, size=16)  # 18 training images, 3 steps of 6
    args = ['train', '--model', 'resnet18_skip_1222', '--data-dir', data, '--val-split', 'val', '-b', '6',
            '--img-size', '16', '--amp', '--no-progress', '--output', tmp_path / 'run']
    _cli(*args, '--epochs', '1')
    path = tmp_path / 'run' / 'last.pth.tar'
    ckpt = torch.load(path, weights_only=False)  # written by this test's own run
    assert 'amp_scaler' in ckpt
    ckpt['amp_scaler'].update(scale=256., _growth_tracker=100)  # a state a fresh scaler would not have
    torch.save(ckpt, path)
    _cli(*args, '--epochs', '2')
    state = load_training_checkpoint(str(path))['amp_scaler']
    assert (state['scale'], state['_growth_tracker']) == (256., 103)  # continued over the second epoch's 3 steps


def test_resume_from_plain_weights_is_refused(tmp_path, run_cli):
    from timm_nlp.checkpoint import save_weights
    path = tmp_path / 'model.safetensors'
    save_weights(str(path), timm.create_model('resnet18_lip_2222', num_classes=10).state_dict(),
                 dict(architecture='resnet18_lip_2222', num_classes=10))
    proc = run_cli('train', '--model', 'resnet18_lip_2222', '--resume', path, '--output', tmp_path / 'out')
    assert proc.returncode == 2 and 'holds plain model weights, not a training checkpoint' in proc.stderr
    assert 'use --initial-checkpoint' in proc.stderr and not (tmp_path / 'out' / 'summary.csv').exists()


def test_process_device_under_torchrun(monkeypatch):
    from timm_nlp.trainer import process_device
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '3')
    # each process of a node takes the GPU of its local rank, whatever index was given, as in timm's train.py
    assert [process_device(d) for d in ('cuda', 'cuda:0', 'cpu')] == ['cuda:3', 'cuda:3', 'cpu']
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert [process_device(d) for d in ('cuda', 'cuda:1')] == ['cuda', 'cuda:1']


def _write_stl10_binary(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """STL-10's layout written from its definition: byte c*96*96 + w*96 + h of each image is pixel (h, w, c)."""
    n = len(images)
    raw = np.zeros(n * 3 * 96 * 96, np.uint8)
    nn_, hh, ww, cc = np.meshgrid(np.arange(n), np.arange(96), np.arange(96), np.arange(3), indexing='ij')
    raw[nn_ * 27648 + cc * 9216 + ww * 96 + hh] = images[nn_, hh, ww, cc]
    raw.tofile(root / f'{split}_X.bin')
    (labels + 1).astype(np.uint8).tofile(root / f'{split}_y.bin')


def test_stl10_conversion(tmp_path):
    src = tmp_path / 'stl10_binary'
    src.mkdir()
    (src / 'class_names.txt').write_text('\n'.join(['airplane', 'bird', 'car']) + '\n')
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 96, 96, 3), np.uint8) for s, n in (('train', 4), ('test', 3))}
    labels = {'train': np.array([0, 2, 1, 2]), 'test': np.array([1, 1, 0])}
    for split in images:
        _write_stl10_binary(src, split, images[split], labels[split])
    counts = convert_stl10(str(src), str(tmp_path / 'folder'))
    assert counts == {'train': 4, 'test': 3}
    names = ['airplane', 'bird', 'car']
    for split in images:
        for i, (img, label) in enumerate(zip(images[split], labels[split])):
            path = tmp_path / 'folder' / split / names[label] / f'{split}_{i:05d}.png'
            assert np.array_equal(np.asarray(Image.open(path)), img)
    (src / 'test_y.bin').write_bytes(b'\x01')
    with pytest.raises(ValueError, match='has 1 labels'):
        convert_stl10(str(src), str(tmp_path / 'bad'))


def test_run_executes_a_script_with_the_models_registered(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text('import sys, timm\nprint(timm.is_model("resnet18_nlp_headfix2_1222"), sys.argv[1:], __name__)\n')
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.run', str(script), '--model', 'x'],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "True ['--model', 'x'] __main__"


@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS_DIR'),
                    reason='needs a checkout of timm\'s repository (TIMM_SCRIPTS_DIR with train.py, validate.py); '
                           'the trainer and timm_nlp.run are tested above without it')
@pytest.mark.parametrize('model,extra', [('resnet18_nlp_headfix2_2222', []),
                                         ('dymobilenetv2_dfmixp_2222121', ['--channels-last'])])
def test_real_timm_train_and_validate(tmp_path, model, extra):
    scripts = Path(os.environ['TIMM_SCRIPTS_DIR'])
    data = _image_folder(tmp_path / 'data', size=32)
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, str(scripts / 'train.py'), '--data-dir', str(data), '--device-modules',
                           'timm_nlp', '--model', model, '--num-classes', '3', '--epochs', '1', '-b', '6',
                           '--img-size', '32', '--workers', '0', '--no-prefetcher', '--device', 'cpu', '--output',
                           str(out), '--experiment', 'exp', '--warmup-epochs', '0', *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / 'exp' / 'model_best.pth.tar'
    assert ckpt.exists()
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.run', str(scripts / 'validate.py'), '--data-dir',
                           str(data / 'val'), '--model', model, '--num-classes', '3', *extra,
                           '--checkpoint', str(ckpt), '-b', '6', '--img-size', '32', '--workers', '0',
                           '--no-prefetcher', '--device', 'cpu'],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r'\* Acc@1 \d+\.\d+', proc.stdout + proc.stderr)


def test_paper_recipe_fills_the_options_left_at_their_defaults():
    import argparse
    from timm_nlp.trainer import add_train_args, apply_recipe
    parser = add_train_args(argparse.ArgumentParser())
    args = apply_recipe(parser.parse_args(['--recipe', 'paper', '--epochs', '50', '--lr', '0.05']))
    assert (args.opt, args.momentum, args.weight_decay, args.sched, args.decay_rate, args.batch_size) == (
        'sgd', 0.9, 0., 'multistep', 0.2, 8)
    assert args.decay_milestones == [30, 40, 45] and args.lr == 0.05  # int(fraction * epochs); a given lr stays
    assert args.mean == args.std == [0.5] * 3 and args.interpolation == 'bilinear' and args.smoothing == 0
    assert apply_recipe(parser.parse_args([])).weight_decay == 5e-4  # the default recipe is untouched


@pytest.mark.slow
def test_train_reports_best_and_last_epoch_top1_and_anneals_only_when_asked(tmp_path):
    data = _image_folder(tmp_path / 'data', per_class=6, size=16)
    args = ['--model', 'dyresnet18_lip_1211', '--data-dir', data, '--val-split', 'val', '--epochs', '3', '-b', '6',
            '--img-size', '16', '--no-progress', '--recipe', 'paper']
    proc = _cli('train', *args, '--output', tmp_path / 'run')
    rows = _summary(tmp_path / 'run')
    result = dict(line.split(': ', 1) for line in proc.stdout.splitlines() if ': ' in line)
    tops = [float(r['eval_top1']) for r in rows]
    assert float(result['best_top1']) == pytest.approx(max(tops)) and int(result['best_epoch']) == tops.index(max(tops))
    assert float(result['last_top1']) == pytest.approx(tops[-1])
    from timm_nlp.checkpoint import read_metadata
    ckpt = load_training_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))
    temps = {v.item() for k, v in ckpt['state_dict'].items() if k.endswith('temperature')}
    assert temps == {34.} and read_metadata(str(tmp_path / 'run' / 'model.safetensors'))['recipe']['recipe'] == 'paper'
    _cli('train', *args, '--output', tmp_path / 'anneal', '--dy-anneal-epochs', '2')
    ckpt = load_training_checkpoint(str(tmp_path / 'anneal' / 'last.pth.tar'))
    # epoch 0 at 34, epoch 1 at 17.5, epoch 2 (the last) at 1: linear to 1 over 2 epochs
    assert {v.item() for k, v in ckpt['state_dict'].items() if k.endswith('temperature')} == {1.}


@pytest.mark.slow
def test_compare_with_seeds_reports_their_mean_and_spread(tmp_path):
    import statistics
    models = ['resnet18_skip_1222', 'resnet18_lip_2222']
    proc = _cli('compare', '--models', *models, '--seeds', '2', '--seed', '5', '--epochs', '2', *FAST, '--output',
                tmp_path / 'cmp')
    assert '2 models, 2 epochs, 2 seeds each (5..6), mean ± std' in proc.stdout
    table = {r[0]: r for r in _table(proc.stdout)}
    assert set(table) == set(models)
    best = {}
    for name in models:
        runs = [_summary(tmp_path / 'cmp' / name / f'seed{seed}') for seed in (5, 6)]
        best[name] = [max(float(r['eval_top1']) for r in rows) for rows in runs]
        last = [float(rows[-1]['eval_top1']) for rows in runs]
        for col, values in ((1, best[name]), (2, last)):
            mean, std = (float(v) for v in table[name][col].split(' ± '))
            assert mean == pytest.approx(statistics.mean(values), abs=5e-3)
            assert std == pytest.approx(statistics.stdev(values), abs=5e-3)
    (a, b) = models
    spread = abs(statistics.mean(best[a]) - statistics.mean(best[b])) <= statistics.stdev(best[a]) + \
        statistics.stdev(best[b])
    assert (f'{a} ~ {b}' in proc.stdout) == spread and ('spread' in proc.stdout)


def test_within_spread():
    from timm_nlp.tools.tables import mean_std, within_spread
    runs = {'a': [80., 82.], 'b': [81., 81.], 'c': [90., 91.], 'd': [70.]}
    assert within_spread(runs) == [('a', 'b')]  # |81 - 81| <= 1.41; c is 9.5 away; d has no spread
    assert mean_std([80., 82.]) == '81.00 ± 1.41' and mean_std([70.]) == '70.00'
