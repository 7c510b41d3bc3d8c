"""LightningDataModules. Every batch is a uint8 tensor B×3×H×W (labels are dropped).

Training data are drawn through `uqdm.data_order`: their order and their random crops are functions
of (seed, epoch, index), so a run resumed from any step's checkpoint draws the batches the
interrupted run would have drawn, with any number of workers.
"""

import pickle
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import skimage
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10
from torchvision.datasets.utils import download_and_extract_archive, extract_archive

from uqdm.data_order import Draw, ResumableLoader, as_draw, default_seed
from uqdm.errors import UQDMError
from uqdm.images import box_resize, center_crop, image_files, load_image

SAMPLE_TRAIN_PHOTOS = (
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
SAMPLE_VAL_PHOTOS = ("astronaut.png", "coffee.png")


class ArrayImages(Dataset):
    """Images from uint8 N×3×H×W arrays laid end to end, optionally only those at ``indices``.

    Memory-mapped arrays are read one image at a time.
    """

    def __init__(self, parts: list[np.ndarray], indices: np.ndarray | None = None):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.indices = np.arange(self.starts[-1]) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | Draw) -> torch.Tensor:
        index = int(self.indices[as_draw(key).index])
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return torch.from_numpy(np.array(self.parts[part][index - self.starts[part]]))


def random_crop_flip(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly placed size×size crop, mirrored horizontally with probability 1/2."""
    h, w = image.shape[-2:]
    top, left = (int(torch.randint(n - size + 1, (), generator=generator)) for n in (h, w))
    crop = image[..., top : top + size, left : left + size]
    return (crop.flip(-1) if torch.rand((), generator=generator) < 0.5 else crop).contiguous()


class _ImageDataModule(L.LightningDataModule):
    """Shared loaders: training shuffled (dropping a last partial batch) by a resumable
    `ResumableLoader` seeded with the global generator's seed, validation in a fixed order."""

    def __init__(self, batch_size: int, num_workers: int, val_batch_size: int | None):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._datasets()

    def _datasets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, self.hparams.batch_size, default_seed(),
                               num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.val_set, self.hparams.val_batch_size or self.hparams.batch_size,
                          num_workers=workers, persistent_workers=workers > 0)


class CIFAR10(_ImageDataModule):
    """CIFAR-10, 32×32: the 50 000 training images, and the 10 000 test images for validation; no augmentation.

    ``prepare_data`` extracts ``cifar-10-python.tar.gz`` found in ``data_dir``, or downloads it with torchvision
    (which checks the archive's md5). The batch files in ``cifar-10-batches-py`` (pickled dicts, b"data" N×3072
    uint8) are then read directly, validating their shape but not torchvision's per-file md5s, so any data in
    CIFAR's format works. Like torchvision, this unpickles the files: use only data from a trusted source.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__(batch_size, num_workers, val_batch_size)
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / TorchvisionCIFAR10.base_folder

    def prepare_data(self) -> None:
        archive = self.data_dir / TorchvisionCIFAR10.filename
        if self.folder.is_dir() or not (archive.is_file() or self.hparams.download):
            return
        try:
            if archive.is_file():
                extract_archive(archive, self.data_dir)
            else:
                download_and_extract_archive(
                    TorchvisionCIFAR10.url, self.data_dir, filename=archive.name, md5=TorchvisionCIFAR10.tgz_md5
                )
        except (OSError, RuntimeError, EOFError, tarfile.TarError) as e:
            raise UQDMError(self._missing(f"could not get it: {e}")) from None

    def _missing(self, reason: str) -> str:
        return (
            f"CIFAR-10 not found: put {TorchvisionCIFAR10.filename} (or the extracted "
            f"{TorchvisionCIFAR10.base_folder} folder) in {self.data_dir} ({reason})"
        )

    def _datasets(self) -> tuple[Dataset, Dataset]:
        if not self.folder.is_dir():
            reason = "prepare_data() downloads it" if self.hparams.download else "download is off"
            raise UQDMError(self._missing(reason))
        train = np.concatenate([_read_cifar_batch(self.folder / f"data_batch_{i}") for i in range(1, 6)])
        return ArrayImages([train]), ArrayImages([_read_cifar_batch(self.folder / "test_batch")])


def _read_cifar_batch(path: Path) -> np.ndarray:
    """The images of one CIFAR batch file as an N×3×32×32 uint8 array."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")[b"data"]
    except Exception as e:  # unpickling corrupt data can raise almost anything
        raise UQDMError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UQDMError(f"{path}: b'data' is not a uint8 N×3072 array")
    return data.reshape(-1, 3, 32, 32)


