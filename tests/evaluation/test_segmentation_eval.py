"""Segmentation evaluation (issue 18): the mIoU areas against torchmetrics and a literal restatement
of mmseg 0.11's metrics, sliding-window inference against mmseg's slide_inference, multi-view
averaging, the evaluation loop on one and two gloo processes, and the pictures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassJaccardIndex

from mcbeit.data.samplers import ShardSampler
from mcbeit.errors import InputError
from mcbeit.evaluation.segmentation import (IoUAccumulator, colourise, evaluate_segmentation, palette, predict,
                                            save_visualisation, slide_logits, slide_windows)
from tests.tasks.conftest import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

C = 6


def _random_maps(seed: int, shapes, num_classes=C):
    """(pred, label) pairs: labels use classes 0..num_classes-3 and 255; predictions also class num_classes-2
    (predicted, never labelled); class num_classes-1 appears nowhere."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in shapes:
        label = torch.randint(0, num_classes - 2, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.15] = 255
        pred = torch.where(torch.rand(h, w, generator=g) < 0.6, label, torch.randint(0, num_classes - 1, (h, w),
                                                                                      generator=g))
        pred[pred == 255] = 0
        out.append((pred, label))
    return out


# ---------------------------------------------------------------------- literal restatements of mmseg 0.11
def _mmseg_intersect_and_union(pred_label, label, num_classes, ignore_index):
    """Literal restatement of mmseg 0.11 core/evaluation/metrics.py L45-59 (intersect_and_union)."""
    mask = (label != ignore_index)
    pred_label = pred_label[mask]
    label = label[mask]
    intersect = pred_label[pred_label == label]
    area_intersect, _ = np.histogram(intersect, bins=np.arange(num_classes + 1))
    area_pred_label, _ = np.histogram(pred_label, bins=np.arange(num_classes + 1))
    area_label, _ = np.histogram(label, bins=np.arange(num_classes + 1))
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def _mmseg_metrics(pairs, num_classes, ignore_index=255):
    """Literal restatement of mmseg 0.11 metrics.py L86-100 + L213-220 (eval_metrics) and custom.py L360-366."""
    total = [np.zeros((num_classes,), dtype=float) for _ in range(4)]
    for pred, label in pairs:
        for t, a in zip(total, _mmseg_intersect_and_union(pred.numpy(), label.numpy(), num_classes, ignore_index),
                        strict=True):
            t += a
    total_area_intersect, total_area_union, _, total_area_label = total
    with np.errstate(invalid="ignore", divide="ignore"):
        all_acc = total_area_intersect.sum() / total_area_label.sum()
        acc = total_area_intersect / total_area_label
        iou = total_area_intersect / total_area_union
    return {"aAcc": all_acc * 100, "mAcc": np.nanmean(acc) * 100, "mIoU": np.nanmean(iou) * 100,
            "Acc": acc * 100, "IoU": iou * 100}


