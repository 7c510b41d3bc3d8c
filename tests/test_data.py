"""Tests for uqdm.images and uqdm.data, on small fixtures made in tmp_path (no downloads)."""

import pickle
import tarfile
import urllib.error
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

import uqdm.data
from uqdm.data import CIFAR10, SAMPLE_TRAIN_PHOTOS, SAMPLE_VAL_PHOTOS, ImageFolder, ImageNet64, SampleImages
from uqdm.errors import UQDMError
from uqdm.atomic import write_atomic
from uqdm.images import box_resize_center_crop, load_image, load_images, save_png

RNG = np.random.default_rng(0)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def random_rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- images.py


def test_grayscale_becomes_gray_rgb(tmp_path):
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert all(np.array_equal(image[c].numpy(), gray) for c in range(3))


def test_16bit_gray_png_is_scaled_and_rounded(tmp_path):
    values = np.array([[0, 128, 257, 511, 32768, 65535, 1000, 40000]], dtype=np.uint16)
    (tmp_path / "g16.png").write_bytes(imagecodecs.png_encode(values))
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(load_image(tmp_path / "g16.png")[0].numpy(), expected)


def test_16bit_colour_png_is_scaled_not_truncated(tmp_path):
    rgb = RNG.integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    rgb[0, 0] = 511  # high byte 1, but 511·255/65535 rounds to 2
    (tmp_path / "c16.png").write_bytes(imagecodecs.png_encode(rgb))
    expected = np.rint(rgb.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(hwc(load_image(tmp_path / "c16.png")), expected)
    assert expected[0, 0, 0] == 2


def test_16bit_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 2, 4), dtype=np.uint16)
    rgba[0, 0] = (65535, 0, 0, 65535)
    rgba[0, 1] = (0, 0, 0, 0)
    (tmp_path / "a16.png").write_bytes(imagecodecs.png_encode(rgba))
    assert hwc(load_image(tmp_path / "a16.png")).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_palette_image(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (3 * 253))
    img.save(tmp_path / "p.png")
    assert hwc(load_image(tmp_path / "p.png")).tolist() == [
        [[10, 20, 30], [40, 50, 60]],
        [[70, 80, 90], [40, 50, 60]],
    ]
    img.save(tmp_path / "pt.png", transparency=1)
    assert hwc(load_image(tmp_path / "pt.png"))[0, 1].tolist() == [255, 255, 255]


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    alpha = 128 / 255
    blend = [round(c * alpha + 255 * (1 - alpha)) for c in (200, 100, 0)]
    assert hwc(load_image(tmp_path / "a.png")).tolist() == [[[200, 100, 0], [255, 255, 255], blend]]
    Image.fromarray(np.array([[[50, 0]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    assert hwc(load_image(tmp_path / "la.png")).tolist() == [[[255, 255, 255]]]


def test_cmyk_uses_pillow_conversion(tmp_path):
    cmyk = Image.fromarray(RNG.integers(0, 256, (3, 4, 4), dtype=np.uint8), "CMYK")
    cmyk.save(tmp_path / "c.tif")
    assert np.array_equal(hwc(load_image(tmp_path / "c.tif")), np.asarray(cmyk.convert("RGB")))


def test_exif_orientation_is_applied(tmp_path):
    pixels = random_rgb(2, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif)
    image = load_image(tmp_path / "o.png")
    assert image.shape == (3, 3, 2)
    assert np.array_equal(hwc(image), np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png"))))
    assert np.array_equal(hwc(image), np.rot90(pixels, k=-1))


def test_one_pixel_image(tmp_path):
    Image.fromarray(np.array([[[1, 2, 3]]], dtype=np.uint8)).save(tmp_path / "1.png")
    assert load_image(tmp_path / "1.png").tolist() == [[[1]], [[2]], [[3]]]


@pytest.mark.parametrize("content", [b"not an image\n", b"\x89PNG\r\n\x1a\n"])
def test_non_image_raises(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(UQDMError, match="x.png"):
        load_image(tmp_path / "x.png")


def test_truncated_png_raises(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    Image.fromarray(random_rgb(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UQDMError, match="t.png") as info:
        load_image(tmp_path / "t.png")
    assert "\n" not in str(info.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(UQDMError, match="not found.*nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_decompression_bomb_raises(tmp_path, monkeypatch):
    Image.fromarray(random_rgb(10, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(UQDMError, match="too large"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize("w, h, size", [(10, 4, 3), (5, 9, 4), (7, 7, 7), (3, 2, 5)])
def test_box_resize_center_crop_matches_hand_computation(w, h, size):
    pil = Image.fromarray(random_rgb(h, w))
    nw, nh = round(w * size / min(w, h)), round(h * size / min(w, h))
    left, top = (nw - size) // 2, (nh - size) // 2
    expected = np.asarray(pil.resize((nw, nh), Image.BOX))[top : top + size, left : left + size]
    tensor = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    for image in (pil, tensor):
        out = box_resize_center_crop(image, size)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        assert np.array_equal(hwc(out), expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_load_images_npy_layouts(tmp_path, channels_last):
    images = RNG.integers(0, 256, (3, 3, 5, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images.transpose(0, 2, 3, 1) if channels_last else images)
    loaded = load_images(tmp_path / "x.npy")
    assert [name for name, _ in loaded] == ["0", "1", "2"]
    assert all(np.array_equal(image.numpy(), images[i]) for i, (_, image) in enumerate(loaded))


@pytest.mark.parametrize("array", [np.zeros((2, 3, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8)])
def test_load_images_npy_rejects_bad_arrays(tmp_path, array):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UQDMError, match="bad.npy"):
        load_images(tmp_path / "bad.npy")


def test_load_images_folder_is_sorted_and_skips_other_files(tmp_path):
    for name in ("b.png", "a.jpg", "c.PNG"):
        Image.fromarray(random_rgb(4, 4)).save(tmp_path / name, format="PNG" if "png" in name.lower() else "JPEG")
    (tmp_path / "notes.txt").write_text("hi")
    names = [name for name, _ in load_images(tmp_path)]
    assert names == ["a.jpg", "b.png", "c.PNG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UQDMError, match="no images"):
        load_images(tmp_path / "empty")


def test_save_png_is_atomic_and_round_trips(tmp_path):
    image = torch.from_numpy(random_rgb(5, 6)).permute(2, 0, 1)
    target = tmp_path / "deep" / "er" / "out.png"
    save_png(image, target)
    save_png(image.flip(-1), target)  # overwrite
    assert torch.equal(load_image(target), image.flip(-1))
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_write_atomic_failure_leaves_no_temp_file(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UQDMError, match="cannot write"):
        write_atomic(tmp_path / "file" / "x.bin", b"data")
    (tmp_path / "dir.bin").mkdir()
    with pytest.raises(UQDMError, match="cannot write"):
        write_atomic(tmp_path / "dir.bin", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.bin", "file"]


# ---------------------------------------------------------------- data.py


def first_batch(loader) -> torch.Tensor:
    batch = next(iter(loader))
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8
    return batch


def everything(loader) -> torch.Tensor:
    return torch.cat(list(loader))


def make_cifar(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * per_batch}, f, protocol=2)
        batches[name] = data
    return batches


def test_cifar10_reads_batches(tmp_path):
    batches = make_cifar(tmp_path)
    dm = CIFAR10(data_dir=str(tmp_path), download=False, batch_size=8, val_batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 4
    assert first_batch(dm.train_dataloader()).shape == (8, 3, 32, 32)
    val = everything(dm.val_dataloader())
    assert torch.equal(val, torch.from_numpy(batches["test_batch"].reshape(-1, 3, 32, 32)))
    assert torch.equal(dm.train_set[5], torch.from_numpy(batches["data_batch_2"][1].reshape(3, 32, 32)))


def test_cifar10_extracts_local_archive(tmp_path):
    make_cifar(tmp_path / "src")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dm = CIFAR10(data_dir=str(tmp_path / "data"), download=False, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.val_set) == 4


def test_cifar10_missing_offline_raises(tmp_path, monkeypatch):
    dm = CIFAR10(data_dir=str(tmp_path), download=False)
    dm.prepare_data()
    with pytest.raises(UQDMError, match="cifar-10-python.tar.gz"):
        dm.setup("fit")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(uqdm.data, "download_and_extract_archive", offline)
    with pytest.raises(UQDMError, match="cifar-10-python.tar.gz.*no network") as info:
        CIFAR10(data_dir=str(tmp_path), download=True).prepare_data()
    assert "\n" not in str(info.value)


def test_cifar10_rejects_bad_batch(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(UQDMError, match="test_batch"):
        CIFAR10(data_dir=str(tmp_path), download=False).setup("fit")


def imagenet_rows(n: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, 12288), dtype=np.uint8)


def test_imagenet64(tmp_path):
    train2, train10 = imagenet_rows(3), imagenet_rows(2)
    np.savez(tmp_path / "train_data_batch_10.npz", data=train10, labels=np.zeros(2))
    np.savez_compressed(tmp_path / "train_data_batch_2.npz", data=train2, labels=np.zeros(3))
    val = imagenet_rows(6)
    red, green, blue = (np.arange(4096, dtype=np.uint8).reshape(64, 64) + k for k in (0, 85, 170))
    val[0] = np.concatenate([red.ravel(), green.ravel(), blue.ravel()])
    np.savez(tmp_path / "val_data.npz", data=val, labels=np.zeros(6))
    np.save(tmp_path / "removed.npy", np.array([4, 1]))

    dm = ImageNet64(data_dir=str(tmp_path), removed_indices=str(tmp_path / "removed.npy"), batch_size=2)
    dm.setup("fit")
    assert isinstance(dm.train_set.parts[1], np.memmap)  # stored .npz member is memory-mapped
    train = torch.stack([dm.train_set[i] for i in range(len(dm.train_set))])
    assert torch.equal(train.flatten(1), torch.from_numpy(np.concatenate([train2, train10])))  # natural file order
    assert first_batch(dm.train_dataloader()).shape == (2, 3, 64, 64)
    validation = everything(dm.val_dataloader())
    assert torch.equal(validation.flatten(1), torch.from_numpy(val[[0, 2, 3, 5]]))
    assert torch.equal(validation[0], torch.from_numpy(np.stack([red, green, blue])))


def test_imagenet64_missing_files_raise(tmp_path):
    with pytest.raises(UQDMError, match="train"):
        ImageNet64(data_dir=str(tmp_path)).setup("fit")
    np.savez(tmp_path / "train.npz", data=imagenet_rows(1))
    np.savez(tmp_path / "val.npz", data=imagenet_rows(2))
    np.save(tmp_path / "removed.npy", np.array([2]))
    with pytest.raises(UQDMError, match="removed.npy"):
        ImageNet64(data_dir=str(tmp_path), removed_indices=str(tmp_path / "removed.npy")).setup("fit")
    np.savez(tmp_path / "val.npz", data=np.zeros((2, 100), np.uint8))
    with pytest.raises(UQDMError, match="val.npz"):
        ImageNet64(data_dir=str(tmp_path)).setup("fit")


def test_image_folder(tmp_path):
    sizes = {"a.png": (40, 30), "b.jpg": (20, 50), "sub/c.png": (10, 12)}
    for split in ("train", "val"):
        for name, (w, h) in sizes.items():
            path = tmp_path / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_rgb(h, w)).save(path)
    (tmp_path / "train" / "README.txt").write_text("not an image")

    dm = ImageFolder(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), crop_size=16, batch_size=3)
    dm.setup("fit")
    assert first_batch(dm.train_dataloader()).shape == (3, 3, 16, 16)
    files = sorted((tmp_path / "val").rglob("*.*"))
    expected = torch.stack([box_resize_center_crop(load_image(f), 16) for f in files])
    assert torch.equal(everything(dm.val_dataloader()), expected)

    dm = ImageFolder(str(tmp_path / "train"), str(tmp_path / "val"), crop_size=16, resize=24, batch_size=3)
    dm.setup("fit")
    expected = torch.stack([box_resize_center_crop(load_image(f), 24)[:, 4:20, 4:20] for f in files])
    assert torch.equal(everything(dm.val_dataloader()), expected)
    assert first_batch(dm.train_dataloader()).shape == (3, 3, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UQDMError, match="resize"):
        ImageFolder(str(tmp_path), str(tmp_path), crop_size=32, resize=16)
    with pytest.raises(UQDMError, match="not found"):
        ImageFolder(str(tmp_path / "nope"), str(tmp_path), batch_size=1).setup("fit")


def test_sample_images():
    assert not set(SAMPLE_TRAIN_PHOTOS) & set(SAMPLE_VAL_PHOTOS)
    first, second = SampleImages(crop_size=24, val_samples=10, batch_size=16), SampleImages(crop_size=24, val_samples=10)
    first.setup("fit")
    second.setup("validate")
    assert len(first.train_set) == 2048
    assert first_batch(first.train_dataloader()).shape == (16, 3, 24, 24)
    assert len(first.train_dataloader()) == 2048 // 16
    val = everything(first.val_dataloader())
    assert val.shape == (10, 3, 24, 24)
    assert torch.equal(val, everything(second.val_dataloader()))
    assert len({v.float().std().item() for v in val}) == 10  # distinct crops


def test_sample_images_crop_too_large():
    with pytest.raises(UQDMError, match="crop_size"):
        SampleImages(crop_size=4096).setup("fit")


# ---------------------------------------------------------------- data_order.py


def epochs(loader, count: int) -> list[list[torch.Tensor]]:
    """The batches of `count` epochs, with the epoch set as Lightning sets it."""
    out = []
    for epoch in range(count):
        loader.order.set_epoch(epoch)
        out.append([batch.clone() for batch in loader])
    return out


def test_training_batches_are_functions_of_seed_epoch_and_index():
    """The same batches in the main process and in 2 workers, different ones in each epoch and for
    another seed; the global generator is neither used nor disturbed."""
    loaders = {}
    for workers in (0, 2):
        dm = SampleImages(crop_size=8, batch_size=2, train_samples=6, num_workers=workers)
        dm.setup("fit")
        torch.manual_seed(5)
        loaders[workers] = dm.train_dataloader()
    state = torch.get_rng_state()
    main, workers = epochs(loaders[0], 2), epochs(loaders[2], 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for e, f in zip(main, workers) for a, b in zip(e, f))
    assert [len(e) for e in main] == [3, 3]
    assert not torch.equal(torch.cat(main[0]), torch.cat(main[1]))
    torch.manual_seed(6)
    other = dm.train_dataloader()
    assert not torch.equal(torch.cat(epochs(other, 1)[0]), torch.cat(main[0]))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_resumes_from_its_state(tmp_path, workers, monkeypatch):
    """A fresh loader given the state after k batches hands out the batches that followed, without
    reading the skipped items; a state at the end of an epoch continues with the next epoch."""
    np.savez(tmp_path / "train.npz", data=imagenet_rows(7))
    np.savez(tmp_path / "val.npz", data=imagenet_rows(1))
    made = []

    def loader(seed: int):
        dm = ImageNet64(data_dir=str(tmp_path), batch_size=2, num_workers=workers)
        dm.setup("fit")
        made.append(dm)
        torch.manual_seed(seed)
        return dm.train_dataloader()

    uninterrupted = [b for e in epochs(loader(0), 3) for b in e]  # 3 batches an epoch, the 7th image left out
    assert len(uninterrupted) == 9
    # (epoch, batches taken in it, the uninterrupted batches that must follow in the resumed epoch)
    for epoch, taken, following in ((0, 1, slice(1, 3)), (0, 3, slice(3, 6)), (1, 2, slice(5, 6))):
        first = loader(0)
        first.order.set_epoch(epoch)
        batches = iter(first)
        for _ in range(taken):
            next(batches)
        state = first.state_dict()
        assert state == {"seed": 0, "epoch": epoch, "batches": taken}
        resumed = loader(1)  # another global seed: the state's seed wins
        resumed.load_state_dict(state)
        reads = []
        read = uqdm.data.ArrayImages.__getitem__
        monkeypatch.setattr(uqdm.data.ArrayImages, "__getitem__", lambda self, key: reads.append(key) or read(self, key))
        rest = list(resumed)
        monkeypatch.undo()
        assert len(rest) == following.stop - following.start
        if workers == 0:  # (workers read in their own processes)
            assert len(reads) == 2 * len(rest)  # the skipped items were not read
        assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[following]))
