"""Parity with taming-transformers' own modules (test-only dependency ``taming-transformers-rom1504``).

Only ``taming.modules.diffusionmodules.model`` (Encoder, Decoder) and
``taming.modules.vqvae.quantize`` are imported: ``taming.models.vqgan`` needs pytorch_lightning.
A reference model with ``GumbelVQ``'s attribute names (encoder, decoder, quant_conv,
post_quant_conv, quantize) is assembled from them, given random weights and written as a
Lightning-style ``last.ckpt`` beside ``model.yaml``; ``build_tokenizer`` must then give the same
logits (gumbel: ``GumbelQuantize``'s logits; ema: the negative of the quantizer's squared
distances) and the same decodes to 1e-5.

taming's ``EMAVectorQuantizer`` is in no registry release (taming-transformers-rom1504 0.0.6
predates it; upstream's later class cannot even be constructed: its ``__init__`` reads undefined
names). Its distance computation, ``|z|^2 + |e|^2 - 2 z.e`` over ``embedding.weight`` followed by
``argmin``, is the same expression as ``VectorQuantizer2``'s, which has the same codebook name
(``embedding.weight``): the EMA parity test runs ``VectorQuantizer2`` and reads the distance
matrix it hands to ``torch.argmin``. The package must be installed: a missing package fails here.
"""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2
from torch import nn

from mcbeit.tokenizers import EMAVQGANTokenizer, GumbelVQGANTokenizer, build_tokenizer
from mcbeit.tokenizers.vqgan import VQGAN_GUMBEL_F8_DDCONFIG

TOL = 1e-5
SMALL_DDCONFIG = dict(
    double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)


