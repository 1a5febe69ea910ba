"""The segmentation transforms against literal restatements of mmcv 1.3.0 / mmseg 0.11, driven by the same
draws: the restatements call numpy's global-RNG API (``random_sample``, ``randint``, ``uniform``, ``rand``),
served here from a Generator seeded like ours, so equal outputs mean equal rules *and* equal draws in
the same order."""

import cv2
import numpy as np
import pytest
import torch

from mcbeit.data.seg_transforms import (IMAGENET_MEAN_255, IMAGENET_STD_255, SegTestTransform, SegTrainTransform,
                                        photometric_distortion, random_crop_box, rescale_size, seg_collate,
                                        setr_rescale_size)


class GlobalRandomAPI:
    """numpy.random's module-level functions, as mmseg calls them, drawing from ``rng``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def random_sample(self):
        return self.rng.random()

    rand = random_sample

    def randint(self, low, high=None):
        return self.rng.integers(low) if high is None else self.rng.integers(low, high)

    def uniform(self, low, high):
        return self.rng.uniform(low, high)


# --- literal restatement of mmcv 1.3.0 image/geometric.py L15-26 (_scale_size) and L117-151 (rescale_size)
def mmcv_rescale_size(old_size, scale):
    w, h = old_size
    max_long_edge = max(scale)
    max_short_edge = min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    return int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)


# --- literal restatement of unilm mmcv_custom/resize_transform.py L173-185 (SETR_Resize, keep_ratio)
def setr_scale(img_shape, scale, crop_size):
    if min(scale) < crop_size[0]:
        new_short = crop_size[0]
    else:
        new_short = min(scale)
    h, w = img_shape[:2]
    if h > w:
        new_h, new_w = new_short * h / w, new_short
    else:
        new_h, new_w = new_short, new_short * w / h
    return (new_h, new_w)


# --- literal restatement of mmseg 0.11 transforms.py L497-551 (RandomCrop), random = GlobalRandomAPI
def mmseg_random_crop(img, seg, crop_size, cat_max_ratio, random, ignore_index=255):
    def get_crop_bbox(img):
        margin_h = max(img.shape[0] - crop_size[0], 0)
        margin_w = max(img.shape[1] - crop_size[1], 0)
        offset_h = random.randint(0, margin_h + 1)
        offset_w = random.randint(0, margin_w + 1)
        return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]

    def crop(img, bbox):
        y1, y2, x1, x2 = bbox
        return img[y1:y2, x1:x2, ...]

    crop_bbox = get_crop_bbox(img)
    if cat_max_ratio < 1.:
        for _ in range(10):
            seg_temp = crop(seg, crop_bbox)
            labels, cnt = np.unique(seg_temp, return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            crop_bbox = get_crop_bbox(img)
    return crop(img, crop_bbox), crop(seg, crop_bbox)


# --- literal restatement of mmseg 0.11 transforms.py L774-870 (PhotoMetricDistortion, defaults), on BGR
def mmseg_photometric(img, random):
    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def contrast(img):
        if random.randint(2):
            return convert(img, alpha=random.uniform(0.5, 1.5))
        return img

    if random.randint(2):
        img = convert(img, beta=random.uniform(-32, 32))
    mode = random.randint(2)
    if mode == 1:
        img = contrast(img)
    if random.randint(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(0.5, 1.5))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if random.randint(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    return img


# --- literal restatement of mmcv 1.3.0 image/photometric.py L24-43 (imnormalize_, to_rgb=True)
def mmcv_imnormalize(img, mean, std):
    img = img.copy().astype(np.float32)
    mean = np.float64(np.array(mean).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(std).reshape(1, -1))
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    return img


def mmseg_train_pipeline(bgr, seg, random, img_scale, crop_size, ratio_range=(0.5, 2.0)):
    """mmseg's ADE20K train pipeline (configs/_base_/datasets/ade20k.py L7-18) from the restatements above;
    Resize per mmseg transforms.py L113-137 + mmcv imrescale, RandomFlip L260-290, Pad (right/bottom)."""
    ratio = random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    new_size = mmcv_rescale_size((bgr.shape[1], bgr.shape[0]), scale)
    bgr = cv2.resize(bgr, new_size, interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, new_size, interpolation=cv2.INTER_NEAREST)
    bgr, seg = mmseg_random_crop(bgr, seg, crop_size, 0.75, random)
    if random.rand() < 0.5:
        bgr, seg = np.flip(bgr, axis=1), np.flip(seg, axis=1).copy()
    bgr = mmseg_photometric(np.ascontiguousarray(bgr), random)
    img = mmcv_imnormalize(bgr, IMAGENET_MEAN_255, IMAGENET_STD_255)
    pad = ((0, crop_size[0] - img.shape[0]), (0, crop_size[1] - img.shape[1]))
    img = np.pad(img, pad + ((0, 0),), constant_values=0)
    seg = np.pad(seg, pad, constant_values=255)
    return img.transpose(2, 0, 1), seg.astype(np.int64)


def blob_scene(height, width, rng, n_classes=4):
    """A textured RGB image with a label of a few rectangles (uint8), shapes vary per rng."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), np.uint8)
    for cls in range(1, n_classes):
        y, x = rng.integers(0, height), rng.integers(0, width)
        label[y:y + rng.integers(5, height), x:x + rng.integers(5, width)] = cls
    label[rng.random((height, width)) < 0.02] = 255
    return image, label


