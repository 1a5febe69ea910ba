"""Checks shared by the tokenizer tests."""
from __future__ import annotations

import torch


def check_inference_mode_and_bf16(tok) -> None:
    """Pre-training runs tokenizers under inference_mode (bf16 autocast where asked), then uses the
    logits outside inference mode under no_grad: softmax, argmax, boolean indexing. ``tok`` is a
    full-size (8192 codes) tokenizer with a decoder, fed 16 px images (2x2 tokens)."""
    x = tok.input_transform(torch.rand(1, 3, 16, 16))
    with torch.inference_mode():
        ref = tok(x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = tok(x)
        images = tok.decode(ref.argmax(1))
    assert ref.dtype == low.dtype == images.dtype == torch.float32
    assert ref.shape == low.shape == (1, 8192, 2, 2) and images.shape == (1, 3, 16, 16)
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max()
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        probs = torch.softmax(ref / 4.0, dim=1)
        ids = ref.argmax(dim=1)
        rows = ref.flatten(2).transpose(1, 2)[torch.tensor([[True, False, True, True]])]
    assert torch.allclose(probs.sum(1), torch.ones(1, 2, 2)) and ids.shape == (1, 2, 2) and rows.shape == (3, 8192)
