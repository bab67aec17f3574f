"""Data sets of timm-nlp's trainer: Fashion-MNIST, scikit-learn's digits, timm/torchvision data sets, image folders.

Fashion-MNIST (Xiao et al., 2017: 70,000 28x28 grey photographs of clothing, 10 classes, MIT licence) is read by
torchvision's ``FashionMNIST`` (as timm's ``torch/fashion_mnist`` reads it). That reader wants the four IDX files
uncompressed in ``ROOT/FashionMNIST/raw/`` and checks nothing about them; ``prepare_fashion_mnist`` makes that
layout from any folder with the four files, gzipped or not (e.g. Debian's ``dataset-fashion-mnist`` package,
``/usr/share/datasets/fashion-mnist``), unpacked once into a cache folder, and reads each file there with
torchvision's own IDX reader, so that a missing, truncated or corrupt file is reported by name.

Every source gives PIL images in the mode of the model's input (``ImageView``): grey (``L``) for ``in_chans`` 1,
``RGB`` for 3, whatever the files hold.
"""
import argparse
import difflib
import gzip
import hashlib
import os
import shutil
import tempfile
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from timm.data import create_dataset

__all__ = [
    'DigitsDataset', 'ImageView', 'prepare_fashion_mnist', 'fashion_mnist', 'balanced_subset', 'dataset_targets',
    'resolve_datasets', 'dataset_name', 'default_fashion_mnist_dir', 'IdxError', 'IMG_EXTENSIONS', 'DATASETS',
    'IMAGE_MODES',
]

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)  # Debian's dataset-fashion-mnist
# the PIL mode of each input channel count
IMAGE_MODES = {1: 'L', 3: 'RGB'}
# --dataset: the package's Fashion-MNIST reader, and the torchvision data sets timm's create_dataset builds
DATASETS = ('fashion-mnist', 'torch/cifar10', 'torch/cifar100', 'torch/mnist', 'torch/kmnist', 'torch/fashion_mnist',
            'torch/qmnist')
_FASHION_MNIST_FILES = {'train-images-idx3-ubyte': read_image_file, 'train-labels-idx1-ubyte': read_label_file,
                        't10k-images-idx3-ubyte': read_image_file, 't10k-labels-idx1-ubyte': read_label_file}


class IdxError(ValueError):
    """An IDX file that is not what it should be (wrong magic number, truncated, padded)."""


def default_fashion_mnist_dir() -> str:
    """The first existing folder of the known Fashion-MNIST locations (Debian's package), else its path."""
    return next((d for d in FASHION_MNIST_DIRS if os.path.isdir(d)), FASHION_MNIST_DIRS[0])


def _cache_dir() -> str:
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'timm-nlp')


def _find_idx(root: str, stem: str) -> str:
    for name in (stem, stem + '.gz'):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"Fashion-MNIST file '{stem}' (or '{stem}.gz') is not in '{root}'. Install Debian's "
                            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist: /usr/share/datasets/"
                            "fashion-mnist) or pass --data-dir to a folder with the four IDX files.")


def _unpack_checked(src: str, dst: str, read: Callable[[str], Any]) -> None:
    """Unpack ``src`` (gzipped or not) to ``dst`` atomically, once torchvision's IDX reader ``read`` accepts it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix='.unpacking-')
    try:
        with (gzip.open if src.endswith('.gz') else open)(src, 'rb') as f, os.fdopen(fd, 'wb') as out:
            shutil.copyfileobj(f, out)
        read(tmp)
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        os.remove(tmp)
        raise IdxError(f"'{src}' cannot be read: {e}.") from None
    except (AssertionError, ValueError, TypeError, RuntimeError, KeyError) as e:
        os.remove(tmp)
        what = 'labels' if read is read_label_file else 'images'
        reason = str(e) or 'its header is not one of an IDX file of unsigned bytes'
        raise IdxError(f"'{src}' is not an IDX file of {what} of unsigned bytes (truncated, padded or with another "
                       f'magic number): {reason}.') from None
    os.replace(tmp, dst)


def prepare_fashion_mnist(src: str, cache_dir: Optional[str] = None) -> str:
    """The root that torchvision's ``FashionMNIST`` reads, made from a folder with Fashion-MNIST's four IDX files.

    The files (gzipped or not) are unpacked into ``CACHE/fashion-mnist/KEY/FashionMNIST/raw/``, KEY a digest of their
    paths, sizes and times, so that they are unpacked and checked once and a changed file is unpacked again.

    Args:
        src: Folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
            ``t10k-labels-idx1-ubyte``, each gzipped or not.
        cache_dir: Where to unpack them (default: ``$XDG_CACHE_HOME/timm-nlp``, else ``~/.cache/timm-nlp``).
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"Fashion-MNIST folder '{src}' does not exist. Install Debian's "
                                'dataset-fashion-mnist or pass --data-dir to a folder with the four IDX files.')
    files = {stem: _find_idx(src, stem) for stem in _FASHION_MNIST_FILES}
    stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files.values()]
    key = hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir or _cache_dir(), 'fashion-mnist', key)
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for stem, path in files.items():
        if not os.path.isfile(os.path.join(raw, stem)):
            _unpack_checked(path, os.path.join(raw, stem), _FASHION_MNIST_FILES[stem])
    return root


