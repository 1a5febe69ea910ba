import functools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mcbeit.data.datasets import build_pretraining_dataset
from mcbeit.data.masking import BlockMaskGenerator, RandomMaskGenerator
from mcbeit.data.transforms import TwoViewTransform, parse_interpolation, sample_crop_box
from tests.tasks.conftest import make_image_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUADRANT_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.float32)


def quadrant_image(width=320, height=256) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 2, : width // 2] = QUADRANT_COLOURS[0]
    array[: height // 2, width // 2 :] = QUADRANT_COLOURS[1]
    array[height // 2 :, : width // 2] = QUADRANT_COLOURS[2]
    array[height // 2 :, width // 2 :] = QUADRANT_COLOURS[3]
    return Image.fromarray(array)


def dall_e_map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return x * (1 - 2 * eps) + eps


def make_transform(**overrides) -> TwoViewTransform:
    kwargs = dict(
        input_size=224, second_input_size=112, train_interpolation="bicubic",
        second_interpolation="lanczos", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        tokenizer_transform=None, mask_generator=RandomMaskGenerator(14, 0.75),
    )  # fmt: skip
    kwargs.update(overrides)
    return TwoViewTransform(**kwargs)


def colour_labels(rgb_chw: np.ndarray) -> np.ndarray:
    """Index of the nearest quadrant colour for every pixel of a (3,H,W) array in [0,255]."""
    distance = ((rgb_chw[None] - QUADRANT_COLOURS[:, :, None, None]) ** 2).sum(axis=1)
    return distance.argmin(axis=0)


def test_views_come_from_the_same_box():
    transform = make_transform()
    image = quadrant_image()
    for seed in range(40):
        view_a, view_b, _ = transform(image, np.random.default_rng(seed))
        a = (view_a.numpy() * 0.5 + 0.5) * 255  # undo the 0.5/0.5 normalisation
        b = view_b.numpy() * 255
        labels_a = colour_labels(a)[::2, ::2]  # 224 -> 112
        labels_b = colour_labels(b)
        assert (labels_a == labels_b).mean() > 0.97, seed


def test_sizes_and_normalisation_ranges():
    transform = make_transform(
        input_size=(224, 160), second_input_size=(112, 80), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        tokenizer_transform=dall_e_map_pixels,
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    view_a, view_b, mask = transform(image, rng)
    assert view_a.shape == (3, 224, 160) and view_a.dtype == torch.float32
    assert view_b.shape == (3, 112, 80) and view_b.dtype == torch.float32
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for c in range(3):
        assert low[c] - 1e-5 <= view_a[c].min() and view_a[c].max() <= high[c] + 1e-5
    assert view_a.min() < -1.5 and view_a.max() > 1.5  # random pixels reach the extremes
    assert 0.1 - 1e-6 <= view_b.min() and view_b.max() <= 0.9 + 1e-6  # DALL-E pixel map
    assert mask.shape == (196,) and mask.dtype == torch.bool and mask.sum() == 147


def test_default_normalisation_is_half_half():
    view_a, view_b, _ = make_transform()(quadrant_image(), np.random.default_rng(0))
    assert view_a.min() >= -1 - 1e-6 and view_a.max() <= 1 + 1e-6
    assert view_b.min() >= 0 and view_b.max() <= 1


def test_flip_equals_flipping_the_image_before_the_crop():
    """flip_prob=1 must equal torchvision's order: flip the whole image, then crop the box."""
    rng0 = np.random.default_rng(0)
    image = Image.fromarray(rng0.integers(0, 256, (180, 240, 3), dtype=np.uint8))
    flipped_image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    always, never = make_transform(flip_prob=1.0), make_transform(flip_prob=0.0)
    for seed in range(10):
        a_flip, b_flip, m_flip = always(image, np.random.default_rng(seed))
        a_ref, b_ref, m_ref = never(flipped_image, np.random.default_rng(seed))
        assert torch.equal(a_flip, a_ref) and torch.equal(b_flip, b_ref)
        assert torch.equal(m_flip, m_ref)


def test_default_flips_about_half_the_time():
    transform = make_transform(input_size=64, second_input_size=32)
    image = quadrant_image()
    flips = checked = 0
    for seed in range(200):
        view_a, _, _ = transform(image, np.random.default_rng(seed))
        flips += bool(np.random.default_rng(seed).random() < 0.5)
        labels = colour_labels((view_a.numpy() * 0.5 + 0.5) * 255)
        # Red (0) / blue (2) belong left; after a flip they are on the right.
        left = np.isin(labels[:, :32], (0, 2)).mean() - np.isin(labels[:, 32:], (0, 2)).mean()
        if abs(left) > 0.2:  # the crop straddles the vertical midline
            checked += 1
            assert (left < 0) == (np.random.default_rng(seed).random() < 0.5)
    assert 70 < flips < 130 and checked > 50


def test_same_seed_same_views_and_different_seed_differs():
    transform = make_transform(mask_generator=BlockMaskGenerator(14, 75))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 260, 3), np.uint8))
    first = transform(image, np.random.default_rng([5, 0, 3]))
    second = transform(image, np.random.default_rng([5, 0, 3]))
    other = transform(image, np.random.default_rng([5, 1, 3]))
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])


