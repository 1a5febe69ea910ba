"""Detection transforms: detectron2's LSJ (ResizeScale -> FixedSizeCrop -> flip -> boxes from masks) and the
test-time ResizeShortestEdge + pad, with tv_tensors moving image, boxes and masks together."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from mcbeit.data.det_transforms import (PAD_VALUE, FixedSizeCrop, LSJTrainTransform, ResizePadTestTransform,
                                        masks_to_boxes, resize_shortest_edge_size)

COLOURS = ((230, 20, 20), (20, 230, 20), (20, 20, 230))  # instance k is painted COLOURS[k] on a dark background


def scene(h=90, w=140):
    """A dark RGB image with three solid instances (a rectangle, an ellipse, a small square near the
    right edge), their masks and their boxes; label k + 1 is instance k."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.stack([
        (yy >= 10) & (yy < 40) & (xx >= 15) & (xx < 70),
        ((yy - 60) / 22.0) ** 2 + ((xx - 90) / 30.0) ** 2 < 1,
        (yy >= 5) & (yy < 17) & (xx >= w - 14) & (xx < w - 2),
    ]).astype(np.uint8)                                                                   # (3,h,w)
    pixels = np.full((h, w, 3), 35, np.uint8)
    for k, colour in enumerate(COLOURS):
        pixels[masks[k].astype(bool)] = colour
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    target = {"boxes": np.array(boxes, np.float32), "labels": np.array([1, 2, 3]),
              "iscrowd": np.zeros(3, np.uint8), "masks": masks}
    return Image.fromarray(pixels), target


def extents(masks):
    """Independent box of each mask: [min x, min y, max x + 1, max y + 1]."""
    out = []
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def test_lsj_boxes_are_the_cropped_flipped_masks_extents():
    image, target = scene()
    transform = LSJTrainTransform(size=64)
    clipped = dropped = 0
    flips = set()
    for seed in range(40):
        pixels, out = transform(image, target, np.random.default_rng(seed))
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
        assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
        masks, boxes, labels = out["masks"], out["boxes"], out["labels"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(labels), 64, 64)
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert (out["iscrowd"] == 0).all() and len(out["iscrowd"]) == len(labels)
        assert masks.flatten(1).any(1).all()                                            # no empty instance kept
        assert torch.equal(boxes, extents(masks))                                        # box = mask extent
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
        dropped += 3 - len(labels)
        clipped += int(((boxes == 0) | (boxes == 64)).any(1).sum())
        # the masks moved with the image: the pixels well inside each mask have its instance's colour
        rgb = (pixels * 255).round()
        for mask, label in zip(masks.bool(), labels.tolist(), strict=True):
            inner = mask.clone()
            inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
            if inner.sum() >= 4:
                colour = rgb[:, inner].median(dim=1).values
                assert torch.allclose(colour, torch.tensor(COLOURS[label - 1], dtype=torch.float32), atol=12), \
                    (seed, label, colour)
        # the small square sits at the scene's right edge: after a flip, at its left edge
        scene_width = out["scale"] * 140
        if 3 in labels.tolist() and 16 <= scene_width <= 64:  # the whole scene in view: nothing cropped
            flips.add(bool(boxes[labels == 3][0, 0] < scene_width / 2))
    assert dropped > 0 and clipped > 0 and flips == {False, True}


def test_lsj_scale_follows_resizescale_rule():
    """r = min(S / h, S / w) * U(0.1, 2.0): the resized size over many draws, before the crop."""
    image, target = scene(60, 90)
    size = 64
    transform = LSJTrainTransform(size=size)
    base = min(size / 60, size / 90)
    ratios = []
    for seed in range(300):
        torch.manual_seed(seed)
        resized, _ = transform.resize(image, {})  # the v2 ScaleJitter step, under the global generator
        w, h = resized.size
        assert int(60 * w / 90) <= h <= int(60 * (w + 1) / 90)  # one factor r for both sides, truncated
        ratios.append(w / 90 / base)
    u = np.sort(np.array(ratios))
    assert u.min() >= 0.1 - 1.0 / 90 / base and u.max() <= 2.0
    # uniform on (0.1, 2): the empirical quantiles sit on the line (truncation costs under one pixel)
    expected = 0.1 + 1.9 * (np.arange(len(u)) + 0.5) / len(u)
    assert np.abs(u - expected).max() < 0.2
    assert abs(u.mean() - 1.05) < 0.1
    # and the transform's reported scale is the resize factor of its own draw
    _, out = transform(image, target, np.random.default_rng(3))
    assert base * 0.1 - 0.02 <= out["scale"] <= base * 2.0


