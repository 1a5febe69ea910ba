import math
import random

import numpy as np
import pytest

from mcbeit.data.masking import BlockMaskGenerator, RandomMaskGenerator, build_mask_generator


def reference_block_mask(rnd: random.Random, height=14, width=14, num_masking_patches=75,
                         min_num_patches=16, min_aspect=0.3):
    """BEiT's block masking written plainly with python's ``random`` (the test's reference)."""
    max_num_patches = num_masking_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=int)

    def add(max_mask):
        delta = 0
        for _ in range(10):
            target_area = rnd.uniform(min_num_patches, max_mask)
            aspect = math.exp(rnd.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = rnd.randint(0, height - h)
                left = rnd.randint(0, width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    count = 0
    while count < num_masking_patches:
        delta = add(min(num_masking_patches - count, max_num_patches))
        if delta == 0:
            break
        count += delta
    return mask


@pytest.mark.parametrize("ratio, expected", [(0.75, 147), (0.4, 78)])
def test_random_mask_has_exact_count(ratio, expected):
    generator = RandomMaskGenerator(14, ratio)
    rng = np.random.default_rng(0)
    masks = np.stack([generator(rng) for _ in range(2000)])
    assert masks.dtype == np.bool_ and masks.shape == (2000, 14, 14)
    assert (masks.sum(axis=(1, 2)) == expected).all()
    # Positions are uniform: every patch is masked about `ratio` of the time.
    assert np.abs(masks.mean(axis=0) - expected / 196).max() < 0.06


def test_random_mask_non_square_window():
    generator = RandomMaskGenerator((7, 9), 0.5)
    mask = generator(np.random.default_rng(1))
    assert mask.shape == (7, 9) and mask.sum() == int(0.5 * 63)


def test_block_mask_statistics_match_original_and_reference():
    generator = BlockMaskGenerator((14, 14), 75)
    rng = np.random.default_rng(1234)
    counts = np.array([generator(rng).sum() for _ in range(4000)])
    assert counts.max() <= 75
    assert counts.min() >= 55
    assert abs(counts.mean() - 74.5) < 0.3
    assert abs((counts == 75).mean() - 0.67) < 0.05

    rnd = random.Random(4321)
    ref = np.array([reference_block_mask(rnd).sum() for _ in range(4000)])
    assert abs(counts.mean() - ref.mean()) < 0.3
    assert abs((counts == 75).mean() - (ref == 75).mean()) < 0.05
    # The shape of the distribution below 75 agrees too (coarse histogram).
    for lo, hi in [(70, 75), (60, 70)]:
        ours, theirs = ((c >= lo) & (c < hi) for c in (counts, ref))
        assert abs(ours.mean() - theirs.mean()) < 0.04


def test_block_mask_is_made_of_blocks():
    """Masked patches come in rectangles, not scattered: nearly all have a masked neighbour."""
    generator = BlockMaskGenerator(14, 75)
    rng = np.random.default_rng(3)
    masks = np.stack([generator(rng) for _ in range(200)])
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    neighbours = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    assert neighbours[masks].mean() > 0.99


def test_block_mask_small_target_below_min_block():
    """max_mask < min_num_patches: uniform(16, 10) draws between them, as python's random does."""
    generator = BlockMaskGenerator(14, 10)
    rng = np.random.default_rng(0)
    counts = [generator(rng).sum() for _ in range(300)]
    assert max(counts) <= 10 and np.mean(counts) > 5


def test_seeding():
    for generator in (BlockMaskGenerator(14, 75), RandomMaskGenerator(14, 0.75)):
        a = generator(np.random.default_rng([7, 1, 2]))
        b = generator(np.random.default_rng([7, 1, 2]))
        c = generator(np.random.default_rng([7, 2, 2]))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_build_mask_generator_and_repr():
    block = build_mask_generator("block", 14, 75, 0.75, 16, None)
    assert isinstance(block, BlockMaskGenerator) and block.max_num_patches == 75
    assert "BlockMaskGenerator" in repr(block) and "75" in repr(block)
    rand = build_mask_generator("random", (14, 14), 75, 0.75, 16, None)
    assert isinstance(rand, RandomMaskGenerator) and rand.num_mask == 147
    assert "147" in repr(rand)


@pytest.mark.parametrize(
    "build",
    [
        lambda: BlockMaskGenerator(14, 197),
        lambda: BlockMaskGenerator(14, -1),
        lambda: BlockMaskGenerator(14, 75, min_aspect=0),
        lambda: BlockMaskGenerator(0, 1),
        lambda: RandomMaskGenerator(14, 0.0),
        lambda: RandomMaskGenerator(14, 1.0),
        lambda: RandomMaskGenerator(14, 1.5),
        lambda: build_mask_generator("blocky", 14, 75, 0.75, 16, None),
    ],
)
def test_impossible_settings_raise(build):
    with pytest.raises(ValueError):
        build()


def test_unknown_mask_type_message():
    with pytest.raises(ValueError, match="block, random"):
        build_mask_generator("blocky", 14, 75, 0.75, 16, None)
