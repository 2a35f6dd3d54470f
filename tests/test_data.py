"""Tests of daso.data: the IDX reader, the MNIST split and the cached ImageFolder data set."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import daso.data.archive as archive
import daso.data.decode as decode
from daso.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    EMBEDDED_MNIST_DIR,
    MNIST_MEAN,
    MNIST_STD,
    ImageFolderDataset,
    cifar10_datasets,
    find_mnist_files,
    mnist_datasets,
    read_idx,
    resolve_imagefolder_root,
)
from daso.errors import DataError

IMAGES_GZ = EMBEDDED_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
LABELS_GZ = EMBEDDED_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
CIFAR_TARBALL = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# --------------------------------------------------------------------------- IDX


def test_read_idx_embedded_images_are_uint8_10000x28x28():
    images = read_idx(IMAGES_GZ)
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0


def test_read_idx_embedded_labels_cover_0_to_9():
    labels = read_idx(LABELS_GZ)
    assert labels.shape == (10000,)
    assert labels.dtype == np.uint8
    assert sorted(np.unique(labels).tolist()) == list(range(10))


def test_read_idx_plain_file_matches_gzip(tmp_path):
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(LABELS_GZ.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), read_idx(LABELS_GZ))


def test_read_idx_roundtrips_a_written_file(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", array)), array)


def test_read_idx_bad_magic_raises(tmp_path):
    raw = bytearray(gzip.decompress(LABELS_GZ.read_bytes()))
    raw[0:4] = (1234).to_bytes(4, "big")
    bad = tmp_path / "bad-labels-idx1-ubyte"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic number 1234"):
        read_idx(bad)


def test_read_idx_truncated_data_raises(tmp_path):
    raw = gzip.decompress(IMAGES_GZ.read_bytes())
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(gzip.compress(raw[:-100], compresslevel=1))
    with pytest.raises(DataError, match="truncated"):
        read_idx(cut)


def test_read_idx_truncated_header_raises(tmp_path):
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


def test_read_idx_trailing_bytes_raise(tmp_path):
    raw = gzip.decompress(LABELS_GZ.read_bytes()) + b"\0\0"
    longer = tmp_path / "long-labels-idx1-ubyte"
    longer.write_bytes(raw)
    with pytest.raises(DataError, match="2 bytes beyond"):
        read_idx(longer)


def test_read_idx_damaged_gzip_raises(tmp_path):
    damaged = tmp_path / "damaged-idx1-ubyte.gz"
    damaged.write_bytes(LABELS_GZ.read_bytes()[:50])
    with pytest.raises(DataError, match="damaged"):
        read_idx(damaged)


def test_read_idx_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nothing-idx3-ubyte.gz")


# --------------------------------------------------------------------------- MNIST split


def _unnormalise(x: torch.Tensor) -> np.ndarray:
    """float32 [N, 1, 28, 28] normalised images back to uint8 [N, 28, 28]."""
    return torch.round((x[:, 0] * MNIST_STD + MNIST_MEAN) * 255).to(torch.uint8).numpy()


def test_mnist_datasets_default_split_is_8000_2000_with_expected_dtypes():
    train, val = mnist_datasets()
    assert len(train) == 8000 and len(val) == 2000
    x, y = train.tensors
    assert x.shape == (8000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (8000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    # normalised with MNIST's mean and std: close to zero mean, unit std
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_mnist_datasets_split_is_seeded_and_deterministic():
    a_train, a_val = mnist_datasets(seed=3)
    b_train, b_val = mnist_datasets(seed=3)
    c_train, _ = mnist_datasets(seed=4)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert torch.equal(a_val.tensors[1], b_val.tensors[1])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])


def test_mnist_datasets_train_and_val_partition_the_images():
    train, val = mnist_datasets(val_size=2500)
    assert len(train) == 7500 and len(val) == 2500
    images, labels = read_idx(IMAGES_GZ), read_idx(LABELS_GZ)

    def rows(x: np.ndarray, y: np.ndarray) -> Counter:
        return Counter(img.tobytes() + bytes([int(lab)]) for img, lab in zip(x, y))

    train_rows = rows(_unnormalise(train.tensors[0]), train.tensors[1].numpy())
    val_rows = rows(_unnormalise(val.tensors[0]), val.tensors[1].numpy())
    assert train_rows + val_rows == rows(images, labels)


@pytest.mark.parametrize("val_size", [0, -1, 10000, 20000, 2.5, True])
def test_mnist_datasets_val_size_out_of_range_raises(val_size):
    with pytest.raises(DataError, match="val_size"):
        mnist_datasets(val_size=val_size)


def test_mnist_datasets_reads_unzipped_files_from_a_folder(tmp_path):
    for src in (IMAGES_GZ, LABELS_GZ):
        (tmp_path / src.name.removesuffix(".gz")).write_bytes(gzip.decompress(src.read_bytes()))
    train, val = mnist_datasets(tmp_path, val_size=100)
    ref_train, ref_val = mnist_datasets(None, val_size=100)
    assert torch.equal(train.tensors[0], ref_train.tensors[0])
    assert torch.equal(val.tensors[1], ref_val.tensors[1])


def test_find_mnist_files_prefers_train_files_over_t10k(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    images, labels = find_mnist_files(tmp_path)
    assert (images.name, labels.name) == (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    )
    train, val = mnist_datasets(tmp_path, val_size=5)
    assert (len(train), len(val)) == (25, 5)


def test_find_mnist_files_ambiguous_folder_raises(tmp_path):
    for prefix in ("a", "b"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    write_idx(tmp_path / "a-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(DataError, match="ambiguous"):
        find_mnist_files(tmp_path)


def test_find_mnist_files_missing_labels_raises(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match="no MNIST labels-idx1 file"):
        mnist_datasets(tmp_path)


def test_mnist_datasets_missing_root_raises(tmp_path):
    with pytest.raises(DataError, match="not a folder") as err:
        mnist_datasets(tmp_path / "missing")
    assert "data.root" in str(err.value) and "root=None" not in str(err.value)


def test_mnist_datasets_count_mismatch_raises(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(DataError, match="3 images but"):
        mnist_datasets(tmp_path, val_size=1)


# --------------------------------------------------------------------------- ImageFolder

# class name -> number of images; sorted class order is ant, bee, cat
CLASSES = {"cat": 3, "ant": 2, "bee": 4}
HEIGHT, WIDTH = 6, 8


def pixels(label: int, index: int) -> np.ndarray:
    """A distinct uint8 [H, W, 3] image for (label, index)."""
    rng = np.random.default_rng(100 * label + index)
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def make_folder(root: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """root/<split>/<class>/<i>.png (lossless) with one extra .jpg per class in train."""
    for split in splits:
        for label, cls in enumerate(sorted(CLASSES)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(CLASSES[cls]):
                Image.fromarray(pixels(label, i)).save(folder / f"{i:02d}.png")
            if split == "train":
                Image.fromarray(pixels(label, 99)).save(folder / "99.jpg", quality=95)
            (folder / "notes.txt").write_text("not an image")
    return root


def make_tarball(folder: Path, tarball: Path, arcname: str = "ds") -> Path:
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return tarball


@pytest.fixture()
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "ds")


def test_imagefolder_labels_follow_sorted_class_names(folder, tmp_path):
    ds = ImageFolderDataset(folder, "train", tmp_path / "cache")
    assert ds.classes == ["ant", "bee", "cat"]
    assert len(ds) == 2 + 4 + 3 + 3  # pngs plus one jpg per class; notes.txt ignored
    assert ds.targets.dtype == torch.int64
    assert ds.targets.tolist() == [0] * 3 + [1] * 5 + [2] * 4
    assert ds.names[:3] == ["ant/00.png", "ant/01.png", "ant/99.jpg"]
    assert ds.images.shape == (12, HEIGHT, WIDTH, 3) and ds.images.dtype == torch.uint8


def test_imagefolder_item_is_normalised_float32_chw(folder, tmp_path):
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    ds = ImageFolderDataset(folder, "test", tmp_path / "cache", mean, std)
    image, label = ds[3]  # bee/01.png
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1
    raw = torch.from_numpy(pixels(1, 1)).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(image, expected)


def test_imagefolder_cache_is_written_then_reused_without_decoding(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = ImageFolderDataset(folder, "train", cache)
    assert first.cache_file is not None and first.cache_file.is_file()
    assert first.cache_file.parent == cache
    mtime = first.cache_file.stat().st_mtime_ns

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache was valid")

    monkeypatch.setattr(decode, "_decode", no_decode)
    second = ImageFolderDataset(folder, "train", cache)
    assert second.cache_file == first.cache_file
    assert first.cache_file.stat().st_mtime_ns == mtime
    assert torch.equal(second.images, first.images)
    assert torch.equal(second.targets, first.targets)
    assert not list(cache.glob("*.tmp"))  # written atomically, no leftovers


def test_imagefolder_changed_folder_rebuilds_the_cache(folder, tmp_path):
    cache = tmp_path / "cache"
    before = ImageFolderDataset(folder, "test", cache)
    Image.fromarray(pixels(0, 7)).save(folder / "test" / "ant" / "07.png")
    after = ImageFolderDataset(folder, "test", cache)
    assert after.cache_file != before.cache_file
    assert len(after) == len(before) + 1


def test_imagefolder_unreadable_cache_is_rebuilt(folder, tmp_path):
    cache = tmp_path / "cache"
    first = ImageFolderDataset(folder, "test", cache)
    first.cache_file.write_bytes(b"garbage")
    second = ImageFolderDataset(folder, "test", cache)
    assert torch.equal(second.images, first.images)


def test_imagefolder_subset_decodes_only_the_chosen_files(folder, tmp_path, monkeypatch):
    calls = []
    real_decode = decode._decode
    monkeypatch.setattr(
        decode, "_decode", lambda src, where: calls.append(where) or real_decode(src, where)
    )
    full = ImageFolderDataset(folder, "train", None)
    calls.clear()
    sub = ImageFolderDataset(folder, "train", tmp_path / "cache", subset=5, seed=1)
    assert len(sub) == 5 and len(calls) == 5
    again = ImageFolderDataset(folder, "train", tmp_path / "cache", subset=5, seed=1)
    other = ImageFolderDataset(folder, "train", tmp_path / "cache", subset=5, seed=2)
    assert again.names == sub.names and other.names != sub.names
    assert len({sub.cache_file, other.cache_file, again.cache_file}) == 2
    for name, image, target in zip(sub.names, sub.images, sub.targets):
        i = full.names.index(name)
        assert torch.equal(image, full.images[i]) and target == full.targets[i]


@pytest.mark.parametrize("subset", [0, 13, -2])
def test_imagefolder_subset_out_of_range_raises(folder, subset):
    with pytest.raises(DataError, match="subset"):
        ImageFolderDataset(folder, "train", None, subset=subset)


def test_imagefolder_augment_is_a_padded_crop_or_flip_and_seeded(folder):
    plain = ImageFolderDataset(folder, "test", None, augment=False)
    aug = ImageFolderDataset(folder, "test", None, augment=True, pad=2)
    torch.manual_seed(0)
    first = [aug[i][0] for i in range(len(aug))]
    torch.manual_seed(0)
    second = [aug[i][0] for i in range(len(aug))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    # every augmented image is a window of the zero-padded (black) image, maybe mirrored
    zero = (0 - 0.5) / 0.5  # a black pixel after normalisation with mean = std = 0.5
    changed = 0
    for i, image in enumerate(first):
        assert image.shape == (3, HEIGHT, WIDTH)
        base = torch.nn.functional.pad(plain[i][0], (2, 2, 2, 2), value=zero)
        windows = [
            w
            for top in range(5)
            for left in range(5)
            for w in (
                base[:, top : top + HEIGHT, left : left + WIDTH],
                base[:, top : top + HEIGHT, left : left + WIDTH].flip(2),
            )
        ]
        assert any(torch.allclose(image, w) for w in windows)
        changed += not torch.equal(image, plain[i][0])
    assert changed > 0


def test_imagefolder_empty_class_folder_raises(folder):
    (folder / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="dog holds no"):
        ImageFolderDataset(folder, "train", None)


def test_imagefolder_missing_split_raises(folder):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(folder, "val", None)


def test_imagefolder_missing_root_raises(tmp_path):
    with pytest.raises(DataError, match="neither a folder nor"):
        ImageFolderDataset(tmp_path / "missing", "train", None)


def test_imagefolder_mismatched_image_size_names_the_file(folder):
    odd = folder / "test" / "cat" / "05.png"
    Image.fromarray(np.zeros((HEIGHT + 1, WIDTH, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(DataError, match=r"cat/05\.png is 8x7"):
        ImageFolderDataset(folder, "test", None)


def test_imagefolder_undecodable_image_names_the_file(folder):
    (folder / "test" / "ant" / "00.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"ant/00\.png"):
        ImageFolderDataset(folder, "test", None)


def test_imagefolder_bad_mean_std_raise(folder):
    with pytest.raises(DataError, match="has 2 values; pass 3"):
        ImageFolderDataset(folder, "test", None, mean=(0.5, 0.5))
    with pytest.raises(DataError, match="non-positive"):
        ImageFolderDataset(folder, "test", None, std=(0.5, 0.0, 0.5))


# --------------------------------------------------------------------------- roots and tarballs


def test_resolve_root_returns_folder_or_descends_into_single_subfolder(folder, tmp_path):
    cache = tmp_path / "cache"
    assert resolve_imagefolder_root(folder, cache) == folder
    assert resolve_imagefolder_root(tmp_path, cache) == folder  # tmp_path holds only ds/
    assert not cache.exists()  # folders need no cache


def test_resolve_root_extracts_tarball_once(folder, tmp_path, monkeypatch):
    tarball = make_tarball(folder, tmp_path / "ds.tar.gz")
    cache = tmp_path / "cache"
    root = resolve_imagefolder_root(tarball, cache)
    assert root.name == "ds" and root.parent.parent == cache
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    assert (root / "train" / "bee" / "03.png").is_file()
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]

    def no_extract(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(archive, "extract_members", no_extract)
    assert resolve_imagefolder_root(tarball, cache) == root
    from_tar = ImageFolderDataset(root, "train", None)
    from_folder = ImageFolderDataset(folder, "train", None)
    assert torch.equal(from_tar.images, from_folder.images)


def test_imagefolder_reads_tarball_directly_like_the_folder(folder, tmp_path):
    tarball = make_tarball(folder, tmp_path / "ds.tgz", arcname="nested/ds")
    cache = tmp_path / "cache"
    from_tar = ImageFolderDataset(tarball, "train", cache, subset=7, seed=5)
    from_folder = ImageFolderDataset(folder, "train", None, subset=7, seed=5)
    assert from_tar.classes == from_folder.classes
    assert from_tar.names == from_folder.names
    assert torch.equal(from_tar.images, from_folder.images)
    assert torch.equal(from_tar.targets, from_folder.targets)
    assert from_tar.files[0] == f"{tarball}/nested/ds/train/{from_tar.names[0]}"
    cached = ImageFolderDataset(tarball, "train", cache, subset=7, seed=5)
    assert cached.files == from_tar.files and torch.equal(cached.images, from_tar.images)


def test_imagefolder_tarball_with_empty_class_raises(folder, tmp_path):
    (folder / "test" / "dog").mkdir()
    tarball = make_tarball(folder, tmp_path / "ds.tar.gz")
    with pytest.raises(DataError, match="test/dog .* holds no"):
        ImageFolderDataset(tarball, "test", None)


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return tarball


def test_resolve_root_refuses_tarball_member_outside_target(tmp_path):
    member = tarfile.TarInfo("../escape/train/a/0.png")
    member.size = 3
    tarball = _tar_with(tmp_path, member, b"abc")
    with pytest.raises(DataError, match="absolute path or '..'"):
        resolve_imagefolder_root(tarball, tmp_path / "cache")
    assert not (tmp_path / "escape").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # temp dir removed


def test_resolve_root_refuses_tarball_symlink(tmp_path):
    member = tarfile.TarInfo("ds/train/a/0.png")
    member.type = tarfile.SYMTYPE
    member.linkname = "/etc/passwd"
    with pytest.raises(DataError, match="link or special"):
        resolve_imagefolder_root(_tar_with(tmp_path, member), tmp_path / "cache")


def test_resolve_root_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_imagefolder_root(tmp_path / "missing.tar.gz", tmp_path / "cache")


def test_resolve_root_rejects_plain_file(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="neither a folder nor"):
        resolve_imagefolder_root(tmp_path / "data.txt", tmp_path / "cache")


def test_resolve_root_empty_class_folder_raises(folder, tmp_path):
    (folder / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="dog holds no"):
        resolve_imagefolder_root(folder, tmp_path / "cache")


def test_resolve_root_given_a_split_folder_explains_the_layout(folder, tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        resolve_imagefolder_root(folder / "train", tmp_path / "cache")


def test_resolve_root_folder_without_splits_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no split folders"):
        resolve_imagefolder_root(tmp_path / "empty", tmp_path / "cache")


def test_cifar10_datasets_on_synthetic_folder_skips_augmenting_test(folder, tmp_path):
    train, test = cifar10_datasets(tmp_path, tmp_path / "cache", augment=True)
    assert train.augment and not test.augment
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    image, _ = test[0]
    raw = torch.from_numpy(pixels(0, 0)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (raw - mean) / std)


def test_cifar10_datasets_mismatched_classes_raise(folder, tmp_path):
    shutil.rmtree(folder / "test" / "cat")
    with pytest.raises(DataError, match="same class folders"):
        cifar10_datasets(folder, tmp_path / "cache")


@pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason=f"real CIFAR-10 not at {CIFAR_TARBALL}")
def test_cifar10_datasets_real_tarball_subsets(tmp_path):
    cache = tmp_path / "cache"
    train, test = cifar10_datasets(CIFAR_TARBALL, cache, train_subset=500, val_subset=200)
    assert (len(train), len(test)) == (500, 200)
    assert train.classes == test.classes == CIFAR_CLASSES
    assert train.images.shape == (500, 32, 32, 3)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert 0 <= int(train.targets.min()) and int(train.targets.max()) <= 9
    assert len(set(train.targets.tolist())) == 10  # a random 500 hits every class
    again, _ = cifar10_datasets(CIFAR_TARBALL, cache, train_subset=500, val_subset=200)
    assert again.cache_file == train.cache_file and torch.equal(again.images, train.images)
