"""Datasets of timm-nlp's trainer: Fashion-MNIST from its IDX files, scikit-learn's digits, image folders.

Fashion-MNIST (Xiao et al., 2017: 70,000 28x28 grey photographs of clothing, 10 classes, MIT licence) is read from
the four standard IDX files, gzipped or not, e.g. those of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``); torchvision's ``FashionMNIST(download=True)`` fetches the same files.
"""
import argparse
import gzip
import os
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, Subset

from timm.data import create_dataset

__all__ = [
    'FashionMNIST', 'DigitsDataset', 'TransformSubset', 'read_idx', 'balanced_subset', 'dataset_targets',
    'resolve_datasets',
    'default_fashion_mnist_dir', 'FASHION_MNIST_CLASSES', 'IdxError', 'IMG_EXTENSIONS',
]

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')
_FASHION_MNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                        'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
# IDX magic numbers: two zero bytes, the element type (0x08: unsigned byte) and the number of dimensions
_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}


class IdxError(ValueError):
    """An IDX file that is not what it should be (wrong magic number, truncated)."""


def read_idx(path: str) -> np.ndarray:
    """The array of an IDX file of unsigned bytes (``.gz`` or not): labels (1-D) or images (3-D)."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise IdxError(f"'{path}' cannot be read: {e}.") from None
    if len(data) < 4:
        raise IdxError(f"'{path}' is truncated: {len(data)} bytes, not even an IDX header.")
    magic = struct.unpack('>I', data[:4])[0]
    if magic not in _IDX_MAGIC:
        raise IdxError(f"'{path}' is not an IDX file of unsigned bytes: magic number 0x{magic:08x}, expected "
                       '0x00000801 (labels) or 0x00000803 (images).')
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"'{path}' is truncated: {len(data)} bytes, its header alone takes {header}.")
    dims = struct.unpack(f'>{ndim}I', data[4:header])
    size = int(np.prod(dims))
    if len(data) - header != size:
        raise IdxError(f"'{path}' is truncated or padded: its header says {'x'.join(map(str, dims))} = {size} bytes "
                       f'of data, the file has {len(data) - header}.')
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def default_fashion_mnist_dir() -> str:
    """The first existing folder of the known Fashion-MNIST locations (Debian's package), else its path."""
    return next((d for d in FASHION_MNIST_DIRS if os.path.isdir(d)), FASHION_MNIST_DIRS[0])


def _find_idx(root: str, stem: str) -> str:
    for name in (stem, stem + '.gz'):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"Fashion-MNIST file '{stem}' (or '{stem}.gz') is not in '{root}'. Install Debian's "
                            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist: /usr/share/datasets/"
                            "fashion-mnist) or pass --data-dir to a folder with the four IDX files.")


def balanced_subset(targets: Sequence[int], n: int, seed: int = 0) -> List[int]:
    """``n`` indices with the classes as equal as they can be (the first classes take the remainder), a fixed
    random choice within each class for a given ``seed``, in index order."""
    targets = np.asarray(targets)
    classes = np.unique(targets)
    rng = np.random.default_rng(seed)
    picked = []
    for i, c in enumerate(classes):
        take = n // len(classes) + (1 if i < n % len(classes) else 0)
        members = np.flatnonzero(targets == c)
        if take > len(members):
            raise ValueError(f'a balanced subset of {n} needs {take} images of class {c}, which has {len(members)}.')
        picked.append(rng.permutation(members)[:take])
    return sorted(int(i) for i in np.concatenate(picked))


def dataset_targets(dataset: Dataset) -> List[int]:
    """The class index of every sample (from the dataset's ``targets`` or its timm reader, without loading images)."""
    if hasattr(dataset, 'targets'):
        return list(dataset.targets)
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'samples'):
        return [t for _, t in reader.samples]
    raise ValueError(f'{type(dataset).__name__} does not list its targets: a class-balanced subset needs them.')