def fashion_mnist(src: str, split: str = 'train', cache_dir: Optional[str] = None) -> FashionMNIST:
    """torchvision's ``FashionMNIST`` of one split, read from a folder with the four IDX files.

    Args:
        src: Folder with the four IDX files, gzipped or not (``prepare_fashion_mnist``).
        split: 'train' (60,000 images) or 'test' (10,000).
        cache_dir: Where they are unpacked (``prepare_fashion_mnist``).
    """
    if split not in ('train', 'test'):
        raise ValueError(f"Fashion-MNIST has the splits 'train' and 'test', not '{split}'.")
    ds = FashionMNIST(prepare_fashion_mnist(src, cache_dir), train=split == 'train')
    if len(ds.data) != len(ds.targets):
        raise IdxError(f"'{src}' holds {len(ds.data)} {split} images and {len(ds.targets)} labels: expected one label "
                       'per image.')
    if int(ds.targets.max()) >= len(ds.classes):
        raise IdxError(f"'{src}' has {split} label {int(ds.targets.max())}: Fashion-MNIST has 10 classes.")
    return ds


def balanced_subset(targets: Sequence[int], n: int, seed: int = 0) -> List[int]:
    """``n`` indices with the classes as equal as they can be (the first classes take the remainder), a fixed
    random choice within each class for a given ``seed``, in index order.

    Args:
        targets: The class index of every sample.
        n: How many to keep.
        seed: Seed of the choice within each class.
    """
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
    """The class index of every sample (from the dataset's ``targets`` or its timm reader, without loading images).

    Args:
        dataset: A torchvision or timm data set.
    """
    if hasattr(dataset, 'targets'):
        return [int(t) for t in dataset.targets]
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'samples'):
        return [t for _, t in reader.samples]
    raise ValueError(f'{type(dataset).__name__} does not list its targets: a class-balanced subset needs them.')