def _mmseg_slide_inference(encode_decode, img, num_classes, crop, stride):
    """Literal restatement of mmseg 0.11 segmentors/encoder_decoder.py L169-203 (slide_inference, no rescale)."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = encode_decode(crop_img)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def _mmseg_aug_test(encode_decode, views, ori_shape, num_classes, crop, stride):
    """Literal restatement of mmseg 0.11 encoder_decoder.py L228-293 (inference with rescale + aug_test)."""
    def inference(img, flip):
        seg_logit = _mmseg_slide_inference(encode_decode, img, num_classes, crop, stride)
        seg_logit = F.interpolate(seg_logit, size=ori_shape, mode="bilinear", align_corners=False)
        output = F.softmax(seg_logit, dim=1)
        if flip:
            output = output.flip(dims=(3,))
        return output

    seg_logit = inference(views[0][0][None], views[0][1])
    for i in range(1, len(views)):
        seg_logit += inference(views[i][0][None], views[i][1])
    seg_logit /= len(views)
    return seg_logit.argmax(dim=1)[0]


# ---------------------------------------------------------------------- mIoU
def test_iou_matches_torchmetrics_on_the_classes_with_a_union():
    pairs = _random_maps(0, [(13, 17), (20, 9), (8, 8)])
    acc = IoUAccumulator(C)
    tm = MulticlassJaccardIndex(num_classes=C, average="none", ignore_index=255)
    tm_macro = MulticlassJaccardIndex(num_classes=C, average="macro", ignore_index=255)
    for pred, label in pairs:
        acc.update(pred, label)
        tm.update(pred, label)
        tm_macro.update(pred, label)
    got = acc.compute()
    want = 100 * tm.compute().double()
    has_union = acc.area_union > 0
    assert has_union.tolist() == [True] * (C - 1) + [False]       # the last class: nowhere
    np.testing.assert_allclose(np.array(got["IoU"])[has_union.numpy()], want[has_union].numpy(), rtol=1e-6)
    assert np.isnan(got["IoU"][C - 1]) and float(want[C - 1]) == 0.0  # mmseg NaN where torchmetrics says 0
    assert got["IoU"][C - 2] == 0.0                                  # predicted, never labelled: counts as 0
    assert got["mIoU"] == pytest.approx(100 * float(tm_macro.compute()), rel=1e-6)


def test_metrics_match_a_literal_restatement_of_mmseg():
    pairs = _random_maps(1, [(11, 15), (7, 30), (16, 16), (5, 4)])
    acc = IoUAccumulator(C)
    for pred, label in pairs[:2]:
        acc.update(pred, label)
    acc.update(torch.stack([pairs[2][0], pairs[2][0]]), torch.stack([pairs[2][1], pairs[2][1]]))  # (B,H,W)
    acc.update(*pairs[3])
    got = acc.compute(class_names=[f"c{i}" for i in range(C)])
    want = _mmseg_metrics(pairs[:3] + pairs[2:], C)
    for key in ("aAcc", "mAcc", "mIoU"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    np.testing.assert_allclose(got["Acc"], want["Acc"], rtol=1e-12)    # NaN at the same places
    np.testing.assert_allclose(got["IoU"], want["IoU"], rtol=1e-12)
    assert np.isnan(got["Acc"][C - 2]) and got["classes"][0] == "c0"
    # mIoU averages over classes with a union (C-1 here), mAcc over labelled classes (C-2)
    assert got["mIoU"] == pytest.approx(np.nansum(got["IoU"]) / (C - 1))
    assert got["mAcc"] == pytest.approx(np.nansum(got["Acc"]) / (C - 2))


def test_accumulator_rejects_bad_input():
    acc = IoUAccumulator(3)
    with pytest.raises(InputError, match="shape"):
        acc.update(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(InputError, match="argmax"):
        acc.update(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(InputError, match="label values .* found 3; check num_classes"):
        acc.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 3], [1, 255]]))
    with pytest.raises(InputError, match="prediction values"):
        acc.update(torch.tensor([[0, -1]]), torch.tensor([[0, 1]]))
    acc.update(torch.tensor([[2, 2]]), torch.tensor([[255, 255]]))     # ignored pixels only: nothing counted
    assert acc.areas.sum() == 0
    with pytest.raises(InputError, match="no labelled pixel"):
        acc.compute()


# ---------------------------------------------------------------------- inference
def _conv(num_classes=C, seed=0, symmetric=False):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, num_classes, 3, padding=1)
    if symmetric:  # mirror-symmetric kernels: conv(flip(x)) = flip(conv(x))
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv


def test_windows_are_mmsegs():
    assert slide_windows(512, 512, 341) == [(0, 512)]
    assert len(slide_windows(683, 512, 341)) == 2 and slide_windows(683, 512, 341)[-1] == (171, 683)
    assert len(slide_windows(2048, 512, 341)) == 6
    assert slide_windows(300, 512, 341) == [(0, 300)]                 # smaller than the crop: one window


@pytest.mark.parametrize("size,window_batch", [((40, 57), 1), ((40, 57), 4), ((16, 30), 2), ((27, 16), 3)])
def test_slide_logits_match_mmseg_slide_inference(size, window_batch):
    conv = _conv()
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        got = slide_logits(conv, image, C, crop=(16, 16), stride=(11, 11), window_batch=window_batch)
        want = _mmseg_slide_inference(conv, image, C, (16, 16), (11, 11))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_slide_pads_windows_smaller_than_the_crop():
    """BEiT decodes crop-sized inputs only: a smaller window is padded with 0 and its logits cropped back."""
    conv = _conv()

    def fixed_grid(x):
        assert x.shape[-2:] == (16, 16), f"not a crop: {tuple(x.shape)}"
        return conv(x)

    image = torch.randn(1, 3, 10, 13)
    with torch.no_grad():
        got = slide_logits(fixed_grid, image, C, crop=16, stride=11)
        torch.testing.assert_close(got, conv(F.pad(image, (0, 3, 0, 6)))[..., :10, :13])
        assert slide_logits(fixed_grid, torch.randn(1, 3, 10, 40), C, crop=16, stride=11).shape == (1, C, 10, 40)
    with pytest.raises(InputError, match="expected"):
        slide_logits(lambda x: conv(x)[:, :, ::2], image, C, crop=16, stride=11)


def test_predict_averages_softmaxes_over_views_like_mmseg_aug_test():
    conv = _conv(seed=3)
    g = torch.Generator().manual_seed(3)
    ori = (23, 31)
    small, large = torch.randn(3, 20, 27, generator=g), torch.randn(3, 34, 46, generator=g)
    views = [(small, False), (small.flip(-1), True), (large, False), (large.flip(-1), True)]
    with torch.no_grad():
        got = predict(conv, views, ori, C, crop=(16, 16), stride=(11, 11), window_batch=3)
        want = _mmseg_aug_test(conv, views, ori, C, (16, 16), (11, 11))
        one = predict(conv, views[2:3], ori, C, crop=(16, 16), stride=(11, 11))
        one_want = _mmseg_aug_test(conv, views[2:3], ori, C, (16, 16), (11, 11))
        whole = predict(conv, views[2:3], ori, C, mode="whole")
    assert got.shape == ori and got.dtype == torch.long
    assert torch.equal(got, want) and torch.equal(one, one_want)
    assert not torch.equal(got, one)                                   # the other views changed something
    want_whole = F.interpolate(conv(large[None]), size=ori, mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(whole, want_whole)


def test_a_flipped_view_is_flipped_back():
    """Mirror-symmetric kernels and windows (38 = 16 + 2 x 11): a flipped view, flipped back, is the plain one."""
    symmetric = _conv(seed=5, symmetric=True)
    image = torch.randn(3, 24, 38)
    with torch.no_grad():
        plain = predict(symmetric, [(image, False)], (24, 38), C, crop=16, stride=11)
        flipped_only = predict(symmetric, [(image.flip(-1), True)], (24, 38), C, crop=16, stride=11)
        both = predict(symmetric, [(image, False), (image.flip(-1), True)], (24, 38), C, crop=16, stride=11)
    assert torch.equal(flipped_only, plain) and torch.equal(both, plain)
    assert not torch.equal(plain, plain.flip(-1))


# ---------------------------------------------------------------------- the loop, 1 and 2 processes
class _Items(Dataset):
    """Eval items as the data pipeline yields them: (views, label at the original size, index, n_skipped)."""

    def __init__(self, n=5):
        g = torch.Generator().manual_seed(7)
        self.items = []
        for i in range(n):
            h, w = 14 + 3 * i, 25 - 2 * i
            label = torch.randint(0, C - 1, (h, w), generator=g)
            label[: i + 1, :] = 255
            view = torch.randn(3, 16 + i, 20, generator=g)
            self.items.append(([(view, False)] + ([(view.flip(-1), True)] if i % 2 else []), label, i, i % 3 == 1))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _lists(batch):
    """Batch-size-1 collation as lists, as the segmentation loader does."""
    return tuple(list(field) for field in zip(*batch, strict=True))


def _loader(world=1, rank=0):
    data = _Items()
    return DataLoader(data, sampler=ShardSampler(len(data), world, rank), batch_size=1, collate_fn=_lists)


def _evaluate(loader, sharded=False, visualise=0):
    return evaluate_segmentation(_conv(), loader, C, torch.device("cpu"), sharded=sharded, crop=(16, 16),
                                 stride=(11, 11), visualise=visualise)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _evaluate(_loader(world, rank), sharded=True, visualise=5)
        result["visualisation"] = [[torch.from_numpy(a) for a in t] for t in result["visualisation"]]
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluate_counts_each_image_once_on_one_and_two_processes(tmp_path):
    model = _conv().train()
    single = evaluate_segmentation(model, _loader(), C, torch.device("cpu"), crop=16, stride=11, visualise=2)
    assert model.training                                              # its mode restored
    data = _Items()
    direct = IoUAccumulator(C)
    with torch.no_grad():
        for views, label, _, _ in data:
            direct.update(predict(model, views, tuple(label.shape), C, crop=16, stride=11), label)
    want = direct.compute()
    assert {k: single[k] for k in ("mIoU", "mAcc", "aAcc")} == pytest.approx({k: want[k] for k in ("mIoU", "mAcc",
                                                                                                   "aAcc")})
    assert (single["images"], single["skipped_images"]) == (5, 2)
    triples = single["visualisation"]
    assert len(triples) == 2 and triples[1][0].shape == (17, 23, 3) and triples[1][0].dtype == np.uint8
    assert np.array_equal(triples[1][1], data[1][1].numpy()) and triples[1][2].shape == (17, 23)

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert (result["images"], result["skipped_images"]) == (5, 2)
        for key in ("mIoU", "mAcc", "aAcc"):
            assert result[key] == pytest.approx(single[key], rel=1e-12)
        np.testing.assert_allclose(result["IoU"], single["IoU"], rtol=1e-12)
    # rank 0 shows the first images of its shard (0, 2, 4), the others none
    assert [t[1].shape for t in ranks[0]["visualisation"]] == [data[i][1].shape for i in (0, 2, 4)]
    assert ranks[1]["visualisation"] == []


# ---------------------------------------------------------------------- pictures
def test_palette_and_colourise():
    ade = palette(150)
    assert ade.shape == (150, 3) and ade[0].tolist() == [120, 120, 120] and ade[149].tolist() == [92, 0, 255]
    small = palette(5)
    assert len({tuple(c) for c in small.tolist()}) == 5 and (small.sum(1) > 0).all()   # distinct, none black
    picture = colourise(torch.tensor([[0, 4], [255, 2]]), 5)
    assert picture.dtype == np.uint8 and picture.shape == (2, 2, 3)
    assert picture[0, 1].tolist() == small[4].tolist() and picture[1, 0].tolist() == [0, 0, 0]


def test_save_visualisation_writes_the_grid(tmp_path):
    g = np.random.default_rng(0)
    label = g.integers(0, 5, (30, 50))
    pred = label.copy()
    pred[:10] = 3
    triples = [(g.integers(0, 256, (30, 50, 3), dtype=np.uint8), label, pred),
               (g.integers(0, 256, (12, 8, 3), dtype=np.uint8), np.full((12, 8), 255), np.zeros((12, 8), int))]
    grid = save_visualisation(tmp_path / "vis" / "val.png", triples, 5, max_side=40, gap=2)
    assert grid.shape == (24 + 2 + 12, 3 * 40 + 2 * 2, 3)              # the first row shrunk to 40 x 24
    assert np.array_equal(np.asarray(Image.open(tmp_path / "vis" / "val.png")), grid)
    assert (grid[26:38, 10:18] == 0).all()                              # second row, ground truth: all ignored
    assert (grid[26:38, 20:28] == palette(5)[0]).all()                  # second row, prediction: class 0
    assert (grid[0:6, 84:124] == palette(5)[3]).all()                   # first row, prediction's top: class 3
    with pytest.raises(InputError, match="visualise"):
        save_visualisation(None, [], 5)