def test_same_seed_same_sample_and_torch_state_untouched():
    image, target = scene()
    transform = LSJTrainTransform(size=64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a_pixels, a = transform(image, target, np.random.default_rng([7, 0, 3]))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's torch generator is left alone
    b_pixels, b = transform(image, target, np.random.default_rng([7, 0, 3]))
    assert torch.equal(a_pixels, b_pixels) and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    outs = {transform(image, target, np.random.default_rng([7, 1, s]))[1]["scale"] for s in range(5)}
    assert len(outs) == 5


def test_fixed_size_crop_pads_right_bottom_with_grey_and_zero_masks():
    crop = FixedSizeCrop(64)
    pixels = tv_tensors.Image(torch.randint(0, 255, (3, 30, 40), dtype=torch.uint8))
    mask = torch.zeros(1, 30, 40, dtype=torch.uint8)
    mask[0, 5:20, 10:35] = 1
    boxes = tv_tensors.BoundingBoxes([[10, 5, 35, 20]], format="XYXY", canvas_size=(30, 40))
    state = torch.get_rng_state()
    out, target = crop(pixels, {"boxes": boxes, "masks": tv_tensors.Mask(mask)})
    assert torch.equal(torch.get_rng_state(), state)  # nothing to crop: no draw
    assert out.shape == (3, 64, 64) and torch.equal(out[:, :30, :40], pixels)
    assert (out[:, 30:, :] == PAD_VALUE).all() and (out[:, :, 40:] == PAD_VALUE).all()
    assert target["masks"].shape == (1, 64, 64) and target["masks"].sum() == mask.sum()
    assert torch.equal(target["masks"][:, :30, :40], mask)
    assert target["boxes"].tolist() == [[10, 5, 35, 20]] and target["boxes"].canvas_size == (64, 64)
    # a float image is padded with the same grey in 0..1
    out = crop(tv_tensors.Image(torch.zeros(3, 30, 40)))
    assert torch.allclose(out[:, 40:, :], torch.tensor(PAD_VALUE / 255.0))


def test_fixed_size_crop_crops_randomly_with_one_fraction_for_both_sides():
    height, width, size = 100, 80, 64
    values = torch.arange(height * width, dtype=torch.int32).reshape(1, height, width)  # every pixel unique
    crop = FixedSizeCrop(size)
    offsets = []
    for seed in range(40):
        torch.manual_seed(seed)
        mask = tv_tensors.Mask(values)
        boxes = tv_tensors.BoundingBoxes([[0, 0, width, height], [70, 90, 80, 100]], format="XYXY",
                                         canvas_size=(height, width))
        out, b = crop(mask, boxes)
        assert out.shape == (1, size, size)
        top, left = divmod(int(out[0, 0, 0]), width)
        assert torch.equal(out, values[:, top:top + size, left:left + size])  # a window of the input
        assert 0 <= top <= height - size and 0 <= left <= width - size
        # detectron2 draws one u ~ U(0, 1): top = round(36 u), left = round(16 u)
        u = top / (height - size)
        assert abs(round(16 * u) - left) <= 1
        # boxes shifted by the offset and clipped to the crop
        assert b[0].tolist() == [0, 0, size, size]
        assert b[1].tolist() == [min(70 - left, size), min(90 - top, size), min(80 - left, size), size]
        offsets.append((top, left))
    tops = sorted(t for t, _ in offsets)
    assert tops[0] <= 4 and tops[-1] >= 32 and len(set(offsets)) > 15


def test_masks_to_boxes_extents_and_empty():
    masks = torch.zeros(3, 8, 10, dtype=torch.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[1, 7, 0] = 1
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 7, 1, 8], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, 8, 10, dtype=torch.uint8)).shape == (0, 4)


@pytest.mark.parametrize("h, w, size, expected", [
    (480, 640, 1024, (768, 1024)),   # landscape: the long side binds
    (640, 427, 1024, (1024, 683)),   # portrait, 682.6 rounds up
    (100, 50, 64, (64, 32)),
    (64, 64, 64, (64, 64)),
])
def test_resize_shortest_edge_sizes(h, w, size, expected):
    assert resize_shortest_edge_size(h, w, size, size) == expected


def test_test_transform_resizes_like_pil_pads_grey_and_scale_maps_boxes_back():
    image, target = scene(90, 140)
    pixels, out = ResizePadTestTransform(64)(image, target)
    new_h, new_w = resize_shortest_edge_size(90, 140, 64, 64)                            # (41, 64)
    assert out["scale"] == pytest.approx(min(64 / 90, 64 / 140))
    # the image is PIL's bilinear resize (detectron2's ResizeTransform on uint8), top-left; grey below
    reference = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    got = (pixels[:, :new_h, :new_w] * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(got, reference)
    assert (pixels[:, new_h:, :] * 255).round().eq(PAD_VALUE).all()
    # masks: PIL's nearest at the resized size, zero in the padding
    for k in range(3):
        ref = np.asarray(Image.fromarray(target["masks"][k]).resize((new_w, new_h), Image.NEAREST))
        assert np.array_equal(out["masks"][k, :new_h, :new_w].numpy(), ref)
    assert out["masks"][:, new_h:, :].sum() == 0
    # every annotation kept, and a box divided by scale is back in the original pixels
    assert out["labels"].tolist() == [1, 2, 3]
    assert torch.allclose(out["boxes"] / out["scale"], torch.as_tensor(target["boxes"]), atol=1.5)


def test_test_transform_keeps_crowd_and_needs_no_target():
    image, target = scene(70, 110)
    target["iscrowd"] = np.array([0, 1, 0], np.uint8)
    pixels, out = ResizePadTestTransform(64)(image, target)
    assert out["iscrowd"].tolist() == [0, 1, 0] and pixels.shape == (3, 64, 64)
    pixels, out = ResizePadTestTransform(64)(image)
    assert out["boxes"].shape == (0, 4) and out["scale"] == pytest.approx(64 / 110)
