"""k-NN / linear-probe measurement on frozen features (issue 15): the DINO k-NN against a plain
reference, the linear probe, the features of a BEiT, and extraction on 1 and 2 gloo processes."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcbeit.data.classification_transforms import build_classification_transform
from mcbeit.data.datasets import build_classification_dataset
from mcbeit.data.samplers import build_eval_loader
from mcbeit.evaluation.knn import beit_features, extract, knn_accuracy, linear_probe_accuracy
from tests.fixtures.micro import register_micro
from tests.tasks.conftest import make_image_folder, free_port

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


# ---------------------------------------------------------------------- k-NN
def _reference_knn(train, train_labels, test, test_labels, num_classes, k, temperature):
    """Per test image, in plain loops: cosine similarities, k best, exp(sim/T) votes, rank of the true class."""
    k = min(k, len(train))
    hits1 = hits5 = 0
    for q, y in zip(test.double(), test_labels.tolist(), strict=True):
        sims = []
        for f, label in zip(train.double(), train_labels.tolist(), strict=True):
            sims.append((float(q @ f / (q.norm() * f.norm())), label))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        better = sum(v > votes[y] for v in votes)
        hits1 += votes[y] > 0 and better < 1
        hits5 += votes[y] > 0 and better < min(5, num_classes)
    return {"top1": 100.0 * hits1 / len(test), "top5": 100.0 * hits5 / len(test)}


@pytest.mark.parametrize("k,chunk", [(20, 7), (5, 128), (1, 3)])
def test_knn_matches_a_per_sample_reference(k, chunk):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(90, 16, generator=g), torch.randn(41, 16, generator=g)
    train_labels, test_labels = torch.randint(0, 10, (90,), generator=g), torch.randint(0, 10, (41,), generator=g)
    got = knn_accuracy(train, train_labels, test, test_labels, 10, k=k, temperature=0.07, chunk=chunk)
    want = _reference_knn(train, train_labels, test, test_labels, 10, k, 0.07)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got["top5"] and got["top1"] <= got["top5"]


def _clusters(n_per_class, num_classes, dim=32, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_knn_separable_clusters_give_100_and_shuffled_labels_give_chance():
    train, train_labels = _clusters(50, 10, seed=0)
    test, test_labels = _clusters(20, 10, seed=0)  # same centres (same seed), fresh noise draws
    test = test + 0.1 * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(train, train_labels, test, test_labels, 10) == {"top1": 100.0, "top5": 100.0}
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(2))]
    chance = knn_accuracy(train, shuffled, test, test_labels, 10)
    assert chance["top1"] < 30 and chance["top5"] < 80  # chance: 10 % and 50 %


def test_knn_k_larger_than_the_train_set_and_few_classes():
    train, train_labels = _clusters(2, 3, seed=3)   # 6 train images, 3 classes: k 20 -> 6, top-5 -> top-3
    test, test_labels = _clusters(4, 3, seed=3)
    got = knn_accuracy(train, train_labels, test, test_labels, 3, k=20)
    assert got == pytest.approx(_reference_knn(train, train_labels, test, test_labels, 3, 20, 0.07))
    assert got["top1"] == 100.0 and got["top5"] == 100.0


# ---------------------------------------------------------------------- linear probe
def test_linear_probe_separates_clusters_and_is_deterministic():
    train, train_labels = _clusters(100, 10, dim=48, seed=4, spread=1.0)
    test, test_labels = _clusters(30, 10, dim=48, seed=4, spread=1.0)
    test = test + 0.3 * torch.randn(test.shape, generator=torch.Generator().manual_seed(5))
    a = linear_probe_accuracy(train, train_labels, test, test_labels, 10, epochs=30, batch_size=256, seed=0)
    b = linear_probe_accuracy(train, train_labels, test, test_labels, 10, epochs=30, batch_size=256, seed=0)
    assert a == b
    assert a["top1"] > 95 and a["top5"] == 100.0
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(6))]
    assert linear_probe_accuracy(train, shuffled, test, test_labels, 10, epochs=30, batch_size=256)["top1"] < 40


# ---------------------------------------------------------------------- features
def _micro(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(register_micro(), img_size=SIZE, vocab_size=64).eval()


def _block_output(model, images, block):
    """blocks[block]'s output tokens (B, 1+N, D), caught by a hook on the model's own forward."""
    caught = []
    handle = model.blocks[block].register_forward_hook(lambda m, i, o: caught.append(o))
    model.forward_features(images)
    handle.remove()
    return caught[0]


@pytest.mark.parametrize("name,kwargs", [
    ("micro", {}),
    ("beit_tiny_patch16_224", dict(img_size=SIZE, depth=3, num_classes=0, global_pool="token")),
    ("vit_tiny_patch16_224", dict(img_size=SIZE, depth=3, num_classes=0, reg_tokens=2)),
])
def test_beit_features_are_the_models_own_tokens(name, kwargs):
    model = _micro() if name == "micro" else timm.create_model(name, **kwargs).eval()
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        feats = beit_features(model, images, block=1)
        tokens = model.forward_features(images)                          # (B, P+N, D), after the final norm
        inner = _block_output(model, images, 1)                          # (B, P+N, D), before any norm
    dim = model.num_features
    assert set(feats) == {"cls", "patch_mean", "cls@1", "patch_mean@1"}
    assert all(v.shape == (3, dim) and v.dtype == torch.float32 for v in feats.values())
    torch.testing.assert_close(feats["cls"], tokens[:, 0])
    torch.testing.assert_close(feats["patch_mean"], tokens[:, prefix:].mean(1))
    torch.testing.assert_close(feats["cls@1"], inner[:, 0])
    torch.testing.assert_close(feats["patch_mean@1"], inner[:, prefix:].mean(1))
    assert not torch.allclose(feats["cls"], feats["cls@1"])
    assert set(beit_features(model, images)) == {"cls", "patch_mean"}
    with pytest.raises(ValueError, match="blocks 0.."):
        beit_features(model, images, block=len(model.blocks))


def test_beit_features_of_the_pretraining_student_ignore_no_mask():
    """The student's forward with an all-False mask gives the same patch tokens as the features."""
    model = _micro()
    images = torch.randn(2, 3, SIZE, SIZE)
    n = model.patch_embed.num_patches
    with torch.no_grad():
        patches, _ = model(images, torch.zeros(2, n, dtype=torch.bool))   # (B, N, D) after the final norm
        feats = beit_features(model, images)
    torch.testing.assert_close(feats["patch_mean"], patches.mean(1))


