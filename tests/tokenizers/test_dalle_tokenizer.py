"""DALL-E encoder and decoder: OpenAI's parameter names/shapes, forward shapes, pixel maps,
inference mode and bf16.

The expected names, shapes, counts and digests were taken once from OpenAI's ``dall_e``
package (DALL_E-0.1 wheel, ``dall_e.encoder.Encoder()`` / ``dall_e.decoder.Decoder()`` with
default arguments); ``test_parity_dalle.py`` compares with the package itself.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

import torch.nn.functional as F

from mcbeit.tokenizers import DallEDecoder, DallEEncoder, MapPixels, build_tokenizer, unmap_pixels
from tests.tokenizers.checks import check_inference_mode_and_bf16

# sha256 of "name:shape" lines, sorted by name, of dall_e.encoder.Encoder().state_dict()
OPENAI_ENCODER_DIGEST = "c3db94ea22947e722dab2dff6c8cd6351937a1219f91d0e0ae4c5ea9d855ebdc"
OPENAI_ENCODER_KEYS = 74
OPENAI_ENCODER_PARAMS = 53_786_240
OPENAI_ENCODER_SHAPES = {
    "blocks.input.w": (256, 3, 7, 7),
    "blocks.input.b": (256,),
    "blocks.group_1.block_1.res_path.conv_1.w": (64, 256, 3, 3),
    "blocks.group_2.block_1.id_path.w": (512, 256, 1, 1),
    "blocks.group_4.block_2.res_path.conv_4.w": (2048, 512, 1, 1),
    "blocks.output.conv.w": (8192, 2048, 1, 1),
    "blocks.output.conv.b": (8192,),
}


# the same for dall_e.decoder.Decoder().state_dict()
OPENAI_DECODER_DIGEST = "e7b6ac2600fe565e6ae66683608ad2a9fe64e0f2189fa0821afdabd489e05bf3"
OPENAI_DECODER_KEYS = 76
OPENAI_DECODER_PARAMS = 43_829_766
OPENAI_DECODER_SHAPES = {
    "blocks.input.w": (128, 8192, 1, 1),
    "blocks.group_1.block_1.id_path.w": (2048, 128, 1, 1),
    "blocks.group_1.block_1.res_path.conv_1.w": (512, 128, 1, 1),
    "blocks.group_4.block_2.res_path.conv_4.w": (256, 64, 3, 3),
    "blocks.output.conv.w": (6, 256, 1, 1),
}


def digest(state_dict) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state_dict.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def full_dalle():
    return build_tokenizer("dall-e", image_size=112)


def test_full_size_matches_openai_state_dict(full_dalle):
    sd = full_dalle.state_dict()
    assert len(sd) == OPENAI_ENCODER_KEYS
    assert sum(p.numel() for p in full_dalle.parameters()) == OPENAI_ENCODER_PARAMS
    for key, shape in OPENAI_ENCODER_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert "blocks.group_1.block_1.id_path.w" not in sd  # identity shortcut where widths agree
    assert digest(sd) == OPENAI_ENCODER_DIGEST


def test_full_size_forward_tiny_input(full_dalle):
    assert full_dalle.random_weights and not full_dalle.training
    assert isinstance(full_dalle.input_transform, MapPixels) and full_dalle.input_transform.eps == 0.1
    assert full_dalle.token_grid() == (14, 14)
    x = full_dalle.input_transform(torch.rand(3, 32, 32)).unsqueeze(0)
    with torch.no_grad():
        logits = full_dalle(x)
    assert logits.shape == (1, 8192, 4, 4) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_structure_and_post_gain():
    enc = DallEEncoder(n_hid=8, n_blk_per_group=2, vocab_size=16, image_size=16)
    assert enc.blocks.group_1.block_1.post_gain == pytest.approx(1 / 64)  # 4 groups x 2 blocks
    assert [n for n, _ in enc.blocks.named_children()] == ["input", "group_1", "group_2", "group_3", "group_4", "output"]
    assert hasattr(enc.blocks.group_3, "pool") and not hasattr(enc.blocks.group_4, "pool")
    assert enc.downsample == 8 and enc.config == dict(group_count=4, n_hid=8, n_blk_per_group=2, input_channels=3, vocab_size=16)
    # other group counts: downsample 2^(groups-1), widths double per group
    enc3 = DallEEncoder(group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=16, image_size=16)
    assert enc3.downsample == 4 and enc3.blocks.output.conv.w.shape == (16, 32, 1, 1)
    assert enc3(torch.rand(2, 3, 16, 16)).shape == (2, 16, 4, 4)


def test_block_math_matches_definition():
    """One block is id(x) + (1/n_layers^2) * conv4(relu(conv3(relu(conv2(relu(conv1(relu(x))))))))."""
    torch.manual_seed(0)
    enc = DallEEncoder(n_hid=8, n_blk_per_group=1, vocab_size=16, image_size=16)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(std=0.3)
    block = enc.blocks.group_2.block_1  # 8 -> 16 channels: has a 1x1 id_path
    x = torch.randn(1, 8, 6, 6)
    conv = lambda m, h: torch.nn.functional.conv2d(h, m.w, m.b, padding=(m.kw - 1) // 2)  # noqa: E731
    r = block.res_path
    h = conv(r.conv_1, x.relu())
    h = conv(r.conv_2, h.relu())
    h = conv(r.conv_3, h.relu())
    h = conv(r.conv_4, h.relu())
    expected = conv(block.id_path, x) + h / 16  # 4 layers
    assert torch.allclose(block(x), expected, atol=1e-6)


# --------------------------------------------------------------------------- decoder
def test_full_size_decoder_matches_openai_state_dict_and_decodes():
    dec = DallEDecoder().eval()
    sd = dec.state_dict()
    assert len(sd) == OPENAI_DECODER_KEYS and digest(sd) == OPENAI_DECODER_DIGEST
    assert sum(p.numel() for p in dec.parameters()) == OPENAI_DECODER_PARAMS
    for key, shape in OPENAI_DECODER_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert dec.config == dict(group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192)
    with torch.inference_mode():
        images = dec.decode(torch.randint(0, 8192, (1, 2, 2)))
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_decoder_structure():
    dec = DallEDecoder(n_init=8, n_hid=8, n_blk_per_group=2, vocab_size=16)
    assert dec.blocks.group_1.block_1.post_gain == pytest.approx(1 / 64)
    assert [n for n, _ in dec.blocks.named_children()] == ["input", "group_1", "group_2", "group_3", "group_4", "output"]
    assert [m.kw for m in (dec.blocks.group_1.block_1.res_path[i] for i in (1, 3, 5, 7))] == [1, 3, 3, 3]
    assert [g.block_2.res_path.conv_4.n_out for g in (dec.blocks[i] for i in range(1, 5))] == [64, 32, 16, 8]
    assert isinstance(dec.blocks.group_3.upsample, torch.nn.Upsample) and not hasattr(dec.blocks.group_4, "upsample")
    assert dec(torch.rand(2, 16, 3, 2)).shape == (2, 6, 24, 16)
    with pytest.raises(ValueError, match="16"):
        dec(torch.rand(2, 8, 3, 2))


def test_decode_is_unmapped_sigmoid_of_decoder_on_one_hot():
    """OpenAI's and BEiT's recipe: unmap_pixels(sigmoid(decoder(one_hot(ids))[:, :3]))."""
    torch.manual_seed(0)
    dec = DallEDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(std=0.5)
    ids = torch.randint(0, 32, (2, 3, 2))
    with torch.no_grad():
        stats = dec(F.one_hot(ids, 32).permute(0, 3, 1, 2).float())
        expected = ((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8).clamp(0, 1)
        images = dec.decode(ids)
    assert torch.allclose(images, expected, atol=1e-6)
    assert images.min() == 0 and images.max() == 1  # weights this large saturate: the clamp is exercised
    assert torch.allclose(unmap_pixels(MapPixels()(images)), images, atol=1e-6)  # unmap inverts map
    for bad in (torch.full((1, 2, 2), 32), torch.full((1, 2, 2), -1)):
        with pytest.raises(ValueError, match=r"\[0, 32\)"):
            dec.decode(bad)
    with pytest.raises(TypeError):
        dec.decode(torch.zeros(1, 2, 2))


def test_encoder_accepts_matching_decoder_only():
    enc = DallEEncoder(n_hid=8, n_blk_per_group=1, vocab_size=32, image_size=16)
    assert not enc.has_decoder
    with pytest.raises(NotImplementedError):
        enc.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        enc.attach_decoder(DallEDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16))
    with pytest.raises(ValueError, match="f4"):
        enc.attach_decoder(DallEDecoder(group_count=3, n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32))
    dec = DallEDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
    assert enc.attach_decoder(dec).has_decoder
    ids = torch.randint(0, 32, (1, 2, 2))
    with torch.no_grad():
        assert torch.equal(enc.decode(ids), dec.decode(ids))


# --------------------------------------------------------------------------- inference mode, bf16
def test_full_size_inference_mode_and_bf16(full_dalle):
    """Inference mode and bf16 as pre-training runs it (tests/tokenizers/checks.py)."""
    dec = DallEDecoder().eval()
    full_dalle.attach_decoder(dec)
    try:
        check_inference_mode_and_bf16(full_dalle)
    finally:
        full_dalle.decoder = None
