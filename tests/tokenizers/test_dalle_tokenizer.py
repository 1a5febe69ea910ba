"""DALL-E encoder: OpenAI's parameter names/shapes, forward shapes, pixel map.

The expected names, shapes, counts and digest were taken once from OpenAI's ``dall_e``
package (DALL_E-0.1 wheel, ``dall_e.encoder.Encoder()`` with default arguments); mcbeit's
module matched it key for key and logit for logit (max |diff| 0.0 with its weights loaded).
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from mcbeit.tokenizers import DallEEncoder, MapPixels, build_tokenizer

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
