"""ConMIM's two views (TencentARC/ConMIM datasets.py DataAugmentationForConMIM): one flip and crop shared by the
student's plain view and the teacher's perturbed view (jitter p 0.8, grayscale p 0.2, blur p 0.1, solarize p 0.2),
every draw from the sample's rng."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import mcbeit.data.perturbation as perturbation
from mcbeit.data.masking import build_mask_generator
from mcbeit.data.perturbation import DenoisingViews, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
#: share of samples the perturbation leaves as they are: no jitter, no grayscale, no blur, no solarize
P_UNTOUCHED = (1 - 0.8) * (1 - 0.2) * (1 - 0.1) * (1 - 0.2)


@pytest.fixture(scope="module")
def image():
    """300 x 400 (H x W) RGB: a colour gradient plus noise (blur, solarize, grayscale and jitter all change it)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    base = np.stack([xx * 255 / 399, yy * 255 / 299, 255 - xx * 255 / 399], axis=-1)
    noisy = base + rng.normal(0, 40, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def views(size=32, **kwargs):
    window = size // 16
    return DenoisingViews(size, mean=MEAN, std=STD,
                          mask_generator=build_mask_generator("random_mps32", window, mask_ratio=0.75), **kwargs)


def normalise(pixels: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """ToTensor + Normalize of (H,W,3) uint8, float64 -> (3,H,W)."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255
    return (x - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(3, 1, 1)


def pixels_of(view: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """The (H,W,3) uint8 image a normalised (3,H,W) view was made of."""
    x = view.double() * torch.tensor(std, dtype=torch.float64).view(3, 1, 1) + torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    pixels = (x * 255).round()
    assert (pixels - x * 255).abs().max() < 1e-3  # the views are made of whole pixel values
    return pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_shapes_and_dtypes(image):
    student, teacher, mask = views(64)(image, np.random.default_rng(0))
    assert student.shape == teacher.shape == (3, 64, 64)
    assert student.dtype == teacher.dtype == torch.float32
    assert mask.shape == (16,) and mask.dtype == torch.bool and int(mask.sum()) == 12  # 3 of 4 cells
    student, teacher, mask = DenoisingViews((48, 80), mask_generator=build_mask_generator("random_mps32", (6, 10)))(
        image, np.random.default_rng(1))
    assert student.shape == teacher.shape == (3, 48, 80) and mask.shape == (60,)
    with pytest.raises(ValueError, match="mask_generator"):
        DenoisingViews(32)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
@pytest.mark.parametrize("mean, std", [(MEAN, STD), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_student_view_is_the_normalised_crop(image, flip_prob, mean, std):
    """With the crop forced to the whole image at its own size, the student's view is ToTensor + Normalize of
    the (flipped) image itself."""
    transform = DenoisingViews((300, 400), mean=mean, std=std, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3),
                               flip_prob=flip_prob, mask_generator=build_mask_generator("random_mps32", (18, 24)))
    student, teacher, _ = transform(image, np.random.default_rng(3))
    pixels = np.array(image)
    if flip_prob:
        pixels = pixels[:, ::-1].copy()
    torch.testing.assert_close(student.double(), normalise(pixels, mean, std), rtol=0, atol=1e-5)
    assert teacher.shape == student.shape


def test_teacher_is_perturbed_in_about_the_originals_share_of_samples(image):
    transform = views(32)
    draws = 600
    same = 0
    for seed in range(draws):
        student, teacher, _ = transform(image, np.random.default_rng([5, seed]))
        same += bool(torch.equal(student, teacher))
    sd = math.sqrt(P_UNTOUCHED * (1 - P_UNTOUCHED) / draws)
    assert 0 < same < draws
    assert abs(same / draws - P_UNTOUCHED) < 4 * sd, (same, draws)


def test_perturbation_probabilities(image):
    """perturb alone on a small image: unchanged ~11.5 %, grayscale (R = G = B; jitter never desaturates fully,
    blur and solarize keep gray gray) ~20 %."""
    small = image.resize((16, 12))
    pixels = np.array(small)
    draws = 1500
    untouched = gray = 0
    for seed in range(draws):
        out = np.array(perturb(small, np.random.default_rng([6, seed])))
        assert out.shape == pixels.shape and out.dtype == np.uint8
        untouched += bool(np.array_equal(out, pixels))
        gray += bool((out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all())
    for share, p in ((untouched, P_UNTOUCHED), (gray, 0.2)):
        assert abs(share / draws - p) < 4 * math.sqrt(p * (1 - p) / draws), (share, p)


def test_geometry_is_shared_grayscale_only(image, monkeypatch):
    """Perturbation forced to grayscale only: the teacher's view is exactly the grayscale of the student's crop,
    for every flip and crop."""
    monkeypatch.setattr(perturbation, "JITTER_P", 0.0)
    monkeypatch.setattr(perturbation, "GRAYSCALE_P", 1.1)
    monkeypatch.setattr(perturbation, "BLUR_P", -1.0)  # the original's "<=": never with a negative p
    monkeypatch.setattr(perturbation, "SOLARIZE_P", 0.0)
    transform = views(64)
    for seed in range(20):
        student, teacher, _ = transform(image, np.random.default_rng([7, seed]))
        crop = pixels_of(student)
        expected = np.array(Image.fromarray(crop).convert("L").convert("RGB"))
        assert np.array_equal(pixels_of(teacher), expected), seed


def test_geometry_is_shared_solarize_only(image, monkeypatch):
    monkeypatch.setattr(perturbation, "JITTER_P", 0.0)
    monkeypatch.setattr(perturbation, "GRAYSCALE_P", 0.0)
    monkeypatch.setattr(perturbation, "BLUR_P", -1.0)
    monkeypatch.setattr(perturbation, "SOLARIZE_P", 1.1)
    transform = views(64)
    for seed in range(10):
        student, teacher, _ = transform(image, np.random.default_rng([8, seed]))
        crop = pixels_of(student)
        assert np.array_equal(pixels_of(teacher), np.where(crop >= 128, 255 - crop, crop)), seed


def test_geometry_is_shared_in_unforced_draws(image):
    """Among ordinary draws, those whose perturbation is grayscale alone (about 0.2 x 0.2 x 0.9 x 0.8 = 2.9 %)
    give the grayscale of the student's crop exactly."""
    transform = views(32)
    found = 0
    for seed in range(400):
        student, teacher, _ = transform(image, np.random.default_rng([9, seed]))
        crop = pixels_of(student)
        found += bool(np.array_equal(pixels_of(teacher), np.array(Image.fromarray(crop).convert("L").convert("RGB"))))
    assert 3 <= found <= 30


def test_perturb_pieces_with_known_draws(image):
    """A seed whose four decisions are (no jitter, grayscale, no blur, no solarize) gives PIL's grayscale; one with
    (no jitter, no grayscale, no blur, solarize) PIL's solarize at 128."""
    small = image.resize((40, 30))

    def decisions(seed):
        r = np.random.default_rng(seed).random(4)
        return (r[0] < 0.8, r[1] < 0.2, r[2] <= 0.1, r[3] < 0.2)

    gray_seed = next(s for s in range(10_000) if decisions(s) == (False, True, False, False))
    solar_seed = next(s for s in range(10_000) if decisions(s) == (False, False, False, True))
    plain_seed = next(s for s in range(10_000) if decisions(s) == (False, False, False, False))
    assert np.array_equal(np.array(perturb(small, np.random.default_rng(gray_seed))),
                          np.array(small.convert("L").convert("RGB")))
    assert np.array_equal(np.array(perturb(small, np.random.default_rng(solar_seed))),
                          np.array(ImageOps.solarize(small, 128)))
    assert np.array_equal(np.array(perturb(small, np.random.default_rng(plain_seed))), np.array(small))


def test_same_seed_same_views_whatever_the_global_seeds(image):
    """Everything comes from the rng handed in: an exact resume redraws the same sample."""
    transform = views(64)
    outputs = []
    for global_seed in (0, 1):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        outputs.append([transform(image, np.random.default_rng([1, 2, seed])) for seed in range(12)])
    for first, second in zip(*outputs, strict=True):
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
    # and other seeds give other samples
    a, b = outputs[0][0], transform(image, np.random.default_rng([1, 3, 0]))
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_perturb_draws_only_from_its_rng(image):
    small = image.resize((24, 24))
    for seed in range(40):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        a = np.array(perturb(small, np.random.default_rng([4, seed])))
        random.seed(seed + 100)
        np.random.seed(seed + 100)
        torch.manual_seed(seed + 100)
        b = np.array(perturb(small, np.random.default_rng([4, seed])))
        assert np.array_equal(a, b), seed
    # the input image is not modified
    assert np.array_equal(np.array(small), np.array(image.resize((24, 24))))
