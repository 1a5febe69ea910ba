"""Pictures of what a tokenizer does: input/reconstruction grids, token-id maps, codebook-usage histograms."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(tokenizer, images: torch.Tensor, recon: torch.Tensor, n: int = 8) -> torch.Tensor:
    """(3, H', W') grid in [0, 1]: inputs on the top row, their reconstructions below."""
    from torchvision.utils import make_grid

    pics = torch.cat([tokenizer.to_pixels(images[:n]), tokenizer.to_pixels(recon[:n])]).cpu()
    return make_grid(pics, nrow=min(n, images.shape[0]), padding=2, pad_value=1.0)


def token_palette(vocab_size: int) -> np.ndarray:
    """A fixed false colour per token id (V, 3) uint8: neighbouring ids get unrelated colours."""
    return np.random.default_rng(12345).integers(30, 256, size=(vocab_size, 3), dtype=np.uint8)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8."""
    return (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def draw_token_grid(images: torch.Tensor, ids: torch.Tensor, recon: torch.Tensor | None, vocab_size: int,
                    title: str = "") -> Image.Image:
    """Columns: images; rows: the image, its token ids in false colour, the reconstruction (if any)."""
    pics = _to_uint8(images)
    b, h, w, _ = pics.shape
    palette = token_palette(vocab_size)
    tokens = palette[ids.cpu().numpy()]                                  # (B, h_t, w_t, 3)
    tokens = np.repeat(np.repeat(tokens, h // ids.shape[1], axis=1), w // ids.shape[2], axis=2)
    rows = [("image", pics), ("token ids", tokens)]
    if recon is not None:
        rows.append(("reconstruction", _to_uint8(recon)))
    gap, label_w, title_h = 4, 96, 18 if title else 0
    canvas = Image.new("RGB", (label_w + b * (w + gap) + gap, title_h + len(rows) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 3), title, fill="black")
    for r, (name, row) in enumerate(rows):
        top = title_h + gap + r * (h + gap)
        draw.text((gap, top + h // 2 - 6), name, fill="black")
        for c in range(b):
            canvas.paste(Image.fromarray(row[c]), (label_w + gap + c * (w + gap), top))
    return canvas


def draw_usage_histogram(counts: np.ndarray, title: str, width: int = 900, panel_h: int = 160) -> Image.Image:
    """Two panels: usage per code id (ids bucketed into columns) and codes sorted by usage (log scale)."""
    counts = np.asarray(counts, dtype=np.float64)
    vocab = len(counts)
    margin, title_h, gap = 40, 40, 30
    plot_w = width - 2 * margin
    canvas = Image.new("RGB", (width, title_h + 2 * panel_h + gap + 30), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 6), title, fill="black")

    def panel(top: int, values: np.ndarray, caption: str, colour) -> None:
        draw.rectangle([margin, top, margin + plot_w, top + panel_h], outline="black")
        draw.text((margin, top - 13), caption, fill="black")
        if len(values) == 0 or values.max() <= 0:
            return
        heights = values / values.max()
        for x in range(plot_w):
            v = heights[min(int(x * len(values) / plot_w), len(values) - 1)]
            if v > 0:
                draw.line([(margin + x, top + panel_h), (margin + x, top + panel_h - max(1, round(v * (panel_h - 2))))],
                          fill=colour)

    # Panel 1: token counts per code id; several ids share a column when V > plot width (their sum).
    per_col = max(1, math.ceil(vocab / plot_w))
    padded = np.zeros(per_col * math.ceil(vocab / per_col))
    padded[:vocab] = counts
    buckets = padded.reshape(-1, per_col).sum(axis=1)
    panel(title_h + 14, buckets, f"tokens per code id (0 .. {vocab - 1}; {per_col} id(s) per column), linear", (40, 90, 200))
    # Panel 2: codes ranked by usage, log10(1 + count), so rare codes stay visible.
    ranked = np.log10(1.0 + np.sort(counts)[::-1])
    panel(title_h + panel_h + gap + 14, ranked, "codes sorted by usage, log10(1 + count)", (200, 80, 40))
    return canvas
