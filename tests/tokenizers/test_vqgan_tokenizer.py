"""VQGAN Gumbel f8 tokenizer: taming's state-dict names, loading a taming log folder, layers.

The expected names, shapes, counts and digest were taken once from taming-transformers
(``taming.modules.diffusionmodules.model.Encoder`` with mc-BEiT's ddconfig, ``quant_conv``
``Conv2d(256, 256, 1)`` and ``GumbelQuantize(256, 256, 8192)``); mcbeit's module matched it key
for key, and its logits matched ``quantize(quant_conv(encoder(x)), return_logits=True)`` to 2e-6.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml

from mcbeit.tokenizers import GumbelVQGANTokenizer, Normalize, build_tokenizer
from mcbeit.tokenizers.taming_modules import AttnBlock, Downsample
from tests.tokenizers.checks import check_inference_mode_and_bf16

# sha256 of "name:shape" lines, sorted by name, of taming's encoder.* + quant_conv.* + quantize.*
TAMING_F8_DIGEST = "7ed4d7226cd685741b95f212a22be80be6816a9cd36c07ecd33cfd69f2c64d80"
TAMING_F8_KEYS = 131
TAMING_F8_PARAMS = 30_614_016  # 28_516_864 without the (unused for logits) codebook quantize.embed
TAMING_F8_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.downsample.conv.weight": (256, 256, 3, 3),
    "encoder.down.3.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (256, 256, 1, 1),
    "quantize.proj.weight": (8192, 256, 1, 1),
    "quantize.embed.weight": (8192, 256),
}

SMALL_DDCONFIG = dict(
    double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)


def digest(state_dict) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state_dict.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_full_size_matches_taming_state_dict():
    tok = build_tokenizer("vqgan_gumbel_f8_8192", image_size=112)
    sd = tok.state_dict()
    assert len(sd) == TAMING_F8_KEYS
    assert sum(p.numel() for p in tok.parameters()) == TAMING_F8_PARAMS
    for key, shape in TAMING_F8_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("encoder.down.3.downsample") for k in sd)
    assert {k.split(".")[2] for k in sd if ".attn." in k} == {"3"}  # attention only at resolution 32
    assert digest(sd) == TAMING_F8_DIGEST

    assert tok.random_weights and not tok.training and all(not p.requires_grad for p in tok.parameters())
    assert (tok.kind, tok.vocab_size, tok.downsample) == ("vqgan", 8192, 8)
    assert tok.token_grid() == (14, 14)
    assert tok.input_transform == Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = tok.input_transform(torch.rand(3, 32, 32)).unsqueeze(0)
    with torch.no_grad():
        logits = tok(x)
    assert logits.shape == (1, 8192, 4, 4) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_downsample_uses_bottom_right_padding():
    """taming pads (left 0, right 1, top 0, bottom 1): output (i, j) is centred on input (2i+1, 2j+1)."""
    down = Downsample(1, with_conv=True)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0
        down.conv.bias.zero_()
    x = torch.arange(64.0).view(1, 1, 8, 8)
    out = down(x)
    assert out.shape == (1, 1, 4, 4)
    assert torch.equal(out, x[:, :, 1::2, 1::2])
    assert torch.equal(Downsample(1, with_conv=False)(x), F.avg_pool2d(x, 2))


def test_attention_block_matches_explicit_formula():
    torch.manual_seed(0)
    attn = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 3)
    h = attn.norm(x)
    q, k, v = (m(h).flatten(2) for m in (attn.q, attn.k, attn.v))  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32**0.5, dim=-1)
    expected = x + attn.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 4, 3))
    assert torch.allclose(attn(x), expected, atol=1e-5)
    assert attn.norm.eps == 1e-6 and attn.norm.num_groups == 32


def test_logits_are_proj_of_quant_conv_of_encoder():
    torch.manual_seed(0)
    tok = GumbelVQGANTokenizer(SMALL_DDCONFIG, n_embed=64, embed_dim=32, image_size=16).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = F.conv2d(tok.quant_conv(tok.encoder(x)), tok.quantize.proj.weight, tok.quantize.proj.bias)
        assert torch.equal(tok(x), expected)


def test_config_validation():
    with pytest.raises(ValueError, match="double_z"):
        GumbelVQGANTokenizer({**SMALL_DDCONFIG, "double_z": True}, n_embed=64, embed_dim=32)
    with pytest.raises(ValueError, match="embed_dim"):
        GumbelVQGANTokenizer(SMALL_DDCONFIG, n_embed=64, embed_dim=64)
    with pytest.raises(ValueError, match="z_channels"):
        GumbelVQGANTokenizer({k: v for k, v in SMALL_DDCONFIG.items() if k != "z_channels"}, n_embed=64, embed_dim=32)


# --------------------------------------------------------------------------- taming log folders
def _model_yaml(target="taming.models.vqgan.GumbelVQ"):
    return {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": target,
            "params": {
                "kl_weight": 1.0e-08,
                "embed_dim": 32,
                "n_embed": 64,
                "monitor": "val/rec_loss",
                "temperature_scheduler_config": {
                    "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                    "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1.0e-06},
                },
                "ddconfig": dict(SMALL_DDCONFIG),
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
            },
        }
    }


def _lightning_checkpoint(tok: GumbelVQGANTokenizer, callbacks=None, decoder=True):
    sd = {k: v.clone() for k, v in tok.state_dict().items() if decoder or not k.startswith(("decoder.", "post_quant_conv."))}
    # the training loss of the full GumbelVQ: never built by the tokenizer
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    return {
        "epoch": 3,
        "global_step": 12345,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0, 1]}]}],
        "lr_schedulers": [],
        "callbacks": callbacks or {},
    }


def _write_folder(folder, tok, yaml_doc=None, ckpt=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(yaml_doc or _model_yaml()))
    torch.save(ckpt if ckpt is not None else _lightning_checkpoint(tok), folder / "last.ckpt")
    return folder


@pytest.fixture()
def saved_small():
    """A small GumbelVQ with its decoder (what a released last.ckpt holds), non-trivial weights."""
    torch.manual_seed(1)
    tok = GumbelVQGANTokenizer(SMALL_DDCONFIG, n_embed=64, embed_dim=32, image_size=32, with_decoder=True).eval()
    with torch.no_grad():
        for name, p in tok.named_parameters():
            if "norm" in name:  # GroupNorm starts at (1, 0): move it off the identity
                p.add_(0.1 * torch.randn_like(p))
    return tok


def test_folder_loads_with_equal_logits(tmp_path, saved_small, caplog):
    folder = _write_folder(tmp_path / "vqgan_gumbel_f8", saved_small)
    with caplog.at_level(logging.DEBUG, logger="mcbeit.tokenizers.vqgan"):
        tok = build_tokenizer("vqgan", folder, image_size=32)
    assert not tok.random_weights and not tok.training
    assert all(not p.requires_grad for p in tok.parameters())
    assert (tok.vocab_size, tok.downsample, tok.token_grid()) == (64, 8, (4, 4))
    assert any("dropped 1 keys" in r.getMessage() and "loss: 1" in r.getMessage() for r in caplog.records)
    assert not any("RANDOM" in r.getMessage() for r in caplog.records)
    x = torch.stack([tok.input_transform(torch.rand(3, 32, 32)) for _ in range(2)])
    with torch.no_grad():
        assert torch.equal(tok(x), saved_small(x))
    # released checkpoints hold the decoder: it is loaded, decode() works
    assert tok.has_decoder
    ids = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        images = tok.decode(ids)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images, saved_small.decode(ids))
    # the checkpoint file itself also works (model.yaml beside it)
    tok2 = GumbelVQGANTokenizer.from_folder(folder / "last.ckpt", image_size=32)
    assert torch.equal(tok2.quantize.embed.weight, saved_small.quantize.embed.weight)


def test_decode_is_decoder_of_post_quant_conv_of_codebook_entries(saved_small):
    ids = torch.randint(0, 64, (1, 3, 2))
    with torch.no_grad():
        quant = saved_small.quantize.embed.weight[ids].permute(0, 3, 1, 2)  # (1, 32, 3, 2)
        raw = saved_small.decoder(saved_small.post_quant_conv(quant))
        images = saved_small.decode(ids)
    assert raw.shape == (1, 3, 24, 16)
    assert torch.allclose(images, ((raw + 1) / 2).clamp(0, 1), atol=1e-6)
    assert images.min() >= 0 and images.max() <= 1 and 0 < images.std()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        saved_small.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        saved_small.decode(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        saved_small.decode(torch.zeros(1, 2, 2))


def test_encoder_only_when_decoder_absent_or_not_wanted(tmp_path, saved_small, caplog):
    without = _write_folder(tmp_path / "no_decoder", saved_small, ckpt=_lightning_checkpoint(saved_small, decoder=False))
    with caplog.at_level(logging.INFO, logger="mcbeit.tokenizers.vqgan"):
        tok = build_tokenizer("vqgan", without, image_size=32)
    assert not tok.has_decoder and tok.decoder is None and tok.post_quant_conv is None
    assert not any(k.startswith(("decoder.", "post_quant_conv.")) for k in tok.state_dict())
    assert any("encoder only" in r.getMessage() for r in caplog.records)
    with pytest.raises(NotImplementedError, match="no decoder"):
        tok.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no decoder weights"):
        build_tokenizer("vqgan", without, image_size=32, load_decoder=True)
    # decoder keys present but not wanted (pre-training): dropped, the decoder is not built
    full = _write_folder(tmp_path / "full", saved_small)
    tok = build_tokenizer("vqgan", full, image_size=32, load_decoder=False)
    assert not tok.has_decoder
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok(x), saved_small(x))


def test_missing_decoder_key_is_named(tmp_path, saved_small):
    ckpt = _lightning_checkpoint(saved_small)
    del ckpt["state_dict"]["decoder.up.0.block.1.conv2.weight"]
    folder = _write_folder(tmp_path / "partial", saved_small, ckpt=ckpt)
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder\.up\.0\.block\.1\.conv2\.weight"):
        build_tokenizer("vqgan", folder, image_size=32)


def test_taming_release_layout(tmp_path, saved_small):
    """taming's released log folders keep configs/model.yaml and checkpoints/last.ckpt."""
    folder = tmp_path / "2021-04-vqgan_gumbel_f8"
    (folder / "configs").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "configs" / "model.yaml").write_text(yaml.safe_dump(_model_yaml()))
    torch.save(_lightning_checkpoint(saved_small), folder / "checkpoints" / "last.ckpt")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for path in (folder, folder / "checkpoints" / "last.ckpt"):
        tok = build_tokenizer("vqgan", path, image_size=32)
        with torch.no_grad():
            assert torch.equal(tok(x), saved_small(x))
    (folder / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        build_tokenizer("vqgan", folder, image_size=32)


def test_folder_missing_encoder_key_is_named(tmp_path, saved_small):
    ckpt = _lightning_checkpoint(saved_small)
    del ckpt["state_dict"]["encoder.down.1.block.0.conv2.weight"]
    folder = _write_folder(tmp_path / "broken", saved_small, ckpt=ckpt)
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder\.down\.1\.block\.0\.conv2\.weight"):
        build_tokenizer("vqgan", folder, image_size=32)


def test_folder_unexpected_and_mismatched_keys(tmp_path, saved_small):
    ckpt = _lightning_checkpoint(saved_small)
    ckpt["state_dict"]["quantize.used"] = torch.arange(64)
    ckpt["state_dict"]["quant_conv.weight"] = torch.randn(32, 16, 1, 1)
    folder = _write_folder(tmp_path / "odd", saved_small, ckpt=ckpt)
    with pytest.raises(ValueError) as err:
        build_tokenizer("vqgan", folder, image_size=32)
    assert "quantize.used" in str(err.value) and "quant_conv.weight" in str(err.value)


def test_folder_with_wrong_target_or_files(tmp_path, saved_small):
    folder = _write_folder(tmp_path / "vq", saved_small, yaml_doc=_model_yaml("taming.models.vqgan.VQModel"))
    with pytest.raises(ValueError, match="GumbelVQ"):
        build_tokenizer("vqgan", folder, image_size=32)
    ema = _write_folder(tmp_path / "ema", saved_small, yaml_doc=_model_yaml("taming.models.vqgan.EMAVQ"))
    with pytest.raises(ValueError, match="--discrete_vae_type vqgan_ema"):
        build_tokenizer("vqgan", ema, image_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.yaml"):
        build_tokenizer("vqgan", tmp_path / "empty", image_size=32)


def test_lightning_callback_class_keys_load_without_lightning(tmp_path, saved_small):
    """PL 1.0 pickles callback states keyed by the callback class: read them as inert placeholders."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
        sys.modules[names[-1]].ModelCheckpoint = cls
        callbacks = {cls: {"best_model_score": torch.tensor(0.25), "best_model_path": "logs/x/last.ckpt"}}
        folder = _write_folder(tmp_path / "pl", saved_small, ckpt=_lightning_checkpoint(saved_small, callbacks))
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
    tok = build_tokenizer("vqgan", folder, image_size=32)
    assert torch.equal(tok.quant_conv.weight, saved_small.quant_conv.weight)


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_foreign_globals_are_refused_and_named(tmp_path, saved_small):
    ckpt = _lightning_checkpoint(saved_small)
    ckpt["hyper_parameters"] = _Hostile()
    folder = _write_folder(tmp_path / "hostile", saved_small, ckpt=ckpt)
    with pytest.raises(ValueError) as err:
        build_tokenizer("vqgan", folder, image_size=32)
    assert "weights_only=True" in str(err.value) and "print" in str(err.value)
    pickle.dumps(saved_small.input_transform)  # the transform stays picklable


# --------------------------------------------------------------------------- decoder names, inference mode, bf16
# sha256 of "name:shape" lines, sorted by name, of taming's Decoder(**ddconfig) under "decoder." plus
# post_quant_conv (Conv2d(256, 256, 1)) for mc-BEiT's ddconfig: 170 keys, 38_381_955 parameters
TAMING_F8_DECODER_DIGEST = "628a8f7550b20c2073b18d54a7746be55b75f184e92b4ebbe6d753400baa474b"


def test_full_size_with_decoder_inference_mode_and_bf16():
    """taming's decoder names for mc-BEiT's config; the tokenizer under inference_mode and bf16
    autocast returns float32 logits, usable outside inference mode under no_grad."""
    torch.manual_seed(0)
    tok = GumbelVQGANTokenizer(image_size=112, with_decoder=True).freeze()
    sd = {k: v for k, v in tok.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(sd) == 170 and sum(v.numel() for v in sd.values()) == 38_381_955
    assert digest(sd) == TAMING_F8_DECODER_DIGEST
    check_inference_mode_and_bf16(tok)
