import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from mcbeit.data.datasets import (
    MAX_CONSECUTIVE_BAD,
    ImageDataset,
    build_classification_dataset,
    build_pretraining_dataset,
    load_rgb_image,
)
from mcbeit.errors import InputError
from mcbeit.data.masking import RandomMaskGenerator
from mcbeit.data.samplers import EpochTaggedSampler
from mcbeit.data.transforms import TwoViewTransform


def mean_colour_transform(image, rng):
    """A cheap transform: (mean colour, one random draw, the image size)."""
    assert image.mode == "RGB"
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array.mean(axis=(0, 1))), torch.tensor(rng.random()), image.size


def small_two_view_transform():
    return TwoViewTransform(32, 16, "bicubic", "lanczos", (0.5,) * 3, (0.5,) * 3, None,
                            RandomMaskGenerator(4, 0.5))  # fmt: skip


def write_image(path: Path, colour, size=(40, 30), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


@pytest.fixture
def folder_tree(tmp_path):
    """<tmp>/cats/*.jpg|png, <tmp>/dogs/*.jpg: an ImageFolder at the root."""
    for i in range(3):
        write_image(tmp_path / "cats" / f"c{i}.jpg", (200, 20 * i, 0))
        write_image(tmp_path / "dogs" / f"d{i}.jpg", (0, 20 * i, 200))
    write_image(tmp_path / "cats" / "c9.png", (255, 255, 255))
    (tmp_path / "cats" / "notes.txt").write_text("not an image extension: ignored")
    return tmp_path


def test_image_folder_at_data_path_detected(folder_tree, caplog):
    with caplog.at_level(logging.INFO):
        dataset = build_pretraining_dataset(folder_tree, None, mean_colour_transform, seed=0)
    assert len(dataset) == 7 and dataset.classes == ["cats", "dogs"]
    assert dataset.layout == "image_folder" and dataset.root == folder_tree
    assert "image_folder" in caplog.text and "no class folders under train/" in caplog.text
    colour, _, size, _ = dataset[0]
    assert size == (40, 30) and colour[0] > 150  # a cat: red


def test_train_subfolder_detected(folder_tree, caplog):
    root = folder_tree.parent / "with_splits"
    (root / "train").mkdir(parents=True)
    folder_tree.rename(root / "train" / "imgs")
    write_image(root / "val" / "x" / "v.jpg", (1, 2, 3))
    with caplog.at_level(logging.INFO):
        dataset = build_pretraining_dataset(root, None, mean_colour_transform, seed=0)
    assert dataset.root == root / "train" and len(dataset) == 7
    assert "holds class folders" in caplog.text


def test_explicit_image_folder_at_split_root_warns(tmp_path, caplog):
    write_image(tmp_path / "train" / "a.jpg", (1, 2, 3))
    write_image(tmp_path / "val" / "b.jpg", (1, 2, 3))
    with caplog.at_level(logging.WARNING):
        dataset = build_pretraining_dataset(tmp_path, "image_folder", mean_colour_transform, 0)
    assert len(dataset) == 2 and "look like dataset splits" in caplog.text
    # CIFAR is read like image_folder (as the original pre-training did).
    assert len(build_pretraining_dataset(tmp_path, "CIFAR", mean_colour_transform, 0)) == 2


def test_flat_folder_without_classes(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", (i, i, i))
    dataset = build_pretraining_dataset(tmp_path, None, mean_colour_transform, 0)
    assert len(dataset) == 3


def write_list_layout(root: Path, lines: list[str], images: dict[str, tuple]):
    for relative, colour in images.items():
        write_image(root / "train" / relative, colour)
    (root / "train_map.txt").write_text("\n".join(lines) + "\n")


def test_list_layout_detected_and_missing_file_dropped(tmp_path, caplog):
    images = {"n01/a.JPEG": (255, 0, 0), "n01/b.JPEG": (250, 0, 0), "n02/c.JPEG": (0, 0, 255)}
    lines = ["n01/a.JPEG 0", "", "n01/b.JPEG 0", "n02/missing.JPEG 1", "n02/c.JPEG 1", "   "]
    write_list_layout(tmp_path, lines, images)
    with caplog.at_level(logging.INFO):
        dataset = build_pretraining_dataset(tmp_path, None, mean_colour_transform, 0)
    assert "IMNET" in caplog.text and "train_map.txt" in caplog.text
    assert dataset.layout == "IMNET" and len(dataset) == 3
    assert list(dataset.labels) == [0, 0, 1] and dataset.num_classes == 2
    assert "line 4" in caplog.text and "missing.JPEG" in caplog.text and dataset.dropped_entries.count == 1
    assert [dataset[i][3] for i in range(3)] == [0, 0, 0]  # dropped when built: nothing to skip
    assert dataset[2][0][2] > 150  # c, blue
    assert len(build_pretraining_dataset(tmp_path, "imnet", mean_colour_transform, 0)) == 3


@pytest.mark.parametrize("bad_line", ["n01/a.JPEG", "n01/a.JPEG zero"])
def test_list_layout_malformed_line_dropped_and_named(tmp_path, bad_line, caplog):
    write_list_layout(tmp_path, ["n01/b.JPEG 0", "", bad_line], {"n01/b.JPEG": (1, 1, 1)})
    with caplog.at_level(logging.WARNING):
        dataset = build_pretraining_dataset(tmp_path, "IMNET", mean_colour_transform, 0)
    assert len(dataset) == 1 and "line 3" in caplog.text
    write_list_layout(tmp_path, [bad_line], {})  # no usable line left: an error naming it
    with pytest.raises(ValueError, match="line 1"):
        build_pretraining_dataset(tmp_path, "IMNET", mean_colour_transform, 0)


def test_list_layout_class_names_come_from_classes_txt(tmp_path):
    """Fine-tuning's list layout: <root>/classes.txt names the labels (line 1 = label 0); without it, no names."""
    write_list_layout(tmp_path, ["n01/a.JPEG 0", "n02/c.JPEG 2"], {"n01/a.JPEG": (9, 9, 9), "n02/c.JPEG": (1, 1, 1)})
    train = build_classification_dataset(tmp_path, None, "train", mean_colour_transform)
    assert train.layout == "IMNET list" and train.classes is None and train.num_classes == 3
    (tmp_path / "classes.txt").write_text("\ufefftabby cat\n  goldfish \nspace shuttle\nunused\n\n")  # BOM, blanks at the end
    train = build_classification_dataset(tmp_path, None, "train", mean_colour_transform)
    assert train.classes == ["tabby cat", "goldfish", "space shuttle", "unused"] and train.num_classes == 4


@pytest.mark.parametrize("text, match", [
    ("tabby cat\ngoldfish\n", r"names 2 classes, but .*train_map.txt has labels up to 2 \(3 classes\): add the missing"),
    ("tabby cat\n\ngoldfish\nshuttle\n", r"line\(s\) 2 are blank"),
    ("tabby cat\ngoldfish\ntabby cat\n", r"'tabby cat' names two classes \(lines 1 and 3\)"),
])
def test_list_layout_classes_txt_that_does_not_fit_is_refused(tmp_path, text, match):
    write_list_layout(tmp_path, ["n01/a.JPEG 0", "n02/c.JPEG 2"], {"n01/a.JPEG": (9, 9, 9), "n02/c.JPEG": (1, 1, 1)})
    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(InputError, match=match):
        build_classification_dataset(tmp_path, None, "train", mean_colour_transform)


def test_explicit_imnet_without_list_file(folder_tree):
    with pytest.raises(FileNotFoundError, match="train_map.txt"):
        build_pretraining_dataset(folder_tree, "IMNET", mean_colour_transform, 0)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path"):
        build_pretraining_dataset(tmp_path / "nope", None, mean_colour_transform, 0)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_pretraining_dataset(tmp_path / "empty", None, mean_colour_transform, 0)
    with pytest.raises(ValueError, match="IMNET"):
        build_pretraining_dataset(tmp_path, "imagenet22k", mean_colour_transform, 0)


@pytest.fixture
def messy_folder(tmp_path, monkeypatch):
    """One class folder holding decodable images of many kinds and undecodable files."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    folder = tmp_path / "messy" / "all"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(folder / "a_good.jpg")
    full = (folder / "a_good.jpg").read_bytes()
    (folder / "b_truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "c_zero.jpg").write_bytes(b"")
    (folder / "d_text.jpg").write_text("this is not a jpeg\n")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "e_cmyk.jpg")
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(folder / "f_16bit.png")
    Image.new("L", (20, 20), 77).save(folder / "g_gray.png")
    Image.new("RGBA", (20, 20), (10, 200, 30, 128)).save(folder / "h_rgba.png")
    Image.new("P", (20, 20), 3).save(folder / "i_palette.png")
    return folder.parent


def test_decodable_images_load_as_rgb(messy_folder):
    folder = messy_folder / "all"
    cmyk = load_rgb_image(folder / "e_cmyk.jpg")
    assert cmyk.mode == "RGB" and np.allclose(cmyk.getpixel((5, 5)), (255, 0, 0), atol=8)
    sixteen = load_rgb_image(folder / "f_16bit.png")
    assert sixteen.mode == "RGB" and sixteen.getpixel((5, 5)) == (128, 128, 128)  # scaled, not clipped
    assert load_rgb_image(folder / "g_gray.png").getpixel((1, 1)) == (77, 77, 77)
    assert load_rgb_image(folder / "h_rgba.png").getpixel((1, 1)) == (10, 200, 30)
    assert load_rgb_image(folder / "i_palette.png").mode == "RGB"


def test_bad_files_are_skipped_and_counted(messy_folder, caplog):
    dataset = build_pretraining_dataset(messy_folder, "image_folder", mean_colour_transform, 0)
    names = [dataset.path(i).name for i in range(len(dataset))]
    assert names[:4] == ["a_good.jpg", "b_truncated.jpg", "c_zero.jpg", "d_text.jpg"]
    with caplog.at_level(logging.WARNING):
        skipped = [dataset[(i, 0)][3] for i in range(len(dataset))]
    # b, c, d are bad: from b three are skipped to reach e, from c two, from d one.
    assert skipped == [0, 3, 2, 1, 0, 0, 0, 0, 0]
    for name in ("b_truncated.jpg", "c_zero.jpg", "d_text.jpg"):
        assert name in caplog.text
    assert "a_good.jpg" not in caplog.text
    assert dataset[1][2] == (20, 20)  # the CMYK image stood in for the truncated one


def test_all_bad_files_raise_instead_of_looping(tmp_path):
    folder = tmp_path / "bad" / "x"
    folder.mkdir(parents=True)
    for i in range(MAX_CONSECUTIVE_BAD + 5):
        (folder / f"{i:03d}.jpg").write_bytes(b"")
    dataset = build_pretraining_dataset(tmp_path / "bad", None, mean_colour_transform, 0)
    with pytest.raises(RuntimeError, match=f"{MAX_CONSECUTIVE_BAD} consecutive"):
        dataset[0]
    small = ImageDataset(folder, ["000.jpg", "001.jpg"], [0, 0], mean_colour_transform)
    with pytest.raises(RuntimeError, match="2 consecutive"):
        small[(1, 3)]


def test_keys_seed_samples_by_index_and_epoch(folder_tree):
    dataset = build_pretraining_dataset(folder_tree, None, mean_colour_transform, seed=3)
    draw = lambda key: float(dataset[key][1])  # noqa: E731
    assert draw((2, 0)) == draw((2, 0)) == draw(2)
    assert draw((2, 0)) != draw((2, 1)) and draw((2, 0)) != draw((3, 0))
    other_seed = build_pretraining_dataset(folder_tree, None, mean_colour_transform, seed=4)
    assert float(other_seed[(2, 0)][1]) != draw((2, 0))
    with pytest.raises(IndexError):
        dataset[(len(dataset), 0)]


def _load_by_key(dataset, sampler, epoch, batch_size):
    sampler.set_epoch(epoch)
    keys = list(sampler)  # the inner samplers here iterate the same way twice
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=2)
    out = {}
    batches = list(loader)
    flat = [(a, b, m) for view_a, view_b, mask, _ in batches for a, b, m in zip(view_a, view_b, mask, strict=True)]
    assert len(flat) == len(keys)
    for (index, _), sample in zip(keys, flat, strict=True):
        out[index] = sample
    return out


def test_dataloader_workers_reproducible_and_epoch_dependent(folder_tree):
    dataset = build_pretraining_dataset(folder_tree, None, small_two_view_transform(), seed=0)
    shuffled = [int(i) for i in np.random.default_rng(0).permutation(len(dataset))]
    first = _load_by_key(dataset, EpochTaggedSampler(shuffled), epoch=0, batch_size=2)
    # Another batch size and order: indices land on other workers, samples must not change.
    again = _load_by_key(dataset, EpochTaggedSampler(SequentialSampler(dataset)), 0, batch_size=3)
    next_epoch = _load_by_key(dataset, EpochTaggedSampler(SequentialSampler(dataset)), 1, 3)
    assert first.keys() == again.keys() == set(range(len(dataset)))
    for index in first:
        assert all(torch.equal(x, y) for x, y in zip(first[index], again[index], strict=True))
    changed = [not torch.equal(first[i][2], next_epoch[i][2]) or
               not torch.equal(first[i][0], next_epoch[i][0]) for i in first]  # fmt: skip
    assert sum(changed) >= len(first) - 1


def test_epoch_tagged_sampler_with_distributed_sampler():
    dataset = list(range(10))
    inner = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler = EpochTaggedSampler(inner)
    assert len(sampler) == 5
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    assert all(epoch == 0 for _, epoch in epoch0)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert inner.epoch == 1 and all(epoch == 1 for _, epoch in epoch1)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]  # the shuffle followed the epoch
    plain = EpochTaggedSampler(SequentialSampler(dataset))
    plain.set_epoch(4)  # no set_epoch on the inner sampler: fine
    assert list(plain)[:2] == [(0, 4), (1, 4)]
