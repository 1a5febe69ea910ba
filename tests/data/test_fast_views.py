"""The fast view paths of TwoViewTransform / OneViewTransform (issue 7): bilinear and bicubic views
resized by torch, lanczos & co. by PIL, and reduced JPEG decoding when the crop box allows it."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFilter

from mcbeit.data import images
from mcbeit.data.datasets import ImageDataset
from mcbeit.data.images import load_rgb_image, open_image
from mcbeit.data.masking import BlockMaskGenerator, RandomMaskGenerator
from mcbeit.data.transforms import OneViewTransform, TwoViewTransform, sample_flipped_box
from mcbeit.tokenizers import MapPixels, Normalize

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
LEVEL = 1 / 255  # one uint8 level in [0, 1]


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Photo-like (H, W, 3) uint8: colour gradients, texture, shapes, blur and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-0.3, 0.3, 3) + yy[..., None] * rng.uniform(-0.3, 0.3, 3)
    field += 30 * np.sin(xx[..., None] / rng.uniform(5, 40) + rng.uniform(0, 6, 3))
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), np.int16) + rng.normal(0, 4, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def as_01(image: Image.Image, flip: bool) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], as the transforms compute it (uint8 * float32(1/255))."""
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1) * np.float32(1 / 255))


def two_pass(crop: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """PIL's resize done horizontal pass first (torch's order; Pillow 13 picks the order itself)."""
    return crop.resize((size[0], crop.height), resample).resize(size, resample)


def make(**overrides) -> TwoViewTransform:
    kwargs = dict(input_size=224, second_input_size=112, train_interpolation="bicubic", second_interpolation="lanczos",
                  mean=(0.0,) * 3, std=(1.0,) * 3, tokenizer_transform=None, mask_generator=RandomMaskGenerator(14, 0.75))
    kwargs.update(overrides)
    return TwoViewTransform(**kwargs)


class DecodeSpy:
    """Records (reduction, decoded size) of every OpenedImage.decode."""

    def __init__(self, monkeypatch):
        self.calls = []
        decode = images.OpenedImage.decode

        def spy(opened, max_reduction=1):
            decoded = decode(opened, max_reduction)
            self.calls.append((opened.reduction, decoded.size))
            return decoded

        monkeypatch.setattr(images.OpenedImage, "decode", spy)


# ----------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("name, resample", [("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)])
def test_torch_views_match_pil_resize_of_the_box(name, resample):
    """Both views within 2 levels of PIL's resize of the cropped box (what the original pipeline
    does: crop, then resize), down- and upsampling; and of PIL's resize(box=) away from the box
    edges (whose filter window there also reads pixels just outside the box)."""
    transform = make(train_interpolation=name, second_interpolation=name)
    for width, height in ((320, 240), (150, 100)):  # boxes larger, then smaller than 224
        image = Image.fromarray(photo(width, height, seed=width))
        for seed in range(8):
            view_a, view_b, _ = transform(image, np.random.default_rng(seed))
            box, flip = sample_flipped_box(image.size, np.random.default_rng(seed), 0.5, SCALE, RATIO)
            for view, size in ((view_a, (224, 224)), (view_b, (112, 112))):
                expected = as_01(image.crop(box).resize(size, resample), flip)
                assert view.shape == expected.shape and view.is_contiguous() and view.dtype == torch.float32
                assert (view - expected).abs().max() <= 2 * LEVEL + 1e-6, (name, width, seed)
                if box[2] - box[0] > size[0]:  # downsampling: edges within 2 output pixels
                    inner = as_01(image.resize(size, resample, box=box), flip)
                    assert (view - inner)[:, 2:-2, 2:-2].abs().max() <= 2 * LEVEL + 1e-6, (name, width, seed)


def test_bicubic_on_noise_matches_pil_horizontal_pass_first():
    """On noise, bicubic's negative lobes overshoot and the uint8 clipping between the two passes
    depends on their order: torch does the horizontal pass first (as Pillow did before it chose
    the order itself); it is within 2 levels of PIL's resize in that order."""
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    transform = make(second_interpolation="bicubic")
    for seed in range(6):
        view_a, view_b, _ = transform(image, np.random.default_rng(seed))
        box, flip = sample_flipped_box(image.size, np.random.default_rng(seed), 0.5, SCALE, RATIO)
        for view, size in ((view_a, (224, 224)), (view_b, (112, 112))):
            expected = as_01(two_pass(image.crop(box), size, Image.Resampling.BICUBIC), flip)
            assert (view - expected).abs().max() <= 2 * LEVEL + 1e-6, seed


# Boxes, flips and view A's "random" filter the transform drew before issue 7 (the PIL-only
# code) for the rng [3, 1, seed] on a 500x375 image; view B (lanczos) and the masks were equal.
BEFORE = [((127, 10, 406, 316), True, "bicubic"), ((180, 52, 367, 195), False, "bilinear"),
          ((114, 83, 356, 338), True, "bilinear"), ((233, 9, 499, 320), True, "bicubic"),
          ((34, 54, 286, 310), False, "bilinear"), ((268, 19, 404, 166), True, "bilinear")]


def test_boxes_flips_filters_masks_as_before_and_lanczos_exact():
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    transform = make(train_interpolation="random", mask_generator=BlockMaskGenerator(14, 75))
    for seed, (box, flip, name) in enumerate(BEFORE):
        view_a, view_b, mask = transform(image, np.random.default_rng([3, 1, seed]))
        rng = np.random.default_rng([3, 1, seed])
        assert sample_flipped_box(image.size, rng, 0.5, SCALE, RATIO) == (box, flip)
        assert ("bilinear", "bicubic")[int(rng.integers(0, 2))] == name  # the interpolation draw
        assert torch.equal(mask, torch.from_numpy(BlockMaskGenerator(14, 75)(rng).reshape(-1)))
        assert torch.equal(view_b, as_01(image.resize((112, 112), Image.Resampling.LANCZOS, box=box), flip))
        resample = Image.Resampling.BICUBIC if name == "bicubic" else Image.Resampling.BILINEAR
        expected = as_01(two_pass(image.crop(box), (224, 224), resample), flip)
        assert (view_a - expected).abs().max() <= 2 * LEVEL + 1e-6, seed


@pytest.mark.parametrize("name", ["lanczos", "hamming", "box", "nearest"])
def test_other_filters_stay_pil_exact(name):
    image = Image.fromarray(photo(300, 200))
    transform = OneViewTransform(64, scale=SCALE, interpolation=name)
    for seed in range(4):
        view = transform(image, np.random.default_rng(seed))
        box, flip = sample_flipped_box(image.size, np.random.default_rng(seed), 0.5, SCALE, RATIO)
        assert torch.equal(view, as_01(image.resize((64, 64), Image.Resampling[name.upper()], box=box), flip))


def test_affine_tokenizer_transforms_are_folded_into_the_conversion():
    image = Image.fromarray(photo(200, 160))
    for tokenizer_transform in (Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), MapPixels(0.1)):
        folded = make(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), tokenizer_transform=tokenizer_transform)
        plain = make(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     tokenizer_transform=lambda x, t=tokenizer_transform: t(x))  # an opaque callable
        for seed in range(3):
            a, b, m = folded(image, np.random.default_rng(seed))
            a2, b2, m2 = plain(image, np.random.default_rng(seed))
            assert torch.equal(a, a2) and torch.equal(m, m2)
            torch.testing.assert_close(b, b2, rtol=0, atol=1e-6)