class ImageNet64(_ImageDataModule):
    """The official downsampled ImageNet 64×64: ``*train*.npz`` and ``*val*.npz`` files in ``data_dir``; no augmentation.

    Each file's ``data`` is N×12288 uint8 (row = R, G, B planes of 64×64). Files are taken in natural order
    (``..._2`` before ``..._10``) and memory-mapped when stored uncompressed. ``removed_indices`` names an
    ``.npy`` of global validation indices to drop (e.g. near-duplicates of training images).
    """

    def __init__(
        self,
        data_dir: str,
        removed_indices: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__(batch_size, num_workers, val_batch_size)
        self.data_dir = Path(data_dir)

    def _datasets(self) -> tuple[Dataset, Dataset]:
        train, val = ([_read_npz_images(p) for p in self._files(split)] for split in ("train", "val"))
        removed = self.hparams.removed_indices
        keep = None if removed is None else _kept_indices(sum(len(v) for v in val), Path(removed))
        return ArrayImages(train), ArrayImages(val, keep)

    def _files(self, split: str) -> list[Path]:
        files = sorted(self.data_dir.glob(f"*{split}*.npz"), key=_natural_key)
        if not files:
            raise UQDMError(f"no *{split}*.npz files (downsampled ImageNet 64×64) found in {self.data_dir}")
        return files


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_npz_images(path: Path) -> np.ndarray:
    """The ``data`` of a downsampled-ImageNet .npz as N×3×64×64 uint8 (a memory map if stored uncompressed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("data.npy")
        data = _stored_npy_memmap(path, member) if member.compress_type == zipfile.ZIP_STORED else None
        if data is None:
            with np.load(path, allow_pickle=False) as npz:
                data = npz["data"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UQDMError(f"cannot read {path}: {e}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64:
        raise UQDMError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N×12288")
    return data.reshape(-1, 3, 64, 64)


def _stored_npy_memmap(path: Path, member: zipfile.ZipInfo) -> np.ndarray | None:
    """Memory-map an uncompressed .npy inside a zip; None for .npy versions other than 1.0/2.0 or Fortran order."""
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        f.seek(member.header_offset + 26)  # lengths of name and extra field in the local file header
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(name_length + extra_length, 1)
        version = np.lib.format.read_magic(f)
        if version not in read_header:
            return None
        shape, fortran_order, dtype = read_header[version](f)
        offset = f.tell()
    if fortran_order:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _kept_indices(count: int, removed_path: Path) -> np.ndarray:
    """Indices 0..count−1 without those listed in the .npy file ``removed_path``."""
    try:
        removed = np.load(removed_path, allow_pickle=False).ravel()
    except (OSError, ValueError) as e:
        raise UQDMError(f"cannot read removed indices {removed_path}: {e}") from None
    if removed.dtype.kind not in "iu" or (removed.size and not (0 <= removed.min() and removed.max() < count)):
        raise UQDMError(f"{removed_path}: expected integer indices in [0, {count}) of the validation set")
    return np.setdiff1d(np.arange(count), removed)


class ImageFolder(_ImageDataModule):
    """Any folders of images (searched recursively).

    Training: the image (its short side BOX-resized to ``resize`` if given, or up to ``crop_size`` if smaller),
    a random ``crop_size`` crop, randomly mirrored. Validation: short side BOX-resized to ``resize`` (default
    ``crop_size``), then the central ``crop_size`` crop.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        crop_size: int = 64,
        resize: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__(batch_size, num_workers, val_batch_size)
        if resize is not None and resize < crop_size:
            raise UQDMError(f"ImageFolder: resize ({resize}) must be at least crop_size ({crop_size})")

    def _datasets(self) -> tuple[Dataset, Dataset]:
        hp = self.hparams
        return (
            _RandomFileCrops(image_files(hp.train_dir), hp.crop_size, hp.resize),
            _CenterFileCrops(image_files(hp.val_dir), hp.crop_size, hp.resize or hp.crop_size),
        )


class _RandomFileCrops(Dataset):
    def __init__(self, files: list[Path], crop_size: int, resize: int | None):
        self.files, self.crop_size, self.resize = files, crop_size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | Draw) -> torch.Tensor:
        draw = as_draw(key)
        image = load_image(self.files[draw.index])
        if self.resize is not None or min(image.shape[1:]) < self.crop_size:
            image = box_resize(image, self.resize or self.crop_size)
        return random_crop_flip(image, self.crop_size, draw.generator())


