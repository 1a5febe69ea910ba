"""Patch masks for masked image modelling.

Both generators take an explicit ``numpy.random.Generator`` per call, so a mask depends only on
the generator handed in (the dataset seeds it from ``(seed, epoch, index)``), never on process
state: the original's module-level numpy state repeated the same masks in every data-loader
worker.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BlockMaskGenerator", "CellMaskGenerator", "RandomMaskGenerator", "build_mask_generator", "check_mask_flags",
           "MASK_TYPES", "MASK_CELL_PIXELS"]

MASK_TYPES = ("block", "random", "random_mps32")
#: random_mps32's mask cell: 32 pixels (2x2 patches of 16)
MASK_CELL_PIXELS = 32


def _window(window: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(window, (int, np.integer)):
        window = (int(window), int(window))
    height, width = (int(v) for v in window)
    if height < 1 or width < 1:
        raise ValueError(f"mask window must be positive, got {height}x{width}")
    return height, width


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """``random.uniform(a, b)``: a value between a and b, also when a > b."""
    return a + (b - a) * rng.random()


class BlockMaskGenerator:
    """BEiT's block-wise masking: rectangles of random area and aspect until the target count.

    Each rectangle has an area drawn uniformly in ``[min_num_patches, remaining]`` and a
    log-uniform aspect ratio in ``[min_aspect, max_aspect]``; up to 10 attempts per rectangle,
    one is accepted when it adds between 1 and ``remaining`` new patches. The mask can stop
    short of ``num_masking_patches`` (at the defaults about a third of the masks do, mean 74.5
    of 75), exactly like the original.

    ``exact=True`` is BEiT v2's generator (unilm beit2/masking_generator.py): after that drawing,
    a mask with too many patches gets ``count - N`` of its masked positions (row-major order) chosen
    without replacement un-masked, one with too few gets ``N - count`` of its unmasked positions
    chosen without replacement masked, so every mask has exactly ``num_masking_patches``. (The
    drawing never overshoots, so only the top-up happens; the trim is kept as the original has it.)
    """

    def __init__(
        self,
        window: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = False,
    ) -> None:
        self.height, self.width = _window(window)
        self.exact = bool(exact)
        self.num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} must lie in [0, {self.num_patches}] "
                f"for a {self.height}x{self.width} patch grid"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
        max_aspect = 1.0 / min_aspect if (max_aspect is None and min_aspect > 0) else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect > 0):
            raise ValueError(f"aspect bounds must be positive, got {min_aspect}, {max_aspect}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"BlockMaskGenerator({self.height}x{self.width}, num_masking_patches="
            f"{self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({lo:.3g}, {hi:.3g})"
            f"{', exact (BEiT v2)' if self.exact else ''})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask: int, rng: np.random.Generator) -> int:
        """Try (up to 10 times) to mask one rectangle; return how many patches it added."""
        for _ in range(10):
            target_area = _uniform(rng, self.min_num_patches, max_mask)
            aspect = math.exp(_uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]  # view into mask
                new = h * w - int(block.sum())
                if 0 < new <= max_mask:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=np.bool_)
        count = 0
        while count < self.num_masking_patches:
            max_mask = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_mask, rng)
            if added == 0:
                break
            count += added
        if self.exact and count != self.num_masking_patches:
            self._force_count(mask, count, rng)
        return mask

    def _force_count(self, mask: np.ndarray, count: int, rng: np.random.Generator) -> None:
        """BEiT v2: un-mask (count - N) random masked positions, or mask (N - count) random unmasked ones."""
        flat = mask.reshape(-1)  # view, row-major as numpy's nonzero()
        if count > self.num_masking_patches:
            positions = np.flatnonzero(flat)
            flat[positions[rng.choice(positions.size, count - self.num_masking_patches, replace=False)]] = False
        else:
            positions = np.flatnonzero(~flat)
            flat[positions[rng.choice(positions.size, self.num_masking_patches - count, replace=False)]] = True


class RandomMaskGenerator:
    """Exactly ``int(mask_ratio * num_patches)`` patches masked at uniformly random positions."""

    def __init__(self, window: int | tuple[int, int], mask_ratio: float) -> None:
        self.height, self.width = _window(window)
        self.num_patches = self.height * self.width
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.num_mask = int(mask_ratio * self.num_patches)

    def __repr__(self) -> str:
        return (
            f"RandomMaskGenerator({self.height}x{self.width}, mask_ratio={self.mask_ratio}, "
            f"num_mask={self.num_mask})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=np.bool_)
        mask[rng.permutation(self.num_patches)[: self.num_mask]] = True
        return mask.reshape(self.height, self.width)


class CellMaskGenerator:
    """ConMIM's ``random_mps32`` (SimMIM's generator): the patch grid cut into cells of ``cell`` x ``cell``
    patches (32 pixels: 2x2 patches of 16), ``ceil(cells * mask_ratio)`` cells masked at uniformly
    random positions, each masking all its patches. At 224 px: a 7x7 cell grid, 37 of 49 cells, 148 of
    196 patches (75.5 %). The original hard-codes 224 px; here any grid whose sides are multiples of
    ``cell`` works (:func:`check_mask_flags` says which input sizes fit otherwise)."""

    def __init__(self, window: int | tuple[int, int], mask_ratio: float, cell: int = 2) -> None:
        self.height, self.width = _window(window)
        if cell < 1 or self.height % cell or self.width % cell:
            raise ValueError(f"a {self.height}x{self.width} patch grid is not made of {cell}x{cell} cells")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.cell, self.mask_ratio = int(cell), float(mask_ratio)
        self.cells = (self.height // cell, self.width // cell)
        self.num_cells = self.cells[0] * self.cells[1]
        self.num_mask_cells = int(math.ceil(self.num_cells * self.mask_ratio))
        self.num_mask = self.num_mask_cells * cell * cell

    def __repr__(self) -> str:
        return (f"CellMaskGenerator({self.height}x{self.width}, cells {self.cell}x{self.cell} patches, "
                f"{self.num_mask_cells} of {self.num_cells} cells = {self.num_mask} patches, "
                f"mask_ratio={self.mask_ratio})")

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        cells = np.zeros(self.num_cells, dtype=np.bool_)
        cells[rng.permutation(self.num_cells)[: self.num_mask_cells]] = True
        cells = cells.reshape(self.cells)                                    # (h/c, w/c)
        return cells.repeat(self.cell, axis=0).repeat(self.cell, axis=1)    # (h, w)


def check_mask_flags(
    mask_type: str,
    window: int | tuple[int, int],
    num_mask_patches: int = 75,
    mask_ratio: float = 0.75,
    min_per_block: int = 16,
    max_per_block: int | None = None,
    cell: int = 2,
) -> None:
    """Raise ValueError, in the command line's terms, when the masking flags cannot give useful masks
    on a ``window`` patch grid: more patches than the grid has, no patch at all, or blocks that
    cannot be drawn (the original then silently masks fewer patches, or none), or a grid that is not made
    of random_mps32's ``cell`` x ``cell`` cells. Only the flags of ``mask_type`` are checked."""
    height, width = _window(window)
    grid, patches = f"{height}x{width} patch grid", height * width
    kind = str(mask_type).strip().lower()
    if kind == "random_mps32":
        if cell < 1 or height % cell or width % cell:
            raise ValueError(f"--mask_type random_mps32 masks cells of {MASK_CELL_PIXELS} pixels ({cell}x{cell} "
                             f"patches), which the {grid} is not made of: use an --input_size that is a multiple of "
                             f"{MASK_CELL_PIXELS} (224 gives 7x7 cells), or --mask_type random")
    if kind in ("random", "random_mps32"):
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"--mask_ratio must lie in (0, 1), got {mask_ratio}")
        if kind == "random" and int(mask_ratio * patches) < 1:
            raise ValueError(f"--mask_ratio {mask_ratio} masks int({mask_ratio} x {patches}) = 0 of the {patches} "
                             f"patches of the {grid}; use --mask_ratio of at least {1 / patches:.4g}")
        return
    if kind != "block":
        raise ValueError(f"unknown mask_type {mask_type!r}: choose one of {', '.join(MASK_TYPES)}")
    example = max(1, round(patches * 75 / 196))  # the original's 75 of 196
    if num_mask_patches < 1:
        raise ValueError(f"--num_mask_patches must be at least 1, got {num_mask_patches}: use e.g. {example} of "
                         f"the {patches} patches of the {grid}")
    if num_mask_patches > patches:
        raise ValueError(f"--num_mask_patches {num_mask_patches} is more than the {patches} patches of the {grid}: "
                         f"use at most {patches} (e.g. {example}, the original's 75 of 196), or a larger --input_size")
    if min_per_block < 1:
        raise ValueError(f"--min_mask_patches_per_block must be at least 1, got {min_per_block}")
    if max_per_block is not None and max_per_block < min_per_block:
        raise ValueError(f"--min_mask_patches_per_block {min_per_block} is more than --max_mask_patches_per_block "
                         f"{max_per_block}: no block size lies between them; lower the minimum or raise the maximum")
    if min_per_block > num_mask_patches:
        raise ValueError(f"--min_mask_patches_per_block {min_per_block} is more than --num_mask_patches "
                         f"{num_mask_patches}: every block would overshoot the count; use "
                         f"--min_mask_patches_per_block {num_mask_patches} or less, or mask more patches")
    largest = (height - 1) * (width - 1)  # a block is narrower and shorter than the grid
    if min_per_block > largest:
        raise ValueError(f"--min_mask_patches_per_block {min_per_block}: no block fits the {grid} (a block is at "
                         f"most {height - 1}x{width - 1} = {largest} patches); use --min_mask_patches_per_block "
                         f"{largest} or less, or a larger --input_size")