def test_only_maps_that_behave_as_they_say_are_folded():
    """The data layer does not import the tokenizers: a transform is folded into the conversion when
    its ``mean``/``std`` or ``eps`` say it is a per-channel affine map AND a probe view confirms it.
    A look-alike that does something else, or an opaque callable, is applied after the conversion."""
    import torchvision.transforms as T

    for affine in (Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), MapPixels(0.1), T.Normalize((0.5,) * 3, (0.2,) * 3)):
        assert make(tokenizer_transform=affine)._tokenizer_after is None, affine

    class ClampingNormalize:
        mean, std = (0.5,) * 3, (0.5,) * 3  # says (x - 0.5) / 0.5, but clamps as well

        def __call__(self, x):
            return ((x - 0.5) / 0.5).clamp(min=0.0)

    image = Image.fromarray(photo(200, 160))
    for opaque in (ClampingNormalize(), MapPixels(0.5), lambda x: x * 2.0):
        transform = make(tokenizer_transform=opaque)
        assert transform._tokenizer_after is opaque
        _, b, _ = transform(image, np.random.default_rng(0))
        _, plain, _ = make()(image, np.random.default_rng(0))
        assert torch.equal(b, opaque(plain))


# ----------------------------------------------------------------------------- reduced JPEG decoding


def save_jpeg(path, array: np.ndarray, quality: int = 90):
    Image.fromarray(array).save(path, quality=quality)
    return path