class TransformSubset(Subset):
    """A subset whose ``transform`` is its dataset's (timm's ``create_loader`` sets the transform on the dataset it is
    given)."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value


class _GreyImages(Dataset):
    """Grey uint8 images ``self.images`` (N, H, W) with ``self.targets`` as PIL images, replicated to RGB for
    ``in_chans`` 3."""
    images: np.ndarray
    targets: List[int]
    in_chans: int
    transform = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image
        img = Image.fromarray(self.images[i], mode='L')
        if self.in_chans == 3:
            img = img.convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class FashionMNIST(_GreyImages):
    """Fashion-MNIST from its IDX files as PIL images (grey, or replicated to RGB with ``in_chans=3``).

    Args:
        root: Folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
            ``t10k-labels-idx1-ubyte``, each gzipped or not.
        split: 'train' (60,000 images) or 'test' (10,000).
        in_chans: 1 (grey) or 3 (the grey value in every channel, for RGB models and stock weights).
    """

    def __init__(self, root: str, split: str = 'train', transform=None, in_chans: int = 3):
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST has the splits 'train' and 'test', not '{split}'.")
        if in_chans not in (1, 3):
            raise ValueError(f'Fashion-MNIST images are grey: in_chans 1, or 3 to replicate them, not {in_chans}.')
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Fashion-MNIST folder '{root}' does not exist. Install Debian's "
                                    'dataset-fashion-mnist or pass --data-dir to a folder with the four IDX files.')
        images_file, labels_file = (_find_idx(root, stem) for stem in _FASHION_MNIST_FILES[split])
        self.images, labels = read_idx(images_file), read_idx(labels_file)
        if self.images.ndim != 3 or labels.ndim != 1 or len(self.images) != len(labels):
            raise IdxError(f"'{images_file}' holds {self.images.shape} and '{labels_file}' {labels.shape}: expected "
                           'N images of HxW and N labels.')
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise IdxError(f"'{labels_file}' has label {labels.max()}: Fashion-MNIST has 10 classes.")
        self.targets = labels.astype(np.int64).tolist()
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = transform
        self.in_chans = in_chans


class DigitsDataset(_GreyImages):
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) as RGB PIL images.

    A fixed stratified 80/20 split (seed 0) gives ``train`` and ``validation``; the transform up-samples.
    """

    def __init__(self, split: str = 'train', transform=None, in_chans: int = 3):
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as e:
            raise ImportError('The default digits dataset needs scikit-learn: pip install "timm-nlp[train]"') from e
        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=digits.target)
        keep = train_idx if split == 'train' else val_idx
        self.images = (digits.images[keep] * (255. / 16.)).clip(0, 255).astype(np.uint8)
        self.targets = digits.target[keep].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform
        self.in_chans = in_chans


def _check_image_folder(root: str, split: str) -> str:
    """The split's folder; clear errors for a missing folder, no class folders or an empty class folder."""
    candidates = [split] + (['validation', 'val', 'valid', 'test'] if split != 'train' else [])
    path = next((os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))), None)
    if path is None:
        raise FileNotFoundError(f"No '{split}' folder in data dir '{root}' (looked for {', '.join(candidates)}); "
                                'expected DIR/train/CLASS/*.png and DIR/val (or validation, test)/CLASS/*.png.')
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"'{path}' has no class folders; expected {path}/CLASS/image files.")
    for c in classes:
        cdir = os.path.join(path, c)
        if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, fs in os.walk(cdir) for f in fs):
            raise ValueError(f"Class folder '{cdir}' contains no images ({', '.join(IMG_EXTENSIONS)}).")
    return path


def _subset(dataset: Dataset, n: Optional[int], option: str, split: str) -> Dataset:
    if not n:
        return dataset
    targets = dataset_targets(dataset)
    if n > len(targets):
        raise ValueError(f'{option} {n} is larger than the {len(targets)} {split} images.')
    return TransformSubset(dataset, balanced_subset(targets, n, seed=0))


def resolve_datasets(args: argparse.Namespace) -> Tuple[Dataset, Dataset, int]:
    """Train and eval datasets and the class count: Fashion-MNIST, an image folder, a timm/torchvision dataset, or
    the digits; ``args.train_subset`` and ``args.eval_subset`` keep fixed, class-balanced subsets of the splits."""
    in_chans = getattr(args, 'in_chans', 3)
    if args.dataset == 'fashion-mnist':
        root = args.data_dir or default_fashion_mnist_dir()
        train_ds = FashionMNIST(root, 'train', in_chans=in_chans)
        eval_ds = FashionMNIST(root, 'test', in_chans=in_chans)
    elif args.dataset:  # a timm dataset name, e.g. torch/cifar100, hfds/..., with --data-dir as its root
        kw = dict(root=args.data_dir, download=args.dataset_download)
        train_ds = create_dataset(args.dataset, split='train', is_training=True, **kw)
        eval_ds = create_dataset(args.dataset, split=args.val_split, **kw)
    elif args.data_dir:
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"Data dir '{args.data_dir}' does not exist.")
        train_root = _check_image_folder(args.data_dir, 'train')
        eval_root = _check_image_folder(args.data_dir, args.val_split)
        train_ds = create_dataset('', root=train_root, is_training=True)
        class_to_idx = train_ds.reader.class_to_idx
        extra = sorted(set(create_dataset('', root=eval_root).reader.class_to_idx) - set(class_to_idx))
        if extra:
            raise ValueError(f"'{eval_root}' has classes that '{train_root}' lacks: {', '.join(extra)}; the model "
                             'could not predict them (train and eval splits need the same class folders).')
        eval_ds = create_dataset('', root=eval_root, class_map=class_to_idx)
    else:
        train_ds, eval_ds = DigitsDataset('train', in_chans=in_chans), DigitsDataset('validation', in_chans=in_chans)
    if hasattr(train_ds, 'reader') and hasattr(train_ds.reader, 'class_to_idx'):
        num_classes = len(train_ds.reader.class_to_idx)
    elif hasattr(train_ds, 'classes'):
        num_classes = len(train_ds.classes)
    elif hasattr(getattr(train_ds, 'reader', None), 'classes'):
        num_classes = len(train_ds.reader.classes)
    else:
        raise ValueError('Cannot tell the number of classes of the dataset; pass --num-classes.')
    train_ds = _subset(train_ds, getattr(args, 'train_subset', None), '--train-subset', 'training')
    eval_ds = _subset(eval_ds, getattr(args, 'eval_subset', None), '--eval-subset', 'test')
    return train_ds, eval_ds, args.num_classes or num_classes