# ----------------------------------------------------------------------------- rescale


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (683, 512), (512, 683), (300, 2000), (2000, 300), (64, 64),
                                 (97, 131)])
def test_rescale_rule_is_mmcv_on_landscape_and_portrait(w, h):
    for ratio in np.linspace(0.5, 2.0, 31):
        scale = (int(2048 * ratio), int(512 * ratio))
        assert rescale_size(w, h, scale) == mmcv_rescale_size((w, h), scale)


def test_rescale_makes_the_short_side_the_short_scale_unless_long_binds():
    assert rescale_size(640, 480, (2048, 512)) == (683, 512)
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)  # portrait: torchvision's ScaleJitter gives 384x512
    assert rescale_size(300, 2000, (2048, 512)) == (307, 2048)  # > 4:1, the long side binds


def test_setr_resize_is_the_original_rule_and_collapses_small_ratios():
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    for h, w in [(480, 640), (640, 480), (512, 683), (300, 2000), (333, 333)]:
        for r in ratios:
            scale = (int(2048 * r), int(512 * r))
            expected = mmcv_rescale_size((w, h), setr_scale((h, w), scale, (512, 512)))
            assert setr_rescale_size(w, h, scale, (512, 512)) == expected
    transform = SegTestTransform(ratios=ratios, crop_size=512)
    shorts = [min(transform.view_size(640, 480, s)) for s in transform.scales]
    assert shorts == [512, 512, 512, 640, 768, 896]
    assert transform.view_size(2000, 300, transform.scales[2]) == (3413, 512)  # no long-side cap


# ----------------------------------------------------------------------------- crop


def test_random_crop_matches_mmseg_draw_for_draw():
    for seed in range(60):
        scene_rng = np.random.default_rng([1, seed])
        image, label = blob_scene(int(scene_rng.integers(20, 60)), int(scene_rng.integers(20, 60)), scene_rng)
        y1, y2, x1, x2 = random_crop_box(label, (32, 32), np.random.default_rng(seed), 0.75)
        _, expected = mmseg_random_crop(image, label, (32, 32), 0.75, GlobalRandomAPI(np.random.default_rng(seed)))
        np.testing.assert_array_equal(label[y1:y2, x1:x2], expected)


def test_crop_retries_ten_checked_then_takes_an_eleventh_unchecked():
    label = np.full((100, 100), 3, np.uint8)  # one class: every crop fails the check
    rng, replay = np.random.default_rng(5), np.random.default_rng(5)
    box = random_crop_box(label, (20, 20), rng, 0.75)
    draws = [(int(replay.integers(0, 81)), int(replay.integers(0, 81))) for _ in range(11)]
    assert (box[0], box[2]) == draws[10]
    assert rng.random() == replay.random()  # exactly 11 boxes drawn, no more

    no_check = np.random.default_rng(5)
    assert random_crop_box(label, (20, 20), no_check, cat_max_ratio=1.0)[::2] == draws[0]


def test_crop_rejects_a_dominant_class_when_a_balanced_crop_exists():
    label = np.zeros((64, 200), np.uint8)
    label[:, 96:104] = 1  # a stripe: only crops of width 32 overlapping it hold two classes
    label[:, :96] = 255  # ignored pixels do not count
    for seed in range(30):
        y1, y2, x1, x2 = random_crop_box(label, (32, 32), np.random.default_rng(seed), 0.75)
        crop = label[y1:y2, x1:x2]
        values, counts = np.unique(crop[crop != 255], return_counts=True)
        if len(values) > 1:
            assert counts.max() / counts.sum() < 0.75


def test_small_image_gives_a_smaller_crop_then_padding_mean_and_ignore():
    image = np.full((20, 30, 3), 77, np.uint8)
    label = np.zeros((20, 30), np.uint8)
    label[:, 15:] = 1
    transform = SegTrainTransform(crop_size=(48, 64), img_scale=(30, 20), ratio_range=None, photometric=False,
                                  flip_prob=0.0)
    out_image, out_label = transform(image, label, np.random.default_rng(0))
    assert out_image.shape == (3, 48, 64) and out_image.dtype == torch.float32
    assert out_label.shape == (48, 64) and out_label.dtype == torch.int64
    assert torch.all(out_image[:, 20:, :] == 0) and torch.all(out_image[:, :, 30:] == 0)  # the mean colour
    assert torch.all(out_label[20:, :] == 255) and torch.all(out_label[:, 30:] == 255)
    expected = (77 - torch.tensor(IMAGENET_MEAN_255)) / torch.tensor(IMAGENET_STD_255)
    torch.testing.assert_close(out_image[:, 5, 5], expected)
    assert out_label[:20, :30].unique().tolist() == [0, 1]


# ----------------------------------------------------------------------------- photometric