class ImageView(Dataset):
    """Samples of an image data set (all, or a fixed subset) as PIL images of one mode, under this view's transform.

    timm's ``create_loader`` sets ``transform`` on the data set it is given: here the view's, applied after the mode
    conversion; the wrapped data set returns untransformed PIL images.

    Args:
        dataset: A map-style data set of ``(PIL image, class index)`` with no transform of its own.
        mode: The PIL mode of every image: 'L' (grey, one channel) or 'RGB'.
        indices: The samples to keep (default: all).
    """

    def __init__(self, dataset: Dataset, mode: str, indices: Optional[Sequence[int]] = None):
        self.dataset, self.mode, self.transform = dataset, mode, None
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, target = self.dataset[self.indices[i]]
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    @property
    def label_names(self) -> Optional[List[str]]:
        """The class names in class-index order, where the data set has them."""
        names = getattr(self.dataset, 'classes', None)
        reader = getattr(self.dataset, 'reader', None)
        if names is None and hasattr(reader, 'class_to_idx'):
            names = [c for c, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])]
        return [str(n) for n in names] if names is not None else None


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) as grey PIL images.

    A fixed stratified 80/20 split (seed 0) gives ``train`` and ``validation``; the transform up-samples.

    Args:
        split: 'train' or 'validation'.
    """

    def __init__(self, split: str = 'train'):
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

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image
        return Image.fromarray(self.images[i], mode='L'), self.targets[i]


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


def dataset_name(args: argparse.Namespace) -> str:
    """The data set a run trains on, as recorded with its weights: the --dataset name, the image folder's name, or
    'sklearn-digits'."""
    if args.dataset:
        return args.dataset
    return os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir else 'sklearn-digits'


def _check_dataset_name(name: str) -> None:
    if name.lower() in DATASETS:
        return
    close = difflib.get_close_matches(name.lower(), DATASETS, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise ValueError(f"Unknown --dataset '{name}'{hint}: choose from {', '.join(DATASETS)}, or leave it out to read "
                     "the image folder of --data-dir (scikit-learn's digits without one).")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse a --dataset that is none of ``DATASETS`` and the options its source does not use."""
    if args.dataset:
        _check_dataset_name(args.dataset)
    torch_ds = args.dataset.lower().startswith('torch/')
    if getattr(args, 'dataset_download', False) and not torch_ds:
        raise ValueError('--dataset-download applies to torch/ data sets only (fashion-mnist reads the files of '
                         '--data-dir; torchvision\'s FashionMNIST(download=True) fetches them).')
    split = getattr(args, 'val_split', 'validation')
    if split != 'validation' and not torch_ds and not (args.data_dir and not args.dataset):
        which = 'Fashion-MNIST is evaluated on its test split' if args.dataset else \
            "scikit-learn's digits have one test split (a fixed 20% of the images)"
        raise ValueError(f'--val-split {split}: {which}; --val-split applies to image folders and torch/ data sets.')


def _torch_datasets(args: argparse.Namespace) -> Tuple[Dataset, Dataset]:
    """A torchvision data set by timm's name (``torch/cifar100``), in --data-dir."""
    kw = dict(root=args.data_dir or '.', download=args.dataset_download)
    try:
        return (create_dataset(args.dataset, split='train', is_training=True, **kw),
                create_dataset(args.dataset, split=args.val_split, **kw))
    except RuntimeError as e:  # torchvision: not found (or corrupt) and not downloaded
        raise FileNotFoundError(f"--dataset {args.dataset}: {' '.join(str(e).split())} (looked in --data-dir "
                                f"'{kw['root']}'; --dataset-download fetches it there).") from None


def resolve_datasets(args: argparse.Namespace) -> Tuple[ImageView, ImageView, int]:
    """Train and eval data sets (``ImageView``s in the mode of ``args.in_chans``) and the class count.

    Args:
        args: ``timm-nlp train`` arguments: ``dataset`` (``DATASETS``; '' for an image folder in ``data_dir``, or
            the digits without one), ``data_dir``, ``val_split``, ``dataset_download``, ``in_chans``,
            ``train_subset`` and ``eval_subset`` (fixed, class-balanced subsets), ``num_classes``.
    """
    _check_options(args)
    if args.dataset.lower() == 'fashion-mnist':
        root = args.data_dir or default_fashion_mnist_dir()
        train_ds, eval_ds = fashion_mnist(root, 'train'), fashion_mnist(root, 'test')
    elif args.dataset:
        train_ds, eval_ds = _torch_datasets(args)
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
        train_ds, eval_ds = DigitsDataset('train'), DigitsDataset('validation')
    views = []
    for ds, n, option, split in ((train_ds, args.train_subset, '--train-subset', 'training'),
                                 (eval_ds, args.eval_subset, '--eval-subset', 'test')):
        indices = None
        if n:
            targets = dataset_targets(ds)
            if n > len(targets):
                raise ValueError(f'{option} {n} is larger than the {len(targets)} {split} images.')
            indices = balanced_subset(targets, n, seed=0)
        views.append(ImageView(ds, IMAGE_MODES[args.in_chans], indices))
    names = views[0].label_names
    if args.num_classes is None and names is None:
        raise ValueError('Cannot tell the number of classes of the dataset; pass --num-classes.')
    if args.num_classes is not None and names is not None and args.num_classes < len(names):
        raise ValueError(f'--num-classes {args.num_classes} is fewer than the {len(names)} classes of the training '
                         'data; leave it out to take theirs.')
    return views[0], views[1], args.num_classes or len(names)
