"""Bad data (issue item 5): one folder holding every kind of bad and odd image file, and a list file
with every kind of bad line (the --max_bad_fraction policy is tested in tests/engine/test_bad_data.py)."""

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from mcbeit.data import datasets, images
from mcbeit.data.datasets import (
    BadListFileError,
    ImageDataset,
    TooManyBadImagesError,
    build_classification_dataset,
    build_pretraining_dataset,
    load_rgb_image,
)
from mcbeit.data.masking import RandomMaskGenerator
from mcbeit.data.transforms import TwoViewTransform

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # The bomb is between Pillow's limit and twice it: Pillow warns, mcbeit refuses it.
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]


def rgb_tensor(image, rng):
    """A transform returning the image as it came, a (3, H, W) uint8 tensor."""
    assert image.mode == "RGB"
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few kB that decode to width*height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000))
    idat += compressor.compress(row * (height % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# name -> (bytes, expected (width, height) when it loads, or None when it must be skipped)
def bad_data_files() -> dict[str, tuple[bytes, tuple[int, int] | None]]:
    good = encoded(Image.fromarray(noise(40, 48)), "JPEG", quality=90)
    scan = good.index(b"\xff\xda")  # start of scan: entropy-coded data follows
    middle = (scan + len(good)) // 2
    broken = bytearray(good)
    broken[middle : middle + 64] = b"\xff" * 64  # markers where data should be: libjpeg gives up
    concealed = bytearray(good)
    for i in range(middle, middle + 64):  # flipped bits, no marker made or broken: libjpeg
        if 0xFF not in (concealed[i - 1], concealed[i], concealed[i] ^ 0x5A):  # decodes garbage blocks
            concealed[i] ^= 0x5A  # without an error (Pillow ignores libjpeg's warnings)
    gradient = np.tile(np.arange(256, dtype=np.uint16) * 257, (8, 1))  # 0 .. 65535 along x
    good_png = encoded(Image.fromarray(noise(64, 64, seed=1)), "PNG")
    palette = Image.new("P", (30, 20), 3)
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    return {
        "a/00_good.jpg": (good, (48, 40)),
        "a/01_corrupt.jpg": (bytes(broken), None),
        "a/02_truncated.jpg": (good[: len(good) // 2], None),
        "a/03_zero.jpg": (b"", None),
        "a/04_cmyk.jpg": (encoded(Image.new("CMYK", (24, 20), (0, 255, 255, 0)), "JPEG"), (24, 20)),
        "a/05_gray16.png": (encoded(Image.fromarray(gradient), "PNG"), (256, 8)),
        "a/06_text.jpg": (b"this is not a jpeg, only named like one\n", None),
        "a/07_good.png": (good_png, (64, 64)),
        "b/10_gray.jpg": (encoded(Image.new("L", (20, 30), 77), "JPEG"), (20, 30)),
        "b/11_rgba.png": (encoded(Image.new("RGBA", (20, 10), (10, 200, 30, 128)), "PNG"), (20, 10)),
        "b/12_palette.png": (encoded(palette, "PNG", transparency=3), (30, 20)),
        "b/13_bomb.png": (png_bomb(10_000, 10_000), None),
        "b/14_random.png": (np.random.default_rng(2).bytes(3000), None),
        "b/15_truncated.png": (good_png[: len(good_png) // 2], None),
        "b/16_concealed.jpg": (bytes(concealed), (48, 40)),
        "b/17_gray_alpha.png": (encoded(Image.new("LA", (16, 16), (90, 10)), "PNG"), (16, 16)),
    }


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """An ImageFolder tree (classes a, b) holding every case; returns (root, {name: expected size})."""
    root = tmp_path_factory.mktemp("bad_data")
    expected = {}
    for name, (data, size) in bad_data_files().items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
        expected[name] = size
    return root, expected


@pytest.fixture
def truncation_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def test_bomb_file_is_small_but_over_the_limit(bad_folder):
    root, _ = bad_folder
    assert (root / "b/13_bomb.png").stat().st_size < 100_000
    with Image.open(root / "b/13_bomb.png") as image:  # Pillow only warns at this size
        assert image.size[0] * image.size[1] > Image.MAX_IMAGE_PIXELS == datasets.MAX_PIXELS


def test_each_file_loads_as_rgb_or_raises(bad_folder, truncation_off):
    root, expected = bad_folder
    for name, size in expected.items():
        if size is None:
            with pytest.raises(Exception) as error:
                load_rgb_image(root / name)
            assert not isinstance(error.value, MemoryError), name
        else:
            image = load_rgb_image(root / name)
            assert (image.mode, image.size) == ("RGB", size), name
    with pytest.raises(Image.DecompressionBombError, match="pixels, more than the limit"):
        load_rgb_image(root / "b/13_bomb.png")
    with pytest.raises(OSError, match="truncated"):
        load_rgb_image(root / "a/02_truncated.jpg")


def test_odd_images_convert_to_sensible_rgb(bad_folder):
    root, _ = bad_folder
    sixteen = np.asarray(load_rgb_image(root / "a/05_gray16.png"))
    # 0..65535 mapped onto 0..255, not clipped: the gradient survives, one grey level per column.
    assert np.array_equal(sixteen[3, :, 0], np.arange(256))
    assert (sixteen[..., 0] == sixteen[..., 1]).all() and (sixteen[..., 1] == sixteen[..., 2]).all()
    assert (sixteen == 255).mean() < 0.01
    cmyk = load_rgb_image(root / "a/04_cmyk.jpg").getpixel((5, 5))
    assert np.allclose(cmyk, (255, 0, 0), atol=8)
    assert np.allclose(load_rgb_image(root / "b/10_gray.jpg").getpixel((3, 3)), (77,) * 3, atol=2)
    assert load_rgb_image(root / "b/11_rgba.png").getpixel((1, 1)) == (10, 200, 30)
    assert load_rgb_image(root / "b/12_palette.png").getpixel((1, 1)) == (3, 252, 7)
    assert load_rgb_image(root / "b/17_gray_alpha.png").getpixel((1, 1)) == (90, 90, 90)


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16B", [0, 257, 65535], [0, 1, 255]),
        ("I", [0, 32896, 65535], [0, 128, 255]),  # 16-bit values in a 32-bit image
        ("I", [0, 7, 255], [0, 7, 255]),  # already 8-bit values
        ("I", [-1000, 0, 1000], [0, 128, 255]),  # outside 0..65535: stretched min..max
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
        ("F", [0.0, 2.5e6, 5e6], [0, 128, 255]),
    ],
)
def test_high_depth_modes_scale_to_8_bit(tmp_path, mode, values, expected):
    if mode == "I;16B":
        image = Image.frombytes(mode, (3, 1), np.asarray(values, ">u2").tobytes())
    else:
        image = Image.fromarray(np.asarray([values], np.int32 if mode == "I" else np.float32), mode)
    image.save(tmp_path / "deep.tif")
    rgb = load_rgb_image(tmp_path / "deep.tif")
    assert rgb.mode == "RGB" and [rgb.getpixel((x, 0))[0] for x in range(3)] == expected


def consecutive_bad(bad: list[bool], index: int) -> int:
    count = 0
    while bad[(index + count) % len(bad)]:
        count += 1
    return count


def test_bad_files_skipped_counted_and_warned_once_by_path(bad_folder, truncation_off, caplog):
    root, expected = bad_folder
    dataset = build_pretraining_dataset(root, None, rgb_tensor, seed=0)
    names = [dataset.path(i).relative_to(root).as_posix() for i in range(len(dataset))]
    assert names == sorted(expected) and dataset.classes == ["a", "b"]
    bad = [expected[name] is None for name in names]
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        for epoch in range(2):
            for index in range(len(dataset)):
                image, skipped = dataset[(index, epoch)]
                assert skipped == consecutive_bad(bad, index), names[index]
                loaded = names[(index + skipped) % len(names)]
                width, height = expected[loaded]
                assert image.dtype == torch.uint8 and image.shape == (3, height, width)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == sum(bad)  # one per bad file, although each was skipped in both epochs
    for name in (n for n, is_bad in zip(names, bad, strict=True) if is_bad):
        [message] = [m for m in warnings if str(root / name) in m]
        assert message.startswith("skipping unreadable image") and "Error: " in message
    text = "\n".join(warnings)
    assert "13_bomb.png: DecompressionBombError: 10000x10000 = 100,000,000 pixels" in text
    assert "02_truncated.jpg: OSError: image file is truncated" in text
    assert "03_zero.jpg: UnidentifiedImageError" in text

    # Through the transforms used for training: odd images come out as 3-channel crops.
    two_view = TwoViewTransform(32, 16, "bicubic", "lanczos", (0.5,) * 3, (0.5,) * 3, None,
                                RandomMaskGenerator(4, 0.5))  # fmt: skip
    for name in ("a/04_cmyk.jpg", "a/05_gray16.png", "b/12_palette.png", "b/17_gray_alpha.png"):
        view_a, view_b, mask, skipped = ImageDataset(root, [name], [0], two_view)[0]
        assert view_a.shape == (3, 32, 32) and view_b.shape == (3, 16, 16) and skipped == 0


def test_warnings_shared_by_data_loader_workers(bad_folder, truncation_off, caplog):
    root, expected = bad_folder
    dataset = build_pretraining_dataset(root, "image_folder", rgb_tensor, seed=0)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)  # worker processes: their logs are not captured
    skipped = sum(item[1] for item in loader)
    assert skipped > 0
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        assert sum(dataset[i][1] for i in range(len(dataset))) == skipped  # still counted ...
    assert "skipping unreadable" not in caplog.text  # ... but the workers already warned


def test_truncated_images_fail_even_if_another_library_allows_them(bad_folder, monkeypatch, caplog):
    root, _ = bad_folder
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level(logging.WARNING, logger="mcbeit"), pytest.raises(OSError, match="truncated"):
        load_rgb_image(root / "a/02_truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and "LOAD_TRUNCATED_IMAGES" in caplog.text


def test_pixel_limit_checked_before_decoding(bad_folder, monkeypatch):
    root, _ = bad_folder

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(Image.DecompressionBombError, match="10000x10000"):
        load_rgb_image(root / "b/13_bomb.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 47 * 40)  # the limit is the module's, read each time
    with pytest.raises(Image.DecompressionBombError, match="more than the limit of 1,880"):
        load_rgb_image(root / "a/00_good.jpg")
    monkeypatch.setattr(images, "MAX_PIXELS", None)  # disabled
    with pytest.raises(AssertionError, match="pixels decoded"):
        load_rgb_image(root / "a/00_good.jpg")


def test_too_many_in_a_row_stops_with_a_clear_message(bad_folder, truncation_off, monkeypatch):
    root, _ = bad_folder
    dataset = build_pretraining_dataset(root, None, rgb_tensor, seed=0)
    monkeypatch.setattr(datasets, "MAX_CONSECUTIVE_BAD", 4)  # read when an item is loaded
    assert dataset[1][1] == 3  # bad 01, 02, 03, then the CMYK image: 4 files read
    monkeypatch.setattr(datasets, "MAX_CONSECUTIVE_BAD", 3)
    with pytest.raises(TooManyBadImagesError, match="3 consecutive images"):
        dataset[1]
    with pytest.raises(TooManyBadImagesError, match="3 consecutive images could not be read") as error:
        ImageDataset(root, ["a/01_corrupt.jpg", "a/03_zero.jpg", "a/06_text.jpg", "a/00_good.jpg"], [0] * 4,
                     rgb_tensor)[0]
    message = str(error.value)
    assert "01_corrupt.jpg (index 0)" in message and "06_text.jpg (UnidentifiedImageError" in message
    assert "broken data folder or list file" in message and isinstance(error.value, RuntimeError)


# ----------------------------------------------------------------------------- list files

LIST_LINES = [
    "n01/a.JPEG 0",  # 1
    "n01/missing.JPEG 0",  # 2: no such file
    "n01/b.JPEG zero",  # 3: label not an integer
    "",  # blank: ignored
    "n02/c.JPEG -1",  # 5: negative label
    "lonely.JPEG",  # 6: one field
    "n02/c.JPEG 1",  # 7
    "n03/with space.JPEG 2",  # 8: paths may hold spaces
    "n09/nofolder.JPEG 3",  # 9: no such folder
    "n01/b.JPEG 0",  # 10
]


def write_list(root: Path, list_name: str, split: str, lines: list[str]) -> None:
    for relative in ("n01/a.JPEG", "n01/b.JPEG", "n02/c.JPEG", "n03/with space.JPEG"):
        (root / split / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(12, 10)).save(root / split / relative, format="JPEG")
    (root / list_name).write_text("\n".join(lines) + "\n")


def test_list_file_bad_lines_dropped_counted_and_named(tmp_path, caplog):
    write_list(tmp_path, "train_map.txt", "train", LIST_LINES)
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        dataset = build_pretraining_dataset(tmp_path, None, rgb_tensor, seed=0)
    assert dataset.layout == "IMNET" and dataset.root == tmp_path / "train"
    assert [str(dataset._paths[i]) for i in range(len(dataset))] == [
        "n01/a.JPEG", "n02/c.JPEG", "n03/with space.JPEG", "n01/b.JPEG"]  # fmt: skip
    assert list(dataset.labels) == [0, 1, 2, 0]
    dropped = dataset.dropped_entries
    assert dropped.count == 5 and dropped.total == 9 and dropped.source == str(tmp_path / "train_map.txt")
    assert dropped.line_numbers == (2, 3, 5, 6, 9)
    assert dropped.reasons == {"missing file": 2, "bad label": 2, "malformed": 1}
    assert dropped.examples[0] == "line 2: 'n01/missing.JPEG 0' (missing file)"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(tmp_path / "train_map.txt") in warning and "left out 5 of 9 lines" in warning
    assert "lines 2, 3, 5, 6, 9;" in warning and "'n01/b.JPEG zero' (bad label)" in warning
    assert all(dataset[i][1] == 0 for i in range(len(dataset)))  # nothing left to skip at load time


def test_classification_list_file_and_paths_relative_to_data_path(tmp_path, caplog):
    lines = [line.replace("n0", "val/n0", 1) if line[:2] == "n0" else line for line in LIST_LINES]
    write_list(tmp_path, "val_map.txt", "val", lines)
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        dataset = build_classification_dataset(tmp_path, "IMNET", "val", rgb_tensor)
    assert dataset.root == tmp_path and len(dataset) == 4 and list(dataset.labels) == [0, 1, 2, 0]
    assert dataset.dropped_entries.line_numbers == (2, 3, 5, 6, 9) and "val_map.txt" in caplog.text
    assert build_pretraining_dataset(tmp_path / "val", None, rgb_tensor).dropped_entries.count == 0


def test_list_file_without_a_usable_line(tmp_path):
    write_list(tmp_path, "train_map.txt", "train", ["n01/a.JPEG a", "n01/gone.JPEG 0", "n02/c.JPEG"])
    with pytest.raises(BadListFileError, match="none of its 3 lines is usable") as error:
        build_pretraining_dataset(tmp_path, "IMNET", rgb_tensor)
    message = str(error.value)
    assert "1 missing file, 1 bad label, 1 malformed" in message and "line 1: 'n01/a.JPEG a'" in message
    assert "<integer label >= 0>" in message and isinstance(error.value, ValueError)
