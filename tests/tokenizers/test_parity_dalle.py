"""Parity with OpenAI's ``dall_e`` package (test-only dependency ``dall-e`` + ``attrs``).

The package's ``Encoder`` / ``Decoder`` get random weights and are saved as OpenAI saved them
(``torch.save(module)``: a whole pickled module, in the zip and the legacy format), then read
through mcbeit's restricted unpickler by ``build_tokenizer('dall-e', folder)``. Logits and
reconstructions (``unmap_pixels(sigmoid(decoder(one_hot(ids))[:, :3]))``, OpenAI's and BEiT's
recipe) must agree to 1e-5. The package must be installed: a missing package fails here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dall_e import Decoder, Encoder, map_pixels, unmap_pixels

from mcbeit.tokenizers import DallEDecoder, DallEEncoder, build_tokenizer

TOL = 1e-5


def _perturb(module: torch.nn.Module, seed: int, bias_std: float = 0.05) -> torch.nn.Module:
    """OpenAI's init leaves biases at zero: give them values so that they are checked too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".b"):
                p.copy_(bias_std * torch.randn(p.shape, generator=gen))
    return module.eval()


def _save_openai_style(folder, encoder, decoder, legacy: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("encoder.pkl", encoder), ("decoder.pkl", decoder)):
        torch.save(module, folder / name, _use_new_zipfile_serialization=not legacy)
    return folder


def _reference_reconstruction(decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
    one_hot = F.one_hot(ids, num_classes=decoder.vocab_size).permute(0, 3, 1, 2).float()
    return unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))


@pytest.fixture(scope="module")
def small_pair():
    torch.manual_seed(0)
    # the package's validators: n_hid >= 64, vocab_size >= 512
    encoder = _perturb(Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), seed=1)
    decoder = _perturb(Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512), seed=2)
    return encoder, decoder


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_small_encoder_and_decoder_match_the_package(tmp_path, small_pair, legacy):
    encoder, decoder = small_pair
    folder = _save_openai_style(tmp_path / "dall_e", encoder, decoder, legacy)
    tok = build_tokenizer("dall-e", folder, image_size=32)
    assert isinstance(tok, DallEEncoder) and not tok.random_weights and tok.has_decoder
    assert tok.config == dict(group_count=4, n_hid=64, n_blk_per_group=1, input_channels=3, vocab_size=512)
    assert tok.decoder.config == dict(group_count=4, n_init=32, n_hid=64, n_blk_per_group=1, output_channels=3,
                                      vocab_size=512)
    assert list(tok.decoder.state_dict()) == list(decoder.state_dict())

    pixels = torch.rand(2, 3, 32, 32)
    x = tok.input_transform(pixels)
    assert torch.allclose(x, map_pixels(pixels))  # DALL-E's pixel mapping
    ids = torch.randint(0, 512, (2, 4, 4))
    with torch.inference_mode():
        ours, ref = tok(x), encoder(x)
        rec, ref_rec = tok.decode(ids), _reference_reconstruction(decoder, ids)
    assert ours.shape == ref.shape == (2, 512, 4, 4)
    assert (ours - ref).abs().max() <= TOL
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    assert rec.shape == ref_rec.shape == (2, 3, 32, 32)
    assert (rec - ref_rec).abs().max() <= TOL
    assert 0.0 < rec.std()  # not a constant image: the comparison means something


def test_full_size_released_format_matches_the_package(tmp_path):
    """The released files' configuration and format (legacy), at a tiny 16 px input / 2x2 tokens."""
    torch.manual_seed(3)
    encoder = _perturb(Encoder(), seed=4)
    decoder = _perturb(Decoder(), seed=5)
    folder = _save_openai_style(tmp_path / "dall_e_full", encoder, decoder, legacy=True)
    tok = build_tokenizer("dall-e", folder, image_size=112)
    assert tok.config == dict(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192)
    assert tok.has_decoder and tok.decoder.config["vocab_size"] == 8192
    x = map_pixels(torch.rand(1, 3, 16, 16))
    ids = torch.randint(0, 8192, (1, 2, 2))
    with torch.inference_mode():
        diff_logits = (tok(x) - encoder(x)).abs().max()
        diff_rec = (tok.decode(ids) - _reference_reconstruction(decoder, ids)).abs().max()
    assert diff_logits <= TOL and diff_rec <= TOL


def test_package_decoder_names_match_ours():
    ref = Decoder(n_init=16, n_hid=64, n_blk_per_group=2, vocab_size=512).state_dict()
    ours = DallEDecoder(n_init=16, n_hid=64, n_blk_per_group=2, vocab_size=512).state_dict()
    assert {k: tuple(v.shape) for k, v in ref.items()} == {k: tuple(v.shape) for k, v in ours.items()}
