"""unilm BEiT's colour jitter of the whole image before the two views (mcbeit.data.color)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from mcbeit.data.color import JitterThenViews, jitter_colour
from mcbeit.data.images import open_image
from mcbeit.data.masking import RandomMaskGenerator
from mcbeit.data.transforms import TwoViewTransform


def _image(seed=0, size=(80, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_the_jitter_is_torchvisions_ops_in_the_drawn_order_with_the_drawn_factors():
    image = _image()
    rng = np.random.default_rng(5)
    order, factors = rng.permutation(3), rng.uniform(0.6, 1.4, size=3)
    expected = image
    for i in order:
        expected = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[i](expected, float(factors[i]))
    got = jitter_colour(image, 0.4, np.random.default_rng(5))
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert not np.array_equal(np.asarray(got), np.asarray(image))
    assert np.array_equal(np.asarray(jitter_colour(image, 0.0, np.random.default_rng(5))), np.asarray(image))


def test_contrast_uses_the_whole_images_mean_so_the_jitter_comes_before_the_crop(tmp_path):
    """The views of a jittered file equal the views of the image jittered whole, then cut."""
    path = tmp_path / "a.png"
    _image(1, (96, 96)).save(path)
    views = TwoViewTransform(64, 32, "bicubic", "lanczos", mask_generator=RandomMaskGenerator((4, 4), 0.5))
    jittered = JitterThenViews(views, 0.4)
    with open_image(path) as opened:
        a = jittered(opened, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    whole = jitter_colour(Image.open(path).convert("RGB"), 0.4, rng)
    b = views(whole, rng)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    plain = views(Image.open(path).convert("RGB"), np.random.default_rng(3))
    assert not torch.equal(a[0], plain[0])


@pytest.mark.parametrize("parser, jitter", [("get_args_parser", 0.0), ("get_beit_args_parser", 0.4)])
def test_each_entry_point_gets_its_originals_colour_jitter(parser, jitter):
    from mcbeit.cli import pretrain

    config = pretrain.to_config(getattr(pretrain, parser)().parse_args(["--data_path", "x"]))
    assert config.color_jitter == jitter