def test_crop_box_matches_torchvision_algorithm():
    rng = np.random.default_rng(0)
    ours = np.array([sample_crop_box(500, 375, rng) for _ in range(3000)])  # (top, left, h, w)
    image = Image.new("RGB", (500, 375))
    torch.manual_seed(0)
    theirs = np.array(
        [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    )
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 375).all() and (left + w <= 500).all()
    area_ours = ours[:, 2] * ours[:, 3] / (500 * 375)
    area_theirs = theirs[:, 2] * theirs[:, 3] / (500 * 375)
    assert abs(area_ours.mean() - area_theirs.mean()) < 0.03
    assert area_ours.min() > 0.07
    aspect = ours[:, 3] / ours[:, 2]
    assert aspect.min() > 0.7 and aspect.max() < 1.4


def test_crop_box_fallback_is_centre_crop_with_clamped_ratio():
    # A 1000x20 strip: no box of >= 8 % area fits the ratio range in 10 tries -> fallback.
    rng = np.random.default_rng(0)
    top, left, h, w = sample_crop_box(1000, 20, rng)
    assert (top, h) == (0, 20) and w == round(20 * 4 / 3) and left == (1000 - w) // 2
    top, left, h, w = sample_crop_box(20, 1000, rng)
    assert (left, w) == (0, 20) and h == round(20 / (3 / 4)) and top == (1000 - h) // 2


@pytest.mark.parametrize(
    "name, expected",
    [("bicubic", Image.Resampling.BICUBIC), ("BILINEAR", Image.Resampling.BILINEAR),
     ("lanczos", Image.Resampling.LANCZOS), ("nearest", Image.Resampling.NEAREST),
     ("hamming", Image.Resampling.HAMMING), ("box", Image.Resampling.BOX), ("random", "random")],
)  # fmt: skip
def test_parse_interpolation(name, expected):
    assert parse_interpolation(name) == expected


def test_parse_interpolation_rejects_unknown_names():
    with pytest.raises(ValueError, match="bicubic"):
        parse_interpolation("cubic")
    with pytest.raises(ValueError):
        make_transform(second_interpolation="area")


def test_random_interpolation_uses_both_filters():
    rng0 = np.random.default_rng(0)
    image = Image.fromarray(rng0.integers(0, 256, (120, 120, 3), dtype=np.uint8))
    random_t = make_transform(input_size=48, train_interpolation="random", flip_prob=0.0)
    seen = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        view_a = random_t(image, rng)[0]
        rng = np.random.default_rng(seed)
        rng.random()  # the flip draw
        top, left, h, w = sample_crop_box(120, 120, rng)
        box = (left, top, left + w, top + h)
        matches = set()
        for name in ("bilinear", "bicubic"):
            # torch resizes these views: within 2 levels of PIL's resize of the cropped box, horizontal
            # pass first (as torch does it; Pillow 13 picks the order, which matters on noise).
            crop, resample = image.crop(box), parse_interpolation(name)
            ref = crop.resize((48, crop.height), resample).resize((48, 48), resample)
            ref = torch.from_numpy(np.asarray(ref, np.float32).transpose(2, 0, 1) / 127.5 - 1)
            if torch.allclose(view_a, ref, rtol=0, atol=2 / 127.5 + 1e-5):
                matches.add(name)
        assert len(matches) == 1, seed
        seen |= matches
    assert seen == {"bilinear", "bicubic"}


def test_grayscale_input_and_pickle_and_repr():
    transform = make_transform(tokenizer_transform=functools.partial(dall_e_map_pixels, eps=0.1))
    restored = pickle.loads(pickle.dumps(transform))
    gray = Image.fromarray(np.full((64, 80), 128, np.uint8))
    view_a, view_b, _ = restored(gray, np.random.default_rng(0))
    assert view_a.shape == (3, 224, 224)
    assert torch.allclose(view_a, torch.full_like(view_a, 128 / 127.5 - 1), atol=1e-5)
    text = repr(transform)
    assert "bicubic" in text and "lanczos" in text and "RandomMaskGenerator" in text


def test_mask_generator_is_required():
    with pytest.raises(ValueError, match="mask_generator"):
        make_transform(mask_generator=None)


def test_one_view_transform_and_single_output_dataset_items(tmp_path):
    import numpy as np
    from PIL import Image

    from mcbeit.data.transforms import OneViewTransform
    from mcbeit.tokenizers import Normalize

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    train = OneViewTransform(32, scale=(0.35, 1.0), output_transform=Normalize())
    a, b = train(image, np.random.default_rng([0, 1, 2])), train(image, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and -1 <= a.min() and a.max() <= 1  # a function of the rng
    centre = OneViewTransform(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, interpolation="bicubic")
    crop = centre(image, np.random.default_rng(0))                                            # the middle 40x40
    expected = torch.from_numpy(np.asarray(image)[:, 10:50].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(crop, expected)
    make_image_folder(tmp_path, n_per_class=1, size=48)
    item = build_pretraining_dataset(tmp_path, None, train)[(0, 3)]
    assert len(item) == 2 and item[0].shape == (3, 32, 32) and item[1] == 0                   # (view, n_skipped)
