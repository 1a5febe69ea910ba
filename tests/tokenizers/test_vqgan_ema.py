"""VQGAN with an EMA codebook (taming's ``EMAVQ``): logits are NEGATIVE squared distances.

The state-dict layout follows taming's ``EMAVectorQuantizer`` (``quantize.embedding.weight`` /
``cluster_size`` / ``embed_avg``, Sep 2021; the Aug 2021 layout kept the statistics directly
under ``quantize.``). ``test_parity_vqgan.py`` compares with taming's own modules.
"""
from __future__ import annotations

import logging

import pytest
import torch
import yaml

from mcbeit.tokenizers import TOKENIZER_KINDS, EMAVQGANTokenizer, Normalize, build_tokenizer

SMALL_DDCONFIG = dict(
    double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)


@pytest.fixture()
def small_ema():
    """A small EMAVQ (embed_dim 16 != z_channels 32, as EMAVQ allows) with its decoder."""
    torch.manual_seed(0)
    tok = EMAVQGANTokenizer(SMALL_DDCONFIG, n_embed=64, embed_dim=16, image_size=32, with_decoder=True).eval()
    with torch.no_grad():
        tok.quantize.embedding.weight.mul_(0.3)
        tok.quantize.embedding.cluster_size.uniform_(0, 5)
        tok.quantize.embedding.embed_avg.normal_()
    return tok


def _nearest_codes(tok, x):
    """Index of the nearest code by brute force (torch.cdist), shape (B, h, w)."""
    z = tok.quant_conv(tok.encoder(x))  # (B, D, h, w)
    b, d, h, w = z.shape
    dist = torch.cdist(z.permute(0, 2, 3, 1).reshape(1, -1, d), tok.quantize.embedding.weight[None])[0]  # (Bhw, V)
    return dist.argmin(dim=1).view(b, h, w), dist.pow(2).view(b, h, w, -1).permute(0, 3, 1, 2)


def test_kind_and_random_weights(caplog):
    assert "vqgan_ema" in TOKENIZER_KINDS
    with caplog.at_level(logging.WARNING):
        tok = build_tokenizer("vqgan_ema", image_size=112)
    assert isinstance(tok, EMAVQGANTokenizer) and tok.kind == "vqgan_ema"
    assert tok.random_weights and not tok.training and all(not p.requires_grad for p in tok.parameters())
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    assert (tok.vocab_size, tok.downsample, tok.token_grid()) == (8192, 8, (14, 14))
    assert tok.input_transform == Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert not tok.has_decoder
    with pytest.raises(ValueError, match="load_decoder=True needs the weights"):
        build_tokenizer("vqgan_ema", load_decoder=True)
    sd = tok.state_dict()
    assert tuple(sd["quantize.embedding.weight"].shape) == (8192, 256)
    assert tuple(sd["quantize.embedding.cluster_size"].shape) == (8192,)
    assert tuple(sd["quantize.embedding.embed_avg"].shape) == (8192, 256)
    x = tok.input_transform(torch.rand(1, 3, 16, 16))
    with torch.inference_mode():
        logits = tok(x)
    assert logits.shape == (1, 8192, 2, 2) and logits.dtype == torch.float32 and (logits <= 1e-3).all()


