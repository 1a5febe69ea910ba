import json
import multiprocessing
import os
import time

import numpy as np
import pytest
from PIL import Image

from mcbeit.data import embedded
from mcbeit.data.datasets import build_pretraining_dataset
from mcbeit.data.embedded import EMBEDDED_CLASSES, embedded_dataset_root


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    """The real embedded dataset, generated once for this module into a private cache."""
    cache = tmp_path_factory.mktemp("mcbeit_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MCBEIT_CACHE", str(cache))
        start = time.perf_counter()
        root = embedded_dataset_root()
        elapsed = time.perf_counter() - start
        yield cache, root, elapsed


def test_generates_the_class_folders_and_counts(full_cache):
    cache, root, elapsed = full_cache
    print(f"embedded dataset generated in {elapsed:.1f} s")
    assert root == cache / "embedded-v2"
    for split, per_class in (("train", 100), ("val", 20)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(EMBEDDED_CLASSES)
        for name in EMBEDDED_CLASSES:
            assert len(list((root / split / name).glob("*.jpg"))) == per_class
    assert json.loads((root / "COMPLETE.json").read_text())["images_per_class"] == {
        "train": 100, "val": 20,
    }  # fmt: skip
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no temp folders left
    with Image.open(root / "train" / "dots" / "dots_0000.jpg") as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert all(160 <= side <= 224 for side in image.size)
        pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 15  # not a flat image


def test_second_call_reuses_the_tree(full_cache, monkeypatch):
    cache, root, _ = full_cache
    monkeypatch.setenv("MCBEIT_CACHE", str(cache))
    stamp = os.stat(root / "val" / "spots" / "spots_0000.jpg").st_mtime_ns

    def fail(dest):
        raise AssertionError("regenerated an existing dataset")

    monkeypatch.setattr(embedded, "generate_embedded_dataset", fail)
    start = time.perf_counter()
    assert embedded_dataset_root() == root
    assert time.perf_counter() - start < 1.0
    assert os.stat(root / "val" / "spots" / "spots_0000.jpg").st_mtime_ns == stamp


def test_default_pretraining_dataset_is_the_embedded_train_split(full_cache, monkeypatch, caplog):
    cache, root, _ = full_cache
    monkeypatch.setenv("MCBEIT_CACHE", str(cache))
    with caplog.at_level("INFO"):
        dataset = build_pretraining_dataset(None, None, lambda image, rng: (image.size, 0, 0), 0)
    assert dataset.layout == "embedded" and dataset.root == root / "train"
    assert len(dataset) == 1000 and dataset.classes == sorted(EMBEDDED_CLASSES)
    assert "embedded" in caplog.text
    assert dataset[(5, 0)][3] == 0


def _gradient_direction_histogram(path) -> np.ndarray:
    """Where the image's edges point: a histogram of gradient orientation (0-180 degrees, 8 bins),
    weighted by gradient strength, normalised: what tells the stripe classes apart."""
    a = np.asarray(Image.open(path).convert("L").resize((96, 96)), np.float32)
    gy, gx = np.gradient(a)
    angle = np.degrees(np.arctan2(gy, gx)) % 180
    hist, _ = np.histogram(angle, bins=8, range=(0, 180), weights=np.hypot(gx, gy))
    return hist / hist.sum()


def test_classes_differ_in_local_structure_not_in_colour(full_cache):
    _, root, _ = full_cache
    hists = {}
    for name in ("stripes_h", "stripes_v", "stripes_diag", "checkers"):
        paths = sorted((root / "train" / name).glob("*.jpg"))[:10]
        arrays = [np.asarray(Image.open(p), np.float32) for p in paths[:2]]
        assert not np.array_equal(arrays[0], arrays[1])
        hists[name] = np.mean([_gradient_direction_histogram(p) for p in paths], axis=0)
    # Stripes' edges run one way (their gradients point across them): a peak in one bin of eight.
    for name in ("stripes_h", "stripes_v", "stripes_diag"):
        assert hists[name].max() > 0.3, (name, hists[name])
    assert np.argmax(hists["stripes_h"]) != np.argmax(hists["stripes_v"]) != np.argmax(hists["stripes_diag"])
    # Grey: the three channels are equal; brightness does not tell a class (its images span dark and
    # light alike: the class means differ far less than images within a class do).
    means, spreads = [], []
    for name in EMBEDDED_CLASSES:
        pixels = [np.asarray(Image.open(p), np.float32) for p in sorted((root / "train" / name).glob("*.jpg"))[:30]]
        assert all(np.abs(x[..., 0] - x[..., 2]).max() <= 8 for x in pixels), name   # JPEG chroma rounding only
        per_image = [x.mean() for x in pixels]
        means.append(np.mean(per_image))
        spreads.append(np.std(per_image))
    assert np.std(means) < 0.5 * np.mean(spreads), (means, spreads)


def cache_entries(cache):
    """What a cache folder holds, the advisory lock file aside."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def tiny_splits(monkeypatch):
    monkeypatch.setattr(embedded, "SPLITS", {"train": 2, "val": 1})


def test_generation_is_deterministic(tmp_path, tiny_splits):
    first = embedded.generate_embedded_dataset(tmp_path / "a")
    second = embedded.generate_embedded_dataset(tmp_path / "b")
    for name in ("rings", "checkers"):
        relative = f"train/{name}/{name}_0001.jpg"
        assert (first / relative).read_bytes() == (second / relative).read_bytes()


def test_lost_race_uses_the_winners_tree(tmp_path, tiny_splits, monkeypatch):
    real_generate = embedded.generate_embedded_dataset
    root = tmp_path / "embedded-v2"

    def generate_while_another_process_wins(dest):
        real_generate(root)  # the other process renames its complete tree first
        (root / "winner").write_text("theirs")
        return real_generate(dest)

    monkeypatch.setattr(embedded, "generate_embedded_dataset", generate_while_another_process_wins)
    assert embedded_dataset_root(tmp_path) == root
    assert (root / "winner").read_text() == "theirs"
    assert cache_entries(tmp_path) == ["embedded-v2"]  # our temp tree removed


def test_stale_incomplete_tree_is_replaced(tmp_path, tiny_splits):
    root = tmp_path / "embedded-v2"
    (root / "train" / "rings").mkdir(parents=True)
    (root / "train" / "rings" / "half_written.jpg").write_bytes(b"")
    assert embedded_dataset_root(tmp_path) == root
    assert not (root / "train" / "rings" / "half_written.jpg").exists()
    assert len(list((root / "train" / "rings").glob("*.jpg"))) == 2
    assert cache_entries(tmp_path) == ["embedded-v2"]


def _race(cache, log):
    root = embedded_dataset_root(cache)
    log.put(str(root))


def test_concurrent_processes_generate_once(tmp_path, tiny_splits, monkeypatch):
    calls = tmp_path / "calls.txt"
    real_generate = embedded.generate_embedded_dataset

    def counting_generate(dest):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_generate(dest)

    monkeypatch.setattr(embedded, "generate_embedded_dataset", counting_generate)
    context = multiprocessing.get_context("fork")  # the patches above reach the children
    results = context.Queue()
    cache = tmp_path / "cache"
    workers = [context.Process(target=_race, args=(cache, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert {results.get(timeout=5) for _ in workers} == {str(cache / "embedded-v2")}
    assert len(calls.read_text().split()) == 1  # the lock made the others wait and reuse
    assert cache_entries(cache) == ["embedded-v2"]