def build_mask_generator(
    mask_type: str,
    window: int | tuple[int, int],
    num_mask_patches: int = 75,
    mask_ratio: float = 0.75,
    min_per_block: int = 16,
    max_per_block: int | None = None,
    exact: bool = False,
    cell: int = 2,
) -> BlockMaskGenerator | RandomMaskGenerator | CellMaskGenerator:
    """The generator the command line asks for: ``block`` (BEiT; ``exact``: BEiT v2's, always
    ``num_mask_patches``), ``random`` (mc-BEiT recipe, always exact) or ``random_mps32`` (ConMIM: cells
    of ``cell`` x ``cell`` patches); flags that cannot give useful
    masks raise ValueError (:func:`check_mask_flags`)."""
    check_mask_flags(mask_type, window, num_mask_patches, mask_ratio, min_per_block, max_per_block, cell)
    kind = str(mask_type).strip().lower()
    if kind == "block":
        return BlockMaskGenerator(
            window, num_mask_patches, min_num_patches=min_per_block, max_num_patches=max_per_block, exact=exact
        )
    if kind == "random":
        return RandomMaskGenerator(window, mask_ratio)
    if kind == "random_mps32":
        return CellMaskGenerator(window, mask_ratio, cell)
    raise ValueError(f"unknown mask_type {mask_type!r}: choose one of {', '.join(MASK_TYPES)}")