def test_logits_are_negative_squared_distances_and_argmax_is_nearest_code(small_ema):
    x = small_ema.input_transform(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        logits = small_ema(x)
        nearest, sq_dist = _nearest_codes(small_ema, x)
    assert logits.shape == (3, 64, 4, 4) and logits.is_contiguous()
    assert torch.allclose(logits, -sq_dist, atol=1e-4, rtol=1e-5)
    assert torch.equal(logits.argmax(dim=1), nearest)
    # softmax prefers the nearest code, not the farthest
    probs = torch.softmax(logits, dim=1)
    assert torch.equal(probs.argmax(dim=1), nearest)
    assert (probs.gather(1, sq_dist.argmax(1, keepdim=True)) < probs.gather(1, nearest.unsqueeze(1))).all()


def test_bf16_autocast_keeps_distances_in_float32(small_ema):
    x = small_ema.input_transform(torch.rand(2, 3, 32, 32))
    with torch.inference_mode():
        ref = small_ema(x)
        z = small_ema.quant_conv(small_ema.encoder(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = small_ema(x)
            from_fp32_z = small_ema.quantize(z)  # the distance itself is not computed in bf16
            images = small_ema.decode(ref.argmax(1))
    assert low.dtype == from_fp32_z.dtype == images.dtype == torch.float32
    assert torch.allclose(from_fp32_z, ref, atol=1e-5, rtol=1e-6)
    assert (low - ref).abs().max() <= 0.05 * ref.abs().max()
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():  # the inference tensors used afterwards, as the training loop does
        probs = torch.softmax(ref / 4.0, dim=1)
        rows = ref.flatten(2).transpose(1, 2)[torch.rand(2, 16) < 0.5]
    assert torch.allclose(probs.sum(1), torch.ones(2, 4, 4)) and rows.shape[1] == 64


def test_decode_uses_codebook_rows(small_ema):
    ids = torch.randint(0, 64, (1, 2, 3))
    with torch.no_grad():
        quant = small_ema.quantize.embedding.weight[ids].permute(0, 3, 1, 2)
        raw = small_ema.decoder(small_ema.post_quant_conv(quant))
        images = small_ema.decode(ids)
    assert small_ema.post_quant_conv.weight.shape == (32, 16, 1, 1)
    assert torch.allclose(images, ((raw + 1) / 2).clamp(0, 1), atol=1e-6)


# --------------------------------------------------------------------------- taming log folders
def _model_yaml(target="taming.models.vqgan.EMAVQ"):
    return {"model": {"base_learning_rate": 4.5e-06, "target": target, "params": {
        "embed_dim": 16, "n_embed": 64, "ddconfig": dict(SMALL_DDCONFIG),
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 10000, "codebook_weight": 1.0}}}}}


def _write(folder, tok, yaml_doc=None, aug_2021_layout=False, drop=()):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(yaml_doc or _model_yaml()))
    sd = {k: v.clone() for k, v in tok.state_dict().items()}
    if aug_2021_layout:
        for name in ("cluster_size", "embed_avg"):
            sd[f"quantize.{name}"] = sd.pop(f"quantize.embedding.{name}")
    for key in drop:
        del sd[key]
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    torch.save({"epoch": 1, "global_step": 10, "state_dict": sd, "optimizer_states": [], "lr_schedulers": []},
               folder / "last.ckpt")
    return folder


@pytest.mark.parametrize("aug_2021_layout", [False, True], ids=["sep2021", "aug2021"])
def test_folder_loads_with_equal_logits_and_decodes(tmp_path, small_ema, aug_2021_layout):
    folder = _write(tmp_path / "ema", small_ema, aug_2021_layout=aug_2021_layout)
    tok = build_tokenizer("vqgan_ema", folder, image_size=32)
    assert isinstance(tok, EMAVQGANTokenizer) and not tok.random_weights and tok.has_decoder
    assert torch.equal(tok.quantize.embedding.embed_avg, small_ema.quantize.embedding.embed_avg)
    x = tok.input_transform(torch.rand(2, 3, 32, 32))
    ids = torch.randint(0, 64, (2, 4, 4))
    with torch.inference_mode():
        assert torch.equal(tok(x), small_ema(x))
        assert torch.equal(tok.decode(ids), small_ema.decode(ids))
    assert not build_tokenizer("vqgan_ema", folder, image_size=32, load_decoder=False).has_decoder


def test_folder_problems_are_named(tmp_path, small_ema):
    folder = _write(tmp_path / "missing", small_ema, drop=("quantize.embedding.weight",))
    with pytest.raises(ValueError, match=r"missing keys \(1\): quantize\.embedding\.weight"):
        build_tokenizer("vqgan_ema", folder, image_size=32)
    gumbel = _write(tmp_path / "gumbel", small_ema, yaml_doc=_model_yaml("taming.models.vqgan.GumbelVQ"))
    with pytest.raises(ValueError, match="--discrete_vae_type vqgan for it"):
        build_tokenizer("vqgan_ema", gumbel, image_size=32)
    wrong_dim = _model_yaml()
    wrong_dim["model"]["params"]["embed_dim"] = 8
    odd = _write(tmp_path / "odd", small_ema, yaml_doc=wrong_dim)
    with pytest.raises(ValueError, match=r"shape mismatches.*quant_conv\.weight"):
        build_tokenizer("vqgan_ema", odd, image_size=32)


def test_double_z_is_refused():
    with pytest.raises(ValueError, match="double_z"):
        EMAVQGANTokenizer({**SMALL_DDCONFIG, "double_z": True}, n_embed=64, embed_dim=16)
