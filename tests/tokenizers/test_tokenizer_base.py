"""Input transforms, geometry checks and the factory of mcbeit.tokenizers (cheap tokenizers only)."""
from __future__ import annotations

import logging
import pickle

import pytest
import torch

from mcbeit.tokenizers import (
    TOKENIZER_KINDS,
    CustomTokenizer,
    MapPixels,
    Normalize,
    Tokenizer,
    build_tokenizer,
    canonical_kind,
)


def test_map_pixels_range_matches_dalle():
    x = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 2, 2)
    y = MapPixels(eps=0.1)(x)
    assert torch.allclose(y[:, 0, 0], torch.tensor([0.1, 0.5, 0.9]))
    rand = MapPixels()(torch.rand(3, 8, 8))
    assert rand.min() >= 0.1 and rand.max() <= 0.9


def test_normalize_half_maps_to_minus_one_one():
    x = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 0.5), torch.ones(4, 4)])
    y = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(x)
    assert torch.equal(y[0], torch.full((4, 4), -1.0))
    assert torch.equal(y[1], torch.zeros(4, 4))
    assert torch.equal(y[2], torch.ones(4, 4))
    # also batched
    assert Normalize()(x.unsqueeze(0)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("transform", [MapPixels(0.1), Normalize((0.5,) * 3, (0.5,) * 3), Normalize((0.1, 0.2, 0.3), (1, 2, 3))])
def test_input_transforms_pickle(transform):
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == transform
    x = torch.rand(3, 5, 5)
    assert torch.equal(clone(x), transform(x))


def test_transforms_reject_uint8():
    with pytest.raises(TypeError):
        MapPixels()(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        Normalize()(torch.zeros(3, 2, 2, dtype=torch.uint8))


def test_kinds_and_aliases():
    assert TOKENIZER_KINDS == ("dall-e", "vqgan", "customized", "vqgan_ema", "vqkd")
    assert canonical_kind("vqgan_gumbel_f8_8192") == "vqgan"
    assert canonical_kind("DALL-E") == "dall-e"
    with pytest.raises(ValueError) as err:
        build_tokenizer("vqgan_f16")
    for kind in TOKENIZER_KINDS:
        assert kind in str(err.value)


def test_random_customized_is_frozen_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        tok = build_tokenizer("customized", image_size=112)
    assert any("RANDOM" in r.getMessage() and "--discrete_vae_weight_path" in r.getMessage() for r in caplog.records)
    assert isinstance(tok, Tokenizer) and isinstance(tok, CustomTokenizer)
    assert tok.random_weights is True
    assert not tok.training
    assert all(not p.requires_grad for p in tok.parameters())
    assert (tok.vocab_size, tok.downsample, tok.image_size) == (8192, 8, 112)
    assert tok.token_grid() == (14, 14) and tok.token_grid(224) == (28, 28) and tok.token_grid((64, 32)) == (8, 4)
    images = torch.stack([tok.input_transform(torch.rand(3, 112, 112)) for _ in range(2)])
    logits = tok(images)
    assert logits.shape == (2, 8192, 14, 14) and logits.dtype == torch.float32
    pickle.loads(pickle.dumps(tok.input_transform))


def test_non_divisible_sizes_raise():
    tok = build_tokenizer("customized", image_size=32)
    with pytest.raises(ValueError, match="multiple of 8"):
        tok(torch.rand(1, 3, 36, 36))
    with pytest.raises(ValueError, match="multiple of 8"):
        tok(torch.rand(1, 3, 32, 20))
    with pytest.raises(ValueError, match="multiple of 8"):
        tok.token_grid(100)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tokenizer("customized", image_size=100)


def test_forward_checks_layout():
    tok = build_tokenizer("customized", image_size=16)
    with pytest.raises(ValueError, match="channels"):
        tok(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tok(torch.rand(3, 16, 16))
    with pytest.raises(TypeError):
        tok(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_bf16_autocast_returns_float32():
    tok = build_tokenizer("customized", image_size=16)
    x = torch.rand(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok(x)
    assert out.dtype == torch.float32 and out.shape == (1, 8192, 2, 2)
    # The random tokenizer's logits are 100 x a cosine: bf16 keeps them to about 1% of that range.
    assert torch.allclose(out, tok(x), atol=1.0, rtol=0.05)


def test_dalle_weight_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.pkl"):
        build_tokenizer("dall-e", tmp_path)
