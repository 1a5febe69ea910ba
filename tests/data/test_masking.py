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


def _literal_v2_fixup(mask: np.ndarray, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
    """unilm beit2/masking_generator.py:92-105, restated with ``rng`` for numpy's global generator."""
    mask = mask.astype(np.int32)
    mask_count = int(mask.sum())
    if mask_count > num_masking_patches:
        delta = mask_count - num_masking_patches
        mask_x, mask_y = mask.nonzero()
        to_vis = rng.choice(mask_x.shape[0], delta, replace=False)
        mask[mask_x[to_vis], mask_y[to_vis]] = 0
    elif mask_count < num_masking_patches:
        delta = num_masking_patches - mask_count
        mask_x, mask_y = (mask == 0).nonzero()
        to_mask = rng.choice(mask_x.shape[0], delta, replace=False)
        mask[mask_x[to_mask], mask_y[to_mask]] = 1
    assert mask.sum() == num_masking_patches
    return mask.astype(bool)


@pytest.mark.parametrize("window, n, min_block", [((14, 14), 75, 16), ((7, 7), 19, 16), ((6, 9), 30, 4)])
def test_exact_block_mask_always_has_n_patches(window, n, min_block):
    generator = BlockMaskGenerator(window, n, min_num_patches=min_block, exact=True)
    rng = np.random.default_rng(5)
    counts = np.array([generator(rng).sum() for _ in range(1500)])
    assert (counts == n).all()
    assert "exact" in repr(generator) and "exact" not in repr(BlockMaskGenerator(window, n, min_block))


def test_exact_top_up_is_the_originals():
    """Same rng: v1's drawing, then the original's top-up with the draws that follow, is exactly exact=True."""
    loose = BlockMaskGenerator((7, 7), 19, min_num_patches=16)
    exact = BlockMaskGenerator((7, 7), 19, min_num_patches=16, exact=True)
    topped_up = 0
    for seed in range(300):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        drawn = loose(rng_a)
        want = _literal_v2_fixup(drawn, 19, rng_a)
        assert np.array_equal(exact(rng_b), want)
        assert rng_a.random() == rng_b.random()  # and consumed the same draws
        topped_up += int(drawn.sum() < 19)
    assert topped_up > 50  # the top-up really ran (7x7 with blocks of >= 16 often falls short)


def test_exact_trim_is_the_originals():
    """The drawing never overshoots, so the trim is checked directly on over-full masks."""
    generator = BlockMaskGenerator((5, 6), 7, min_num_patches=2, exact=True)
    for seed in range(50):
        over = np.random.default_rng(1000 + seed).random((5, 6)) < 0.6
        count = int(over.sum())
        if count <= 7:
            continue
        got = over.copy()
        generator._force_count(got, count, np.random.default_rng(seed))
        want = _literal_v2_fixup(over, 7, np.random.default_rng(seed))
        assert np.array_equal(got, want) and got.sum() == 7 and not (got & ~over).any()


def test_build_mask_generator_passes_exact():
    assert build_mask_generator("block", 14, 75, 0.75, 16, None, exact=True).exact
    assert not build_mask_generator("block", 14, 75, 0.75, 16, None).exact