class ReferenceVQ(nn.Module):
    """taming's VQModel/GumbelVQ/EMAVQ module layout, built from the package's modules."""

    def __init__(self, ddconfig, n_embed, embed_dim, quantize: nn.Module):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = quantize
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """taming's decode of code indices: decoder(post_quant_conv(quantize.get_codebook_entry(...)))."""
        b, h, w = ids.shape
        quant = self.quantize.get_codebook_entry(ids.flatten(), (b, h, w, self.quant_conv.out_channels))
        return self.decoder(self.post_quant_conv(quant))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Move every parameter off its init (GroupNorm's (1, 0), zero biases) so all of them are checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _write_log_folder(folder, target, ddconfig, n_embed, embed_dim, state_dict):
    folder.mkdir(parents=True)
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dict(ddconfig),
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    if target.endswith("GumbelVQ"):
        params.update(kl_weight=1.0e-08, temperature_scheduler_config={
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1.0e-06}})
    (folder / "model.yaml").write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-06, "target": target,
                                                                 "params": params}}))
    sd = {k: v.clone() for k, v in state_dict.items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    torch.save({"epoch": 2, "global_step": 100, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
                "optimizer_states": [], "lr_schedulers": []}, folder / "last.ckpt")
    return folder


# --------------------------------------------------------------------------- gumbel
@pytest.fixture(scope="module")
def gumbel_reference():
    torch.manual_seed(0)
    quantize = GumbelQuantize(SMALL_DDCONFIG["z_channels"], 32, n_embed=128, kl_weight=1e-8, temp_init=1.0)
    return _randomize(ReferenceVQ(SMALL_DDCONFIG, 128, 32, quantize), seed=1)


def test_gumbel_logits_and_decodes_match_taming(tmp_path, gumbel_reference):
    ref = gumbel_reference
    folder = _write_log_folder(tmp_path / "gumbel", "taming.models.vqgan.GumbelVQ", SMALL_DDCONFIG, 128, 32,
                               ref.state_dict())
    tok = build_tokenizer("vqgan", folder, image_size=32)
    assert isinstance(tok, GumbelVQGANTokenizer) and not tok.random_weights and tok.has_decoder
    assert set(tok.state_dict()) == set(ref.state_dict())

    x = tok.input_transform(torch.rand(2, 3, 32, 32))
    ids = torch.randint(0, 128, (2, 4, 4))
    with torch.inference_mode():
        ours = tok(x)
        *_, ref_logits = ref.quantize(ref.quant_conv(ref.encoder(x)), return_logits=True)
        raw_ref = ref.decode_ids(ids)
        raw_ours = tok.decoder(tok.post_quant_conv(tok.quantize.embed.weight[ids].permute(0, 3, 1, 2)))
        images = tok.decode(ids)
    assert ours.shape == ref_logits.shape == (2, 128, 4, 4)
    assert (ours - ref_logits).abs().max() <= TOL
    assert raw_ours.shape == raw_ref.shape == (2, 3, 32, 32)
    assert (raw_ours - raw_ref).abs().max() <= TOL
    assert (images - ((raw_ref + 1) / 2).clamp(0, 1)).abs().max() <= TOL


def test_full_size_gumbel_f8_matches_taming():
    """mc-BEiT's vqgan_gumbel_f8_8192 configuration (state dict loaded directly; 16 px input)."""
    torch.manual_seed(2)
    quantize = GumbelQuantize(256, 256, n_embed=8192, kl_weight=1e-8, temp_init=1.0)
    ref = _randomize(ReferenceVQ(VQGAN_GUMBEL_F8_DDCONFIG, 8192, 256, quantize), seed=3)
    tok = GumbelVQGANTokenizer(image_size=112, with_decoder=True).eval()
    tok.load_taming_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ids = torch.randint(0, 8192, (1, 2, 2))
    with torch.inference_mode():
        *_, ref_logits = ref.quantize(ref.quant_conv(ref.encoder(x)), return_logits=True)
        diff_logits = (tok(x) - ref_logits).abs().max()
        raw_ref = ref.decode_ids(ids)
        diff_images = (tok.decode(ids) - ((raw_ref + 1) / 2).clamp(0, 1)).abs().max()
    assert diff_logits <= TOL and diff_images <= TOL


# --------------------------------------------------------------------------- ema
def _ema_state_dict(ref: ReferenceVQ, seed: int):
    """taming EMAVQ's state dict: VectorQuantizer2's codebook under EMAVectorQuantizer's names plus
    EmbeddingEMA's statistics (cluster_size, embed_avg)."""
    gen = torch.Generator().manual_seed(seed)
    sd = copy.deepcopy(ref.state_dict())
    n_embed, dim = sd["quantize.embedding.weight"].shape
    sd["quantize.embedding.cluster_size"] = torch.rand(n_embed, generator=gen) * 10
    sd["quantize.embedding.embed_avg"] = torch.randn(n_embed, dim, generator=gen)
    return sd


@pytest.fixture(scope="module")
def ema_reference():
    torch.manual_seed(4)
    quantize = VectorQuantizer2(64, 16, beta=0.25, sane_index_shape=True)
    ref = _randomize(ReferenceVQ(SMALL_DDCONFIG, 64, 16, quantize), seed=5)
    with torch.no_grad():  # codes spread like trained ones, on the scale of quant_conv's outputs
        ref.quantize.embedding.weight.normal_(std=0.5)
    return ref


def _taming_distances(quantize, z, monkeypatch):
    """Run taming's quantizer on z; return its (B*h*w, V) distance matrix and nearest-code indices."""
    captured = []
    argmin = torch.argmin

    def spy(d, *args, **kwargs):
        captured.append(d.detach().clone())
        return argmin(d, *args, **kwargs)

    monkeypatch.setattr(torch, "argmin", spy)
    try:
        z_q, _, (_, _, indices) = quantize(z)
    finally:
        monkeypatch.setattr(torch, "argmin", argmin)
    assert len(captured) == 1
    return captured[0], indices, z_q


def test_ema_logits_are_negative_taming_distances_and_decodes_match(tmp_path, ema_reference, monkeypatch):
    ref = ema_reference
    folder = _write_log_folder(tmp_path / "ema", "taming.models.vqgan.EMAVQ", SMALL_DDCONFIG, 64, 16,
                               _ema_state_dict(ref, seed=6))
    tok = build_tokenizer("vqgan_ema", folder, image_size=32)
    assert isinstance(tok, EMAVQGANTokenizer) and not tok.random_weights and tok.has_decoder

    x = tok.input_transform(torch.rand(2, 3, 32, 32))
    ids = torch.randint(0, 64, (2, 4, 4))
    with torch.inference_mode():
        ours = tok(x)
        z = ref.quant_conv(ref.encoder(x))
        dist, nearest, z_q = _taming_distances(ref.quantize, z, monkeypatch)
        ours_on_taming_z = tok.quantize(z)  # the distance computation alone, on the same input
        raw_ref = ref.decode_ids(ids)
        images = tok.decode(ids)
    b, v, h, w = ours.shape
    assert (b, v, h, w) == (2, 64, 4, 4) and dist.shape == (b * h * w, v)
    ref_logits = -dist.view(b, h, w, v).permute(0, 3, 1, 2)
    assert (ours_on_taming_z - ref_logits).abs().max() <= TOL
    assert (ours - ref_logits).abs().max() <= TOL
    # the argmax of the logits is the code taming's quantizer picks, and its embedding is taming's z_q
    assert torch.equal(ours.argmax(dim=1), nearest)
    assert torch.allclose(tok.quantize.embedding.weight[ours.argmax(1)].permute(0, 3, 1, 2), z_q, atol=1e-6)  # z + (e - z)
    assert (images - ((raw_ref + 1) / 2).clamp(0, 1)).abs().max() <= TOL


def test_package_encoder_decoder_names_match_ours():
    ref = ReferenceVQ(VQGAN_GUMBEL_F8_DDCONFIG, 8192, 256, GumbelQuantize(256, 256, 8192))
    ours = GumbelVQGANTokenizer(image_size=112, with_decoder=True)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