def test_reduced_decode_when_the_box_allows_it(tmp_path, monkeypatch):
    """A 640x480 JPEG cropped whole to 64x64: the box is 7x the view, so the JPEG is decoded at
    1/4 (160x120); the view stays within a few levels of the full decode's."""
    path = save_jpeg(tmp_path / "big.jpg", photo(640, 480))
    transform = OneViewTransform(64, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip_prob=0.0, interpolation="bicubic")
    spy = DecodeSpy(monkeypatch)
    with open_image(path) as opened:
        reduced = transform(opened, np.random.default_rng(0))
    assert spy.calls == [(4, (160, 120))]
    full = transform(load_rgb_image(path), np.random.default_rng(0))
    difference = (reduced - full).abs() / LEVEL
    assert difference.mean() < 0.6 and difference.max() <= 8  # measured (4 such images): mean <= 0.35, max 5


def test_reduced_decode_views_close_to_full_decode_views(tmp_path, monkeypatch):
    """TwoViewTransform(224, 112) on 1024x768 JPEGs through the dataset: boxes of at least
    448x448 are decoded at 1/2 (here), never below the views' size; the views stay close to
    those of the full decode. Measured over 54 reduced items of 4 such images: mean |diff| per
    item <= 0.70 levels (view A) and 0.38 (view B), 99.9th percentile <= 15 and 8, max 25 and 10
    (libjpeg's DCT downscale is not the bicubic/lanczos prefilter, and a box made fractional goes
    to PIL, the full decode's view A to torch)."""
    for i in range(2):
        save_jpeg(tmp_path / f"{i}.jpg", photo(1024, 768, seed=i))
    transform = make(mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = ImageDataset(tmp_path, ["0.jpg", "1.jpg"], [0, 0], transform)
    spy = DecodeSpy(monkeypatch)
    reduced = 0
    for index in range(2):
        full_image = load_rgb_image(dataset.path(index))
        for epoch in range(20):
            view_a, view_b, mask, skipped = dataset[(index, epoch)]
            reduction, decoded_size = spy.calls[-1]
            box, _ = sample_flipped_box((1024, 768), dataset.rng(index, epoch), 0.5, SCALE, RATIO)
            width, height = box[2] - box[0], box[3] - box[1]
            assert reduction == (1 if min(width, height) < 448 else 2 if min(width, height) < 896 else 4)
            assert decoded_size == (-(-1024 // reduction), -(-768 // reduction))
            assert width / reduction >= 224 and height / reduction >= 224  # never upsampled
            reduced += reduction > 1
            full_a, full_b, full_mask = transform(full_image, dataset.rng(index, epoch))
            assert torch.equal(mask, full_mask) and skipped == 0
            for view, full, level in ((view_a, full_a, 2 / 255), (view_b, full_b, LEVEL)):
                difference = ((view - full).abs() / level).flatten()
                if reduction == 1:
                    assert difference.max() < 1e-3
                else:
                    assert difference.mean() < 1.0 and torch.quantile(difference, 0.999) <= 20, (index, epoch)
    assert reduced >= 5  # the draw gives many boxes >= 448 px at this size


@pytest.mark.parametrize("side, reduction", [(200, 2), (199, 1), (400, 4), (399, 2), (800, 8), (120, 1)])
def test_reduction_only_while_the_box_stays_at_least_the_view(tmp_path, monkeypatch, side, reduction):
    path = save_jpeg(tmp_path / "square.jpg", photo(side, side))
    spy = DecodeSpy(monkeypatch)
    transform = OneViewTransform(100, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, interpolation="bilinear")
    with open_image(path) as opened:
        assert transform(opened, np.random.default_rng(0)).shape == (3, 100, 100)
    assert spy.calls == [(reduction, (-(-side // reduction),) * 2)]


def test_no_reduced_decode_for_small_boxes_or_other_formats(tmp_path, monkeypatch):
    save_jpeg(tmp_path / "a.jpg", photo(500, 375))  # every box <= 375 < 2 x 224
    Image.fromarray(photo(1024, 768)).save(tmp_path / "b.png")  # not a JPEG: decoded fully
    spy = DecodeSpy(monkeypatch)
    dataset = ImageDataset(tmp_path, ["a.jpg", "b.png"], [0, 0], make())
    for epoch in range(15):
        dataset[(0, epoch)]
        dataset[(1, epoch)]
    assert {call[0] for call in spy.calls} == {1} and len(spy.calls) == 30
    assert {call[1] for call in spy.calls} == {(500, 375), (1024, 768)}


# ----------------------------------------------------------------------------- files on the new path


@pytest.fixture
def truncation_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def test_bad_jpegs_skipped_and_counted_when_the_transform_decodes(tmp_path, truncation_off, caplog):
    good = tmp_path / "good.jpg"
    save_jpeg(good, photo(640, 480))
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    middle = len(data) // 2
    corrupt[middle : middle + 64] = b"\xff" * 64
    (tmp_path / "corrupt.jpg").write_bytes(bytes(corrupt))
    transform = OneViewTransform(64, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip_prob=0.0)  # decoded at 1/4
    dataset = ImageDataset(tmp_path, ["truncated.jpg", "corrupt.jpg", "good.jpg"], [0, 1, 2], transform, seed=3)
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        view, skipped = dataset[(0, 5)]
    assert skipped == 2 and dataset[(1, 5)][1] == 1 and dataset[(2, 5)][1] == 0
    with open_image(good) as opened:  # the next file gets the rng of the index asked for, afresh
        assert torch.equal(view, transform(opened, dataset.rng(0, 5)))
    assert "truncated.jpg: OSError: image file is truncated" in caplog.text
    assert "corrupt.jpg: OSError" in caplog.text


def test_the_transforms_own_errors_are_not_bad_files(tmp_path):
    save_jpeg(tmp_path / "good.jpg", photo(64, 48))

    class Broken(OneViewTransform):
        def __call__(self, image, rng):
            super().__call__(image, rng)
            raise ValueError("a bug in the transform")

    with pytest.raises(ValueError, match="a bug"):
        ImageDataset(tmp_path, ["good.jpg"], [0], Broken(32))[0]


def test_odd_modes_through_the_decoding_transform(tmp_path, monkeypatch):
    """Grayscale and CMYK JPEGs (decoded at reduced scale), RGBA / 16-bit / palette PNGs."""
    Image.new("L", (256, 256), 77).save(tmp_path / "gray.jpg", quality=95)
    Image.new("CMYK", (256, 256), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    Image.new("RGBA", (64, 64), (10, 200, 30, 128)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((64, 64), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.new("P", (64, 64), 0).save(tmp_path / "palette.png")
    names = ["gray.jpg", "cmyk.jpg", "rgba.png", "deep.png", "palette.png"]
    expected = {"gray.jpg": (77,) * 3, "rgba.png": (10, 200, 30), "deep.png": (255,) * 3, "palette.png": (0,) * 3}
    spy = DecodeSpy(monkeypatch)
    transform = OneViewTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, interpolation="bicubic")
    dataset = ImageDataset(tmp_path, names, [0] * len(names), transform)
    for index, name in enumerate(names):
        view, skipped = dataset[index]
        assert view.shape == (3, 32, 32) and skipped == 0, name
        colour = view.mean(dim=(1, 2)) * 255
        if name == "cmyk.jpg":
            assert colour[0] > 200 and colour[1] < 60 and colour[2] < 60  # red
        else:
            torch.testing.assert_close(colour, torch.tensor(expected[name], dtype=torch.float32), rtol=0, atol=2.0)
    assert [reduction for reduction, _ in spy.calls] == [8, 8, 1, 1, 1]


def test_opened_image_decodes_once_and_closes(tmp_path):
    path = save_jpeg(tmp_path / "a.jpg", photo(64, 48))
    with open_image(path) as opened:
        assert opened.size == (64, 48) and "a.jpg" in repr(opened)
        assert opened.decode(max_reduction=8).size == (8, 6) and opened.reduction == 8
        with pytest.raises(RuntimeError, match="once"):
            opened.decode()
    assert opened.error is None
