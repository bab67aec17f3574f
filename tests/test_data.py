"""Fashion-MNIST: the IDX reader on the real files (Debian's dataset-fashion-mnist) and on files written here,
class-balanced subsets, and a short real training run."""
import argparse
import csv
import gzip
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from timm_nlp.data import FashionMNIST, IdxError, balanced_subset, default_fashion_mnist_dir, read_idx, resolve_datasets

REPO = Path(__file__).resolve().parent.parent
FMNIST = default_fashion_mnist_dir()
needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')),
    reason=f'Fashion-MNIST is not in {FMNIST} (apt-get install dataset-fashion-mnist; .ci/run installs it)')


def _write_idx(path: Path, array: np.ndarray, magic: int = None, cut: int = 0, pad: int = 0) -> Path:
    """An IDX file of ``array`` (uint8), gzipped when ``path`` ends in .gz, ``cut`` bytes short or ``pad`` long."""
    magic = magic if magic is not None else 0x800 + array.ndim
    data = struct.pack('>I', magic) + struct.pack(f'>{array.ndim}I', *array.shape) + array.astype(np.uint8).tobytes()
    data = data[:len(data) - cut] + b'\0' * pad
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'wb') as f:
        f.write(data)
    return path


def _fake_fmnist(root: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = '.gz' if gz else ''
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        _write_idx(root / f'{prefix}-images-idx3-ubyte{ext}', rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f'{prefix}-labels-idx1-ubyte{ext}', np.arange(n) % 10)
    return root


@needs_fmnist
def test_the_real_files():
    train, test = FashionMNIST(FMNIST, 'train', in_chans=1), FashionMNIST(FMNIST, 'test')
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert Counter(train.targets) == {c: 6000 for c in range(10)}
    assert Counter(test.targets) == {c: 1000 for c in range(10)}
    img, label = train[0]
    assert img.mode == 'L' and img.size == (28, 28) and 0 <= label < 10
    rgb, _ = test[0]
    assert rgb.mode == 'RGB' and np.array_equal(np.asarray(rgb)[..., 0], test.images[0])
    assert np.array_equal(np.asarray(rgb)[..., 0], np.asarray(rgb)[..., 2])
    assert 0 < train.images.mean() < 255  # real photographs: neither blank nor saturated


@pytest.mark.parametrize('gz', [True, False])
def test_reader_round_trip(tmp_path, gz):
    arr = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    path = _write_idx(tmp_path / ('a.idx.gz' if gz else 'a.idx'), arr)
    assert np.array_equal(read_idx(str(path)), arr)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    assert np.array_equal(read_idx(str(_write_idx(tmp_path / 'l.idx', labels))), labels)


@pytest.mark.parametrize('gz', [True, False])
@pytest.mark.parametrize('kind, match', [
    (dict(cut=5), r'truncated or padded: its header says 5x7x3 = 105 bytes of data, the file has 100'),
    (dict(pad=2), r'truncated or padded: .* 105 bytes of data, the file has 107'),
    (dict(cut=105 + 6), r'truncated: 10 bytes, its header alone takes 16'),
    (dict(magic=0x00000d03), r'not an IDX file of unsigned bytes: magic number 0x00000d03'),
])
def test_reader_errors(tmp_path, gz, kind, match):
    arr = np.zeros((5, 7, 3), np.uint8)
    path = _write_idx(tmp_path / ('b.gz' if gz else 'b'), arr, **kind)
    with pytest.raises(IdxError, match=match):
        read_idx(str(path))


def test_a_cut_gzip_stream_is_reported(tmp_path):
    path = _write_idx(tmp_path / 'c.gz', np.zeros((50, 28, 28), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(IdxError, match=r"c.gz' cannot be read"):
        read_idx(str(path))


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST folder '.*nowhere' does not exist"):
        FashionMNIST(str(tmp_path / 'nowhere'))
    root = _fake_fmnist(tmp_path / 'fm')
    os.remove(root / 't10k-labels-idx1-ubyte.gz')
    FashionMNIST(str(root), 'train')
    with pytest.raises(FileNotFoundError, match=r"'t10k-labels-idx1-ubyte' \(or 't10k-labels-idx1-ubyte.gz'\) is not "
                                                r'in .*dataset-fashion-mnist'):
        FashionMNIST(str(root), 'test')
    with pytest.raises(ValueError, match="splits 'train' and 'test', not 'val'"):
        FashionMNIST(str(root), 'val')


def test_mismatched_images_and_labels(tmp_path):
    root = _fake_fmnist(tmp_path / 'fm', gz=False)
    _write_idx(root / 'train-labels-idx1-ubyte', np.arange(29) % 10)
    with pytest.raises(IdxError, match=r'holds \(30, 28, 28\) .* \(29,\): expected N images of HxW and N labels'):
        FashionMNIST(str(root))
    _write_idx(root / 'train-labels-idx1-ubyte', np.arange(30) % 11)
    with pytest.raises(IdxError, match='has label 10: Fashion-MNIST has 10 classes'):
        FashionMNIST(str(root))


def test_balanced_subset():
    targets = [c for c in range(4) for _ in range(10 + c)]
    idx = balanced_subset(targets, 10, seed=3)
    assert Counter(targets[i] for i in idx) == {0: 3, 1: 3, 2: 2, 3: 2} and idx == sorted(idx)
    assert idx == balanced_subset(targets, 10, seed=3) != balanced_subset(targets, 10, seed=4)
    with pytest.raises(ValueError, match='a balanced subset of 48 needs 12 images of class 0, which has 10'):
        balanced_subset(targets, 48)


def test_resolve_datasets_subsets(tmp_path):
    root = _fake_fmnist(tmp_path / 'fm')
    args = argparse.Namespace(dataset='fashion-mnist', data_dir=str(root), in_chans=1, train_subset=20,
                              eval_subset=10, num_classes=None)
    train, test, classes = resolve_datasets(args)
    assert (len(train), len(test), classes) == (20, 10, 10)
    assert Counter(train.dataset.targets[i] for i in train.indices) == {c: 2 for c in range(10)}
    train.transform = lambda img: np.asarray(img)  # timm's loader sets the transform of the dataset it is given
    assert train[0][0].shape == (28, 28)
    args.eval_subset = 21
    with pytest.raises(ValueError, match='--eval-subset 21 is larger than the 20 test images'):
        resolve_datasets(args)


@needs_fmnist
@pytest.mark.slow
def test_a_short_real_training_run_learns(tmp_path):
    """One epoch on 5,000 training images: chance is 10%, a model that does not learn stays far below 75%."""
    out = tmp_path / 'run'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nlp.cli', 'train', '--dataset', 'fashion-mnist', '--model',
         'resnet18_nlp_headfix2_2222', '--in-chans', '1', '--train-subset', '5000', '--eval-subset', '2000',
         '--epochs', '1', '--img-size', '28', '-b', '32', '--lr', '0.005', '--no-aug', '--no-progress', '--output',
         str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / 'summary.csv') as f:
        (row,) = list(csv.DictReader(f))
    assert float(row['eval_top1']) >= 75., row
    from timm_nlp.checkpoint import read_metadata
    meta = read_metadata(str(out / 'model.safetensors'))
    assert meta['recipe']['dataset'] == 'fashion-mnist' and meta['recipe']['train_subset'] == 5000
    assert meta['label_names'][9] == 'Ankle boot' and meta['recipe']['in_chans'] == 1
