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


# ---------------------------------------------------------------------- random_mps32 (ConMIM)
from mcbeit.data.masking import CellMaskGenerator, check_mask_flags  # noqa: E402


def literal_conmim_mask(rng: np.random.Generator, input_size=224, mask_patch_size=32, model_patch_size=16,
                        mask_ratio=0.75):
    """TencentARC/ConMIM masking_generator.py MaskGenerator, restated with ``rng`` for numpy's global generator:
    ceil(token_count * mask_ratio) of the rand_size x rand_size cells chosen by a permutation, each repeated
    scale x scale."""
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    token_count = rand_size ** 2
    mask_count = int(np.ceil(token_count * mask_ratio))
    chosen = rng.permutation(token_count)[:mask_count]
    cells = np.zeros(token_count, dtype=int)
    cells[chosen] = 1
    return cells.reshape(rand_size, rand_size).repeat(scale, axis=0).repeat(scale, axis=1)


def _cells_of(masks: np.ndarray, cell: int = 2) -> np.ndarray:
    """(K, h, w) patch masks -> (K, h/cell, w/cell, cell*cell): the patches of each cell."""
    k, h, w = masks.shape
    return masks.reshape(k, h // cell, cell, w // cell, cell).transpose(0, 1, 3, 2, 4).reshape(k, h // cell, w // cell, -1)


@pytest.mark.parametrize("window, cells_masked, patches_masked", [
    ((14, 14), 37, 148),   # 224 px: 7x7 = 49 cells, ceil(36.75)
    ((18, 18), 61, 244),   # 288 px: 9x9 = 81 cells, ceil(60.75)
    ((14, 18), 48, 192),   # 224x288 px: 7x9 = 63 cells, ceil(47.25)
])
def test_random_mps32_masks_whole_cells_exactly(window, cells_masked, patches_masked):
    generator = build_mask_generator("random_mps32", window, mask_ratio=0.75)
    assert isinstance(generator, CellMaskGenerator)
    assert generator.get_shape() == window
    assert (generator.num_mask_cells, generator.num_mask) == (cells_masked, patches_masked)
    assert f"{cells_masked} of " in repr(generator) and f"{patches_masked} patches" in repr(generator)
    rng = np.random.default_rng(0)
    draws = 2000
    masks = np.stack([generator(rng) for _ in range(draws)])
    assert masks.dtype == np.bool_ and masks.shape == (draws, *window)
    assert (masks.sum(axis=(1, 2)) == patches_masked).all()
    cells = _cells_of(masks)
    assert (cells.all(-1) == cells.any(-1)).all()  # every 2x2 cell all-or-nothing
    per_cell = cells[..., 0]                        # (draws, h/2, w/2)
    assert (per_cell.sum(axis=(1, 2)) == cells_masked).all()
    # every cell is masked cells_masked / num_cells of the time (binomial: 5 standard deviations)
    p = cells_masked / per_cell[0].size
    sd = math.sqrt(p * (1 - p) / draws)
    assert np.abs(per_cell.mean(axis=0) - p).max() < 5 * sd
    # and the masks are not all alike: about as many distinct masks as draws
    assert len({m.tobytes() for m in masks}) > draws * 0.99


@pytest.mark.parametrize("ratio, cells_masked", [(0.5, 25), (0.6, 30), (0.1, 5), (0.99, 49)])
def test_random_mps32_mask_ratio_is_rounded_up(ratio, cells_masked):
    generator = build_mask_generator("random_mps32", 14, mask_ratio=ratio)
    assert generator.num_mask_cells == cells_masked == math.ceil(49 * ratio)
    rng = np.random.default_rng(1)
    for _ in range(50):
        assert generator(rng).sum() == 4 * cells_masked


@pytest.mark.parametrize("input_size, ratio", [(224, 0.75), (224, 0.6), (288, 0.75), (224, 0.5)])
def test_random_mps32_is_the_originals_mask_generator(input_size, ratio):
    """The same draws as the original's MaskGenerator: with one rng, the very same masks."""
    window = input_size // 16
    ours = build_mask_generator("random_mps32", window, mask_ratio=ratio)
    rng_ours, rng_ref = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(200):
        ref = literal_conmim_mask(rng_ref, input_size=input_size, mask_ratio=ratio)
        got = ours(rng_ours)
        assert ref.shape == got.shape == (window, window)
        assert np.array_equal(got, ref.astype(bool))
    assert rng_ours.random() == rng_ref.random()  # and consumed the same draws


def test_random_mps32_seeding():
    generator = build_mask_generator("random_mps32", 14, mask_ratio=0.75)
    a = generator(np.random.default_rng([7, 1, 2]))
    b = generator(np.random.default_rng([7, 1, 2]))
    c = generator(np.random.default_rng([7, 2, 2]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    state = np.random.get_state()
    np.random.seed(123)  # numpy's global state plays no part
    d = generator(np.random.default_rng([7, 1, 2]))
    np.random.set_state(state)
    assert np.array_equal(a, d)


@pytest.mark.parametrize("window", [7, (7, 7), (14, 15), (13, 14), 1])
def test_random_mps32_needs_a_grid_of_whole_cells(window):
    """112 px (a 7x7 grid) cannot be cut into 2x2-patch cells: a ValueError in the command line's terms."""
    for call in (lambda: check_mask_flags("random_mps32", window),
                 lambda: build_mask_generator("random_mps32", window, mask_ratio=0.75)):
        with pytest.raises(ValueError, match="32") as info:
            call()
        assert "--input_size" in str(info.value)
    with pytest.raises(ValueError):
        CellMaskGenerator(window, 0.75)
    if window != 1:  # the other mask types do not care about cells
        check_mask_flags("random", window, mask_ratio=0.75)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_random_mps32_mask_ratio_must_lie_in_0_1(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        build_mask_generator("random_mps32", 14, mask_ratio=ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        CellMaskGenerator(14, ratio)


def test_random_mps32_other_cell_sizes():
    generator = CellMaskGenerator((12, 12), 0.75, cell=3)  # 4x4 cells of 3x3 patches
    assert (generator.num_mask_cells, generator.num_mask) == (12, 108)
    masks = np.stack([generator(np.random.default_rng(s)) for s in range(100)])
    cells = _cells_of(masks, 3)
    assert (cells.all(-1) == cells.any(-1)).all() and (masks.sum(axis=(1, 2)) == 108).all()