class _CenterFileCrops(Dataset):
    def __init__(self, files: list[Path], crop_size: int, resize: int):
        self.files, self.crop_size, self.resize = files, crop_size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return center_crop(box_resize(load_image(self.files[i]), self.resize), self.crop_size)


class SampleImages(_ImageDataModule):
    """Real RGB photographs shipped in scikit-image's data folder: no download needed.

    The photos are box-downsampled by ``downsample`` (less noise and JPEG artefacts, more content per crop).
    Training: an epoch is ``train_samples`` random ``crop_size`` crops (randomly mirrored) of a uniformly
    chosen photo from ``SAMPLE_TRAIN_PHOTOS``. Validation: ``val_samples`` crops of the held-out
    ``SAMPLE_VAL_PHOTOS`` (taken in turn) at positions drawn once with a fixed seed, the same in every run.
    """

    def __init__(
        self,
        crop_size: int = 32,
        downsample: int = 2,
        train_samples: int = 2048,
        val_samples: int = 64,
        batch_size: int = 128,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__(batch_size, num_workers, val_batch_size)
        if min(crop_size, downsample, train_samples, val_samples) < 1:
            raise UQDMError("SampleImages: crop_size, downsample, train_samples and val_samples must be positive")

    def _datasets(self) -> tuple[Dataset, Dataset]:
        hp = self.hparams
        train, val = ([self._photo(name) for name in names] for names in (SAMPLE_TRAIN_PHOTOS, SAMPLE_VAL_PHOTOS))
        smallest = min(min(p.shape[1:]) for p in train + val)
        if hp.crop_size > smallest:
            raise UQDMError(f"SampleImages: crop_size {hp.crop_size} exceeds the smallest photo side {smallest}")
        return _RandomPhotoCrops(train, hp.crop_size, hp.train_samples), ArrayImages([self._fixed_crops(val)])

    def _photo(self, name: str) -> torch.Tensor:
        image = load_image(Path(skimage.__file__).parent / "data" / name)
        d = self.hparams.downsample
        return image if d == 1 else F.avg_pool2d(image[None].float(), d)[0].round().to(torch.uint8)

    def _fixed_crops(self, photos: list[torch.Tensor], seed: int = 0) -> np.ndarray:
        size, generator = self.hparams.crop_size, torch.Generator().manual_seed(seed)
        crops = []
        for i in range(self.hparams.val_samples):
            photo = photos[i % len(photos)]
            top, left = (int(torch.randint(n - size + 1, (), generator=generator)) for n in photo.shape[1:])
            crops.append(photo[:, top : top + size, left : left + size])
        return torch.stack(crops).numpy()


class _RandomPhotoCrops(Dataset):
    def __init__(self, photos: list[torch.Tensor], crop_size: int, samples: int):
        self.photos, self.crop_size, self.samples = photos, crop_size, samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, key: int | Draw) -> torch.Tensor:
        generator = as_draw(key).generator()
        photo = self.photos[int(torch.randint(len(self.photos), (), generator=generator))]
        return random_crop_flip(photo, self.crop_size, generator)