def test_photometric_distortion_is_mmsegs_on_bgr_draw_for_draw():
    image_rng = np.random.default_rng(0)
    changed = 0
    for seed in range(80):
        rgb = image_rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        ours = photometric_distortion(rgb.copy(), np.random.default_rng(seed))
        theirs = mmseg_photometric(rgb[:, :, ::-1].copy(), GlobalRandomAPI(np.random.default_rng(seed)))
        np.testing.assert_array_equal(ours, theirs[:, :, ::-1], err_msg=f"seed {seed}")
        changed += not np.array_equal(ours, rgb)
    assert changed > 60  # (1/2)^4 of the draws leave the image as it is


def test_photometric_contrast_is_a_gain_and_truncates():
    rgb = np.array([[[10, 100, 200]]], np.uint8)
    for seed in range(200):  # find a draw doing only the contrast step
        replay = np.random.default_rng(seed)
        brightness, mode = replay.integers(2), replay.integers(2)
        if brightness or mode != 1 or not replay.integers(2):
            continue
        gain = replay.uniform(0.5, 1.5)
        if replay.integers(2) or replay.integers(2):
            continue
        out = photometric_distortion(rgb, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, np.clip(rgb * np.float32(gain), 0, 255).astype(np.uint8))
        return
    pytest.fail("no seed drew contrast alone")


# ----------------------------------------------------------------------------- whole pipelines


def test_train_transform_is_mmsegs_pipeline_draw_for_draw():
    for seed in range(40):
        scene_rng = np.random.default_rng([2, seed])
        h, w = int(scene_rng.integers(30, 90)), int(scene_rng.integers(30, 90))  # landscape and portrait
        rgb, label = blob_scene(h, w, scene_rng)
        transform = SegTrainTransform(crop_size=(40, 48), img_scale=(160, 40))
        image, seg = transform(rgb, label, np.random.default_rng(seed))
        expected_image, expected_seg = mmseg_train_pipeline(rgb[:, :, ::-1].copy(), label,
                                                             GlobalRandomAPI(np.random.default_rng(seed)),
                                                             (160, 40), (40, 48))
        np.testing.assert_array_equal(seg.numpy(), expected_seg, err_msg=f"seed {seed}")
        np.testing.assert_allclose(image.numpy(), expected_image, atol=1e-5, rtol=0)


def test_train_transform_is_deterministic_in_its_rng():
    rgb, label = blob_scene(50, 70, np.random.default_rng(3))
    transform = SegTrainTransform(crop_size=32, img_scale=(128, 32))
    a = transform(rgb, label, np.random.default_rng([0, 1, 2]))
    b = transform(rgb, label, np.random.default_rng([0, 1, 2]))
    c = transform(rgb, label, np.random.default_rng([0, 1, 3]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    state = np.random.get_state()[1].copy()
    transform(rgb, label, np.random.default_rng(9))
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # numpy's global RNG untouched


def test_test_transform_views_flips_and_original_size_label():
    rgb, label = blob_scene(30, 50, np.random.default_rng(4))
    single = SegTestTransform(img_scale=(256, 64), crop_size=64)
    views, out_label = single(rgb, label, None)
    assert len(views) == 1 and views[0][1] is False
    assert views[0][0].shape == (3, 64, 107)  # mmcv's rule: 30x50 -> short side 64
    assert out_label.dtype == torch.int64 and torch.equal(out_label, torch.from_numpy(label.astype(np.int64)))
    expected = mmcv_imnormalize(cv2.resize(rgb[:, :, ::-1].copy(), (107, 64), interpolation=cv2.INTER_LINEAR),
                                IMAGENET_MEAN_255, IMAGENET_STD_255)
    np.testing.assert_allclose(views[0][0].numpy(), expected.transpose(2, 0, 1), atol=1e-5, rtol=0)

    multi = SegTestTransform(img_scale=(256, 64), ratios=(0.5, 1.0, 1.5), flip=True, crop_size=64)
    views, _ = multi(rgb, label, None)
    assert [flipped for _, flipped in views] == [False, True] * 3
    assert [tuple(v.shape[1:]) for v, _ in views[::2]] == [(64, 107), (64, 107), (96, 160)]  # 0.5 -> the crop
    for (plain, _), (mirror, _) in zip(views[::2], views[1::2], strict=True):
        assert torch.equal(mirror, plain.flip(-1))


def test_seg_collate_keeps_sizes_apart():
    views_a, views_b = [(torch.zeros(3, 4, 5), False)], [(torch.zeros(3, 6, 7), True)]
    batch = [(views_a, torch.zeros(4, 5, dtype=torch.int64), 3, 0), (views_b, torch.ones(6, 7, dtype=torch.int64), 8, 2)]
    views, labels, index, skipped = seg_collate(batch)
    assert views == [views_a, views_b] and labels[1].shape == (6, 7)
    assert index.tolist() == [3, 8] and skipped.tolist() == [0, 2] and index.dtype == torch.int64


def test_bad_inputs_are_refused():
    transform = SegTrainTransform(crop_size=8)
    with pytest.raises(ValueError, match="uint8 RGB"):
        transform(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="label"):
        transform(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="ratio_range"):
        SegTrainTransform(ratio_range=(2.0, 0.5))
