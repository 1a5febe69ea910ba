"""The 'customized' tokenizer: small, cheap, saved and reloaded exactly."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mcbeit.tokenizers import CustomTokenizer, DallEEncoder, Normalize, build_tokenizer, save_custom_tokenizer


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