# ---------------------------------------------------------------------- extraction, 1 and 2 processes
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real JPEG class folders: 16 train images, 15 test images (odd: not divisible by 2 ranks)."""
    root = tmp_path_factory.mktemp("knn")
    train = make_image_folder(root / "train", n_per_class=4, size=80, seed=0)
    test = make_image_folder(root / "test", n_per_class=4, size=80, seed=1)
    sorted((test / "class_3").iterdir())[-1].unlink()
    return train, test


def _loader(folder, world=1, rank=0):
    transform = build_classification_transform(False, SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = build_classification_dataset(folder, "image_folder", "train", transform)
    return build_eval_loader(dataset, batch_size=4, num_workers=0, pin_memory=False, world_size=world, rank=rank)


def _both_splits(model, folders, world=1, rank=0):
    return [extract(model, _loader(f, world, rank), torch.device("cpu"), block=0, sharded=world > 1) for f in folders]


def _worker(rank, world, port, state_path, folders, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _micro()
        model.load_state_dict(torch.load(state_path, weights_only=True))
        torch.save(_both_splits(model, folders, world, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_extract_on_one_and_two_processes_gives_the_same_rows_and_knn(folders, tmp_path):
    model = _micro().train()
    (train_f, train_y), (test_f, test_y) = _both_splits(model, folders)
    assert model.training                                                # mode restored
    assert test_y.shape == (15,) and train_f["cls"].shape == (16, 32) and set(test_f) == {
        "cls", "patch_mean", "cls@0", "patch_mean@0"}
    assert test_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3      # dataset order
    images = torch.stack([image for image, *_ in _loader(folders[1]).dataset])
    with torch.no_grad():
        direct = beit_features(model.eval(), images, block=0)           # one batch, dataset order
    for key in test_f:
        torch.testing.assert_close(test_f[key], direct[key], atol=1e-5, rtol=1e-5)

    state = tmp_path / "model.pt"
    torch.save(model.state_dict(), state)
    mp.spawn(_worker, args=(2, free_port(), str(state), folders, str(tmp_path)), nprocs=2, join=True)
    single_knn = knn_accuracy(train_f["patch_mean"], train_y, test_f["patch_mean"], test_y, 4, k=5)
    for rank in range(2):
        (train_f2, train_y2), (test_f2, test_y2) = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(train_y2, train_y) and torch.equal(test_y2, test_y)   # each image once, in order
        for key in test_f:
            torch.testing.assert_close(train_f2[key], train_f[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(test_f2[key], test_f[key], atol=1e-5, rtol=1e-5)
        assert knn_accuracy(train_f2["patch_mean"], train_y2, test_f2["patch_mean"], test_y2, 4, k=5) == single_knn
