"""Decoding one image file into 8-bit RGB, refusing what must not be trained on, and the rule
that stops a run whose data is too broken.

- :func:`load_rgb_image` decodes a file at once; :func:`open_image` only reads its header, and
  the :class:`OpenedImage` it returns decodes on request (a JPEG at reduced scale if asked), with
  the same checks and conversions.
- Images that decode are converted: grayscale, palette, alpha, CMYK, and 16-bit or float images
  (rescaled from their value range, not clipped).
- Files that do not decode (corrupt, truncated, zero-byte, not an image, or larger than
  ``MAX_PIXELS``, checked before any pixel is decoded) raise; the datasets skip and count them.
- A skip rate above ``--max_bad_fraction`` stops the run: the engine's bad-data policy
  (:func:`mcbeit.engine.bad_data.check_bad_fraction`, raising :class:`mcbeit.errors.TooManyBadImagesError`).

Truncated files must fail to decode, so Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept off
(if another library turns it on, loading turns it off again, with a warning).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageFile

from mcbeit.errors import TooManyBadImagesError

__all__ = ["MAX_PIXELS", "OpenedImage", "TooManyBadImagesError", "load_rgb_image", "open_image"]

logger = logging.getLogger("mcbeit.data.datasets")  # the warnings users already know by this name

# Images with more pixels are not decoded (a decompression bomb: a small file that decodes to
# gigabytes). Pillow's own limit, read at import; Pillow itself refuses twice as many in
# Image.open and only warns below that, hence the check here. None disables it.
MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit grayscale ("L").

    16-bit modes map their full range 0..65535 onto 0..255. Modes "I" and "F" do not say what
    range their values use, so it is guessed: 0..1 (floats) or 0..255 are taken as they are,
    0..65535 as 16-bit, anything else (negative, larger, a depth map) is stretched min..max.
    """
    array = np.asarray(image, dtype=np.float32)  # numpy reads the big-endian I;16B too
    if image.mode.startswith("I;16"):
        array = array * np.float32(255.0 / 65535.0)
    elif array.size:
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(array.min()), float(array.max())
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            array = array * np.float32(255.0)
        elif low >= 0.0 and high <= 255.0:
            pass
        elif low >= 0.0 and high <= 65535.0:
            array = array * np.float32(255.0 / 65535.0)
        else:
            array = (array - np.float32(low)) * np.float32(255.0 / (high - low))
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image as 8-bit RGB (16-bit and float images rescaled, not clipped;
    transparency dropped, CMYK and other colour spaces converted)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_8bit(image).convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return image.convert("RGB")  # a mode Pillow cannot convert raises: the file is skipped


def _keep_truncated_images_failing() -> None:
    """Turn Pillow's ``LOAD_TRUNCATED_IMAGES`` back off if something turned it on: with it, a
    truncated file decodes with its missing part filled grey, and would be trained on."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was turned on (by another library or a script); "
            "mcbeit turns it off so that truncated images are skipped, not trained on half grey"
        )


def _check_pixel_count(size: tuple[int, int]) -> None:
    width, height = size
    if MAX_PIXELS is not None and width * height > MAX_PIXELS:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height:,} pixels, more than the limit of {MAX_PIXELS:,} "
            "(a possible decompression bomb); not decoded"
        )


class OpenedImage:
    """An image file whose header is read (its full ``size`` is known) but whose pixels are not
    decoded yet; :meth:`decode` decodes them, once, as 8-bit RGB.

    Why: a transform that learns the size first can ask for less. A JPEG can be decoded at 1/2,
    1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's ``Image.draft``), much cheaper than
    decoding every pixel only to throw most of them away in a downscale.

    Opening raises what :func:`load_rgb_image` raises before any pixel is decoded (unidentified
    files, more than ``MAX_PIXELS`` pixels); :meth:`decode` raises what decoding raises (truncated
    or corrupt data, unconvertible modes) and keeps it in ``error``, so that a caller can tell a
    bad file from a failure of its own code. Use it as a context manager to close the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        _keep_truncated_images_failing()
        self.path = path
        self._image: Image.Image | None = Image.open(path)
        self.size: tuple[int, int] = self._image.size  # (width, height) of the full image
        self.reduction = 1  # the full size divided by the decoded one: 1, 2, 4 or 8
        self.error: Exception | None = None  # what decode() raised, if it failed
        try:
            _check_pixel_count(self.size)
        except BaseException:
            self.close()
            raise

    def decode(self, max_reduction: int = 1) -> Image.Image:
        """The image as 8-bit RGB, at full size, or for a JPEG at 1/2, 1/4 or 1/8 of it: the
        largest of these factors that is at most ``max_reduction`` (``reduction`` then says
        which; a pixel (x, y) of the full image is at (x / reduction, y / reduction))."""
        image = self._image
        if image is None:
            raise RuntimeError(f"{self.path}: decode() may be called once, before close()")
        try:
            if max_reduction >= 2 and image.format == "JPEG":
                self.reduction = _draft(image, max_reduction)
            image.load()
            return _to_rgb(image)
        except Exception as error:
            self.error = error
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Close the file (the decoded image stays usable)."""
        if self._image is not None:
            image, self._image = self._image, None
            image.__exit__(None, None, None)  # Image.close() would also free decoded pixels

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenedImage({str(self.path)!r}, size={self.size})"


def _draft(image: Image.Image, max_reduction: int) -> int:
    """Ask the JPEG decoder for DCT scaling by the largest of 8, 4, 2 that is at most
    ``max_reduction``; returns the factor it set (1: none)."""
    width, height = image.size
    factor = next(f for f in (8, 4, 2, 1) if f <= min(max_reduction, width, height))
    if factor == 1:
        return 1
    # Pillow picks the largest power of 2 <= min(width // w, height // h) for a requested (w, h);
    # for (width // factor, height // factor) that is `factor` exactly (each quotient is in
    # [factor, 2 * factor)).
    drafted = image.draft(None, (width // factor, height // factor))
    if drafted is None:  # e.g. a JPEG Pillow reads in several tiles
        return 1
    return round(width / drafted[1][2])  # Pillow reports the full image's box in decoded pixels


def open_image(path: str | os.PathLike) -> OpenedImage:
    """Open an image file without decoding it (see :class:`OpenedImage`)."""
    return OpenedImage(path)


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully and return it as RGB; raises if it is not a decodable image.

    Raises (among others) ``PIL.UnidentifiedImageError`` for zero-byte and non-image files,
    ``OSError`` for truncated or corrupt ones, and ``PIL.Image.DecompressionBombError`` for
    images of more than ``MAX_PIXELS`` pixels, before their pixels are decoded.
    """
    with open_image(path) as opened:
        return opened.decode()
