"""The embedded segmentation data: generated once, atomically and deterministically, in the folder layout the
segmentation dataset reads; classes told apart by texture, not brightness."""

import json
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from mcbeit.data import embedded_seg
from mcbeit.data.embedded_seg import EMBEDDED_SEG_CLASSES, embedded_segmentation_root
from mcbeit.data.seg_transforms import SegTrainTransform
from mcbeit.data.segmentation import build_segmentation_dataset

VERSION = "embedded-seg-v1"


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    """The real embedded segmentation data, generated once for this module into a private cache."""
    cache = tmp_path_factory.mktemp("mcbeit_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MCBEIT_CACHE", str(cache))
        start = time.perf_counter()
        root = embedded_segmentation_root()
        yield cache, root, time.perf_counter() - start


def pairs(root, split):
    for path in sorted((root / "images" / split).glob("*.jpg")):
        image = np.asarray(Image.open(path).convert("L"), np.float32)
        label = np.asarray(Image.open(root / "annotations" / split / f"{path.stem}.png"))
        yield image, label


def test_generated_once_in_the_folder_layout(full_cache):
    cache, root, elapsed = full_cache
    assert elapsed < 10, elapsed
    assert root == cache / VERSION
    assert (root / "classes.txt").read_text().split() == list(EMBEDDED_SEG_CLASSES)
    assert json.loads((root / "COMPLETE.json").read_text())["scenes"] == {"train": 96, "val": 24}
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    sizes, counts = set(), np.zeros(256, np.int64)
    for image, label in pairs(root, "train"):
        assert image.shape == label.shape and all(96 <= side <= 160 for side in label.shape)
        assert len(np.unique(label)) >= 2
        sizes.add(label.shape)
        counts += np.bincount(label.ravel(), minlength=256)
    assert len(sizes) > 20  # varied sizes and aspects
    assert counts[len(EMBEDDED_SEG_CLASSES):].sum() == 0  # 0..4, nothing ignored
    assert (counts[:5] / counts.sum() > 0.07).all(), counts[:5]

    stamp = os.stat(root / "images" / "val" / "scene_0000.jpg").st_mtime_ns
    start = time.perf_counter()
    assert embedded_segmentation_root() == root  # reused, not regenerated
    assert time.perf_counter() - start < 1.0
    assert os.stat(root / "images" / "val" / "scene_0000.jpg").st_mtime_ns == stamp


def test_default_segmentation_dataset_is_the_embedded_scenes(full_cache, monkeypatch):
    cache, root, _ = full_cache
    monkeypatch.setenv("MCBEIT_CACHE", str(cache))
    train = build_segmentation_dataset(None, "train", SegTrainTransform(crop_size=64, img_scale=(256, 64)))
    val = build_segmentation_dataset(None, "val", lambda image, label, rng: (image, label))
    assert (train.root, train.layout, len(train), len(val)) == (root, "folder", 96, 24)
    assert train.num_classes == 5 and train.classes == list(EMBEDDED_SEG_CLASSES) and not train.reduce_zero_label
    image, label, skipped = train[(7, 2)]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64) and skipped == 0
    assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3, 4, 255}


def _interior(label, cls, margin=2):
    """Pixels of ``cls`` whose (2 margin + 1)-square neighbourhood is all ``cls`` (away from blurred edges)."""
    windows = sliding_window_view(np.pad(label, margin, constant_values=255), (2 * margin + 1,) * 2)
    return (windows == cls).all(axis=(-1, -2))


def test_classes_differ_in_texture_not_brightness(full_cache):
    _, root, _ = full_cache
    peaks, means = {c: [] for c in range(5)}, {c: [] for c in range(5)}
    for image, label in pairs(root, "train"):
        gy, gx = np.gradient(image)
        angle, strength = np.degrees(np.arctan2(gy, gx)) % 180, np.hypot(gx, gy)
        for cls in np.unique(label):
            region = _interior(label, cls)
            if region.sum() < 200:
                continue
            hist, _ = np.histogram(angle[region], bins=8, range=(0, 180), weights=strength[region])
            peaks[cls].append(hist.max() / hist.sum())
            means[cls].append(image[region].mean())
    # Stripes' edges run one way: one orientation bin of eight dominates, unlike every other class.
    stripes = np.mean(peaks[1])
    assert stripes > 0.4 and all(np.mean(peaks[c]) < stripes - 0.2 for c in (0, 2, 3, 4)), peaks
    # Brightness does not tell a class: class means differ far less than regions within a class do.
    class_means = [np.mean(means[c]) for c in range(5)]
    spreads = [np.std(means[c]) for c in range(5)]
    assert np.std(class_means) < 0.5 * np.mean(spreads), (class_means, spreads)


@pytest.fixture
def tiny_splits(monkeypatch):
    monkeypatch.setattr(embedded_seg, "SPLITS", {"train": 2, "val": 1})


def test_generation_is_deterministic(tmp_path, tiny_splits):
    first = embedded_seg.generate_embedded_segmentation(tmp_path / "a")
    second = embedded_seg.generate_embedded_segmentation(tmp_path / "b")
    for relative in ("images/train/scene_0001.jpg", "annotations/train/scene_0001.png", "annotations/val/scene_0000.png"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    assert (first / "images/train/scene_0000.jpg").read_bytes() != (first / "images/train/scene_0001.jpg").read_bytes()


def cache_entries(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_stale_incomplete_tree_is_replaced(tmp_path, tiny_splits):
    root = tmp_path / VERSION
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "half_written.jpg").write_bytes(b"")
    assert embedded_segmentation_root(tmp_path) == root
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["scene_0000.jpg", "scene_0001.jpg"]
    assert cache_entries(tmp_path) == [VERSION]


def _race(cache, log):
    log.put(str(embedded_segmentation_root(cache)))


def test_concurrent_processes_generate_once(tmp_path, tiny_splits, monkeypatch):
    calls = tmp_path / "calls.txt"
    real_generate = embedded_seg.generate_embedded_segmentation

    def counting_generate(dest):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_generate(dest)

    monkeypatch.setattr(embedded_seg, "generate_embedded_segmentation", counting_generate)
    context = multiprocessing.get_context("fork")  # the patches above reach the children
    results = context.Queue()
    cache = tmp_path / "cache"
    workers = [context.Process(target=_race, args=(cache, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert {results.get(timeout=5) for _ in workers} == {str(cache / VERSION)}
    assert len(calls.read_text().split()) == 1
    assert cache_entries(cache) == [VERSION]
