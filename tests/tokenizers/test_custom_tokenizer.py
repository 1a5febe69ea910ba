"""The 'customized' tokenizer: small, cheap, saved and reloaded exactly."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mcbeit.tokenizers import CustomTokenizer, DallEEncoder, Normalize, build_tokenizer, save_custom_tokenizer
from mcbeit.tokenizers.custom import CUSTOM_FORMAT_VERSION


def test_default_config_is_small_and_cheap():
    tok = CustomTokenizer(image_size=112).eval()
    assert tok.kind == "customized"
    assert tok.config == dict(group_count=4, n_hid=16, n_blk_per_group=1, input_channels=3, vocab_size=8192,
                              cosine_scale=0.0)
    assert tok.input_transform == Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert sum(p.numel() for p in tok.parameters()) < 2_000_000
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = tok(torch.rand(1, 3, 112, 112))
    assert out.shape == (1, 8192, 14, 14)
    assert counter.get_total_flops() < 1e9


def test_save_and_reload_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    tok = CustomTokenizer(image_size=32, n_hid=8, vocab_size=128).eval()
    path = tmp_path / "tok.pth"
    save_custom_tokenizer(tok, path)
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "customized" and payload["config"]["n_hid"] == 8 and "state_dict" in payload

    loaded = build_tokenizer("customized", path, image_size=32)
    assert isinstance(loaded, CustomTokenizer) and not loaded.random_weights
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert loaded.config == tok.config and loaded.vocab_size == 128
    x = torch.stack([tok.input_transform(torch.rand(3, 32, 32)) for _ in range(2)])
    with torch.no_grad():
        assert torch.equal(loaded(x), tok(x))


def test_bad_files_are_reported(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"kind": "dall-e", "config": {}, "state_dict": {}}, wrong)
    with pytest.raises(ValueError, match="not a customized tokenizer"):
        build_tokenizer("customized", wrong)

    tok = CustomTokenizer(image_size=16, n_hid=8, vocab_size=32)
    broken = tmp_path / "broken.pth"
    save_custom_tokenizer(tok, broken)
    payload = torch.load(broken, weights_only=True)
    del payload["state_dict"]["blocks.output.conv.w"]
    torch.save(payload, broken)
    with pytest.raises(ValueError, match="blocks.output.conv.w"):
        build_tokenizer("customized", broken)

    with pytest.raises(FileNotFoundError):
        build_tokenizer("customized", tmp_path / "nope.pth")
    with pytest.raises(TypeError):
        save_custom_tokenizer(DallEEncoder(n_hid=8, vocab_size=32), tmp_path / "x.pth")
    with pytest.raises(ValueError, match="unknown customized tokenizer config"):
        CustomTokenizer(hidden=3)


def test_random_tokenizer_gives_peaked_soft_targets():
    """A random plain head gives nearly uniform softmax(L / 4) targets; the cosine head does not."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 56, 56) * torch.linspace(0.2, 1.0, 56)  # some spatial structure
    random_tok = build_tokenizer("customized", None, image_size=56)
    assert random_tok.random_weights and random_tok.config["cosine_scale"] > 0
    plain = CustomTokenizer(image_size=56).eval()
    x = torch.stack([random_tok.input_transform(i) for i in images])

    def entropy(tok):
        with torch.no_grad():
            probs = torch.softmax(tok(x) / 4.0, dim=1)
        return -(probs * probs.clamp_min(1e-12).log()).sum(1).mean().item()

    uniform = torch.log(torch.tensor(8192.0)).item()
    assert entropy(plain) > uniform - 0.05
    assert entropy(random_tok) < uniform - 1.0


TINY_VQ = dict(image_size=32, head="vq", vocab_size=64, n_hid=8, embed_dim=8)


def test_vq_head_logits_are_negative_scaled_squared_distances():
    torch.manual_seed(0)
    tok = CustomTokenizer(**TINY_VQ).eval()
    assert tok.has_decoder and tok.config["head"] == "vq" and tok.codebook.shape == (64, 8)
    x = torch.stack([tok.input_transform(torch.rand(3, 32, 32)) for _ in range(3)])
    with torch.no_grad():
        logits = tok(x)
        z = tok.encode(x)
    assert logits.shape == (3, 64, 4, 4) and logits.dtype == torch.float32
    dist2 = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), tok.codebook).pow(2)          # (B*h*w, V)
    torch.testing.assert_close(logits.permute(0, 2, 3, 1).reshape(-1, 64), -tok.logit_scale * dist2, atol=1e-3, rtol=1e-4)
    assert (logits <= 1e-4).all()
    ids = logits.argmax(1)
    assert torch.equal(ids.flatten(), dist2.argmin(1))                                       # argmax = nearest code
    images = tok.decode(ids)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="token ids"):
        tok.decode(torch.full((1, 4, 4), 64))
    plain = CustomTokenizer(image_size=32, n_hid=8, vocab_size=64)
    assert not plain.has_decoder and "head" not in plain.config
    with pytest.raises(NotImplementedError):
        plain.decode(ids)
    with pytest.raises(ValueError, match="cosine_scale"):
        CustomTokenizer(head="vq", cosine_scale=10.0)
    with pytest.raises(ValueError, match="head"):
        CustomTokenizer(head="gumbel")


def test_version_2_file_round_trip_and_version_1_files_still_load(tmp_path):
    torch.manual_seed(0)
    vq = CustomTokenizer(**TINY_VQ).eval()
    save_custom_tokenizer(vq, tmp_path / "vq.pth")
    payload = torch.load(tmp_path / "vq.pth", weights_only=True)
    assert payload["format_version"] == CUSTOM_FORMAT_VERSION == 2
    assert payload["config"]["head"] == "vq" and "codebook" in payload["state_dict"]
    assert any(k.startswith("decoder.") for k in payload["state_dict"])
    loaded = build_tokenizer("customized", tmp_path / "vq.pth", image_size=32)
    assert loaded.has_decoder and not loaded.random_weights and loaded.config == vq.config
    x = torch.stack([vq.input_transform(torch.rand(3, 32, 32)) for _ in range(2)])
    ids = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        assert torch.equal(loaded(x), vq(x)) and torch.equal(loaded.decode(ids), vq.decode(ids))

    # A version-1 file as the previous release wrote it: no 'head' in the config.
    for cosine in (0.0, 100.0):
        old = CustomTokenizer(image_size=32, n_hid=8, vocab_size=64, cosine_scale=cosine).eval()
        v1 = {"kind": "customized", "format_version": 1,
              "config": dict(group_count=4, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=64,
                             cosine_scale=cosine),
              "state_dict": {k: v.clone() for k, v in old.state_dict().items()}}
        torch.save(v1, tmp_path / "v1.pth")
        back = build_tokenizer("customized", tmp_path / "v1.pth", image_size=32)
        assert not back.has_decoder and back.config == old.config
        with torch.no_grad():
            assert torch.equal(back(x), old(x))

    payload["format_version"] = 3
    torch.save(payload, tmp_path / "future.pth")
    with pytest.raises(ValueError, match="format_version 3"):
        build_tokenizer("customized", tmp_path / "future.pth")
