"""Reading OpenAI-style whole-module ``encoder.pkl`` / ``decoder.pkl`` files without running their code.

The files are made here from stand-in classes registered as ``dall_e.encoder.Encoder``,
``dall_e.encoder.EncoderBlock``, ``dall_e.decoder.Decoder``, ``dall_e.decoder.DecoderBlock`` and
``dall_e.utils.Conv2d`` (the names OpenAI's pickles use), with the attributes OpenAI's attrs
classes store; they are unregistered before loading. Files written by the real ``dall_e``
package are read in ``test_parity_dalle.py``.
"""
from __future__ import annotations

import logging
import os
import sys
import types
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mcbeit.tokenizers import DallEDecoder, DallEEncoder, build_tokenizer
from mcbeit.tokenizers.dalle import DallEConv2d, DallEDecoderBlock, DallEEncoderBlock
from mcbeit.tokenizers.safe_pickle import read_dalle_decoder_pickle, read_dalle_encoder_pickle


class Encoder(nn.Module):
    pass


class EncoderBlock(nn.Module):
    pass


class Decoder(nn.Module):
    pass


class DecoderBlock(nn.Module):
    pass


class Conv2d(nn.Module):
    pass


_FAKES = {
    DallEEncoder: (Encoder, "dall_e.encoder"),
    DallEEncoderBlock: (EncoderBlock, "dall_e.encoder"),
    DallEDecoder: (Decoder, "dall_e.decoder"),
    DallEDecoderBlock: (DecoderBlock, "dall_e.decoder"),
    DallEConv2d: (Conv2d, "dall_e.utils"),
}


def _openai_like(module: nn.Module, drop=(), edit=None):
    """A copy of ``module`` whose classes and attributes look like OpenAI's pickled encoder/decoder."""
    edit = edit or {}
    fake = next((f for t, (f, _) in _FAKES.items() if type(module) is t), type(module))
    new = fake.__new__(fake)
    if fake is type(module):  # a torch module (Sequential, ReLU, Upsample ...): pickled as it is
        state = dict(module.__dict__)
    else:
        state = {k: v for k, v in module.__dict__.items() if k.startswith("_") or k == "training"}
    state["_modules"] = OrderedDict((k, _openai_like(v)) for k, v in module._modules.items() if v is not None)
    if isinstance(module, DallEEncoder):
        # attrs fields of OpenAI's Encoder (group_count is a class attribute there, so absent)
        state.update(n_hid=module.n_hid, n_blk_per_group=module.n_blk_per_group, input_channels=module.input_channels,
                     vocab_size=module.vocab_size, device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True)
    elif isinstance(module, DallEDecoder):
        state.update(n_init=module.n_init, n_hid=module.n_hid, n_blk_per_group=module.n_blk_per_group,
                     output_channels=module.output_channels, vocab_size=module.vocab_size, device=torch.device("cpu"),
                     requires_grad=False, use_mixed_precision=True)
    elif isinstance(module, (DallEEncoderBlock, DallEDecoderBlock)):
        state.update(n_in=0, n_out=0, n_layers=0, device=None, requires_grad=False, n_hid=0, post_gain=module.post_gain)
    elif isinstance(module, DallEConv2d):
        state.update(n_in=module.n_in, n_out=module.n_out, kw=module.kw, use_float16=True, device=torch.device("cpu"), requires_grad=False)
    for key in drop:
        state.pop(key, None)
    for key, value in edit.items():
        state[key] = value
    new.__dict__.update(state)
    return new


def _save_openai_like(obj_factory, path, legacy: bool):
    """Save with the stand-in classes registered under OpenAI's module names, then unregister them."""
    names = ["dall_e", "dall_e.encoder", "dall_e.decoder", "dall_e.utils"]
    saved = {n: sys.modules.get(n) for n in names}
    originals = {}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        for fake, module_name in _FAKES.values():
            originals[fake] = (fake.__module__, fake.__qualname__)
            fake.__module__ = module_name
            setattr(sys.modules[module_name], fake.__name__, fake)
        with warnings.catch_warnings():  # legacy save cannot find the stand-ins' source: irrelevant
            warnings.simplefilter("ignore", UserWarning)
            torch.save(obj_factory(), path, _use_new_zipfile_serialization=not legacy)
    finally:
        for fake, (module_name, qualname) in originals.items():
            fake.__module__, fake.__qualname__ = module_name, qualname
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


@pytest.fixture()
def source_encoder():
    torch.manual_seed(0)
    enc = DallEEncoder(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=16).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))  # non-zero biases too
    return enc


@pytest.fixture()
def source_decoder():
    torch.manual_seed(1)
    dec = DallEDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=64).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return dec


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_openai_like_pickle_loads_with_equal_logits(tmp_path, source_encoder, legacy):
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "encoder.pkl", legacy)
    assert getattr(sys.modules.get("dall_e.encoder"), "Encoder", None) is not Encoder  # nothing left to import
    tok = build_tokenizer("dall-e", tmp_path, image_size=16)
    assert isinstance(tok, DallEEncoder) and not tok.random_weights and not tok.training
    assert all(not p.requires_grad for p in tok.parameters())
    assert tok.config == source_encoder.config
    x = tok.input_transform(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        assert torch.equal(tok(x), source_encoder(x))
    # the file path works as well as the folder
    assert torch.equal(build_tokenizer("dall-e", tmp_path / "encoder.pkl", image_size=16).blocks.input.w, source_encoder.blocks.input.w)


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_foreign_globals_are_refused(tmp_path, legacy, capsys):
    torch.save({"payload": _Hostile()}, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match="allow-list") as err:
        build_tokenizer("dall-e", tmp_path)
    assert "print" in str(err.value)
    assert "this must never run" not in capsys.readouterr().out


def test_wrong_root_and_missing_attributes(tmp_path, source_encoder):
    torch.save({"w": torch.zeros(1)}, tmp_path / "encoder.pkl")
    with pytest.raises(ValueError, match="dall_e.encoder.Encoder"):
        read_dalle_encoder_pickle(tmp_path / "encoder.pkl")
    _save_openai_like(lambda: _openai_like(source_encoder, drop=("vocab_size",)), tmp_path / "encoder.pkl", legacy=True)
    with pytest.raises(ValueError, match="vocab_size"):
        read_dalle_encoder_pickle(tmp_path / "encoder.pkl")
    (tmp_path / "encoder.pkl").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError):
        build_tokenizer("dall-e", tmp_path)


def test_missing_parameter_is_named(tmp_path, source_encoder):
    def broken():
        tree = _openai_like(source_encoder)
        del tree._modules["blocks"]._modules["output"]._modules["conv"]._parameters["b"]
        return tree

    _save_openai_like(broken, tmp_path / "encoder.pkl", legacy=False)
    with pytest.raises(ValueError, match=r"blocks\.output\.conv\.b"):
        build_tokenizer("dall-e", os.fspath(tmp_path))


# --------------------------------------------------------------------------- decoder.pkl
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_decoder_pickle_beside_encoder_is_loaded(tmp_path, source_encoder, source_decoder, legacy, caplog):
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "encoder.pkl", legacy)
    _save_openai_like(lambda: _openai_like(source_decoder), tmp_path / "decoder.pkl", legacy)
    assert getattr(sys.modules.get("dall_e.decoder"), "Decoder", None) is not Decoder  # nothing left to import
    with caplog.at_level(logging.INFO, logger="mcbeit.tokenizers"):
        tok = build_tokenizer("dall-e", tmp_path, image_size=16)
    assert tok.has_decoder and isinstance(tok.decoder, DallEDecoder) and not tok.decoder.training
    assert all(not p.requires_grad for p in tok.parameters())
    assert tok.decoder.config == source_decoder.config
    assert any("decoder" in r.getMessage() and "Loaded" in r.getMessage() for r in caplog.records)
    ids = torch.randint(0, 64, (2, 2, 3))
    with torch.no_grad():
        assert torch.equal(tok.decode(ids), source_decoder.decode(ids))
    # through the file path as well: decoder.pkl is looked up beside encoder.pkl
    assert build_tokenizer("dall-e", tmp_path / "encoder.pkl", image_size=16).has_decoder
    # pre-training does not need it
    assert not build_tokenizer("dall-e", tmp_path, image_size=16, load_decoder=False).has_decoder


def test_missing_decoder_pickle_means_encoder_only(tmp_path, source_encoder, caplog):
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "encoder.pkl", legacy=False)
    with caplog.at_level(logging.INFO, logger="mcbeit.tokenizers"):
        tok = build_tokenizer("dall-e", tmp_path, image_size=16)
    assert not tok.has_decoder and tok.decoder is None
    assert any("encoder only" in r.getMessage() for r in caplog.records)
    assert not any(k.startswith("decoder.") for k in tok.state_dict())
    with pytest.raises(NotImplementedError, match="no decoder"):
        tok.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="decoder.pkl"):
        build_tokenizer("dall-e", tmp_path, image_size=16, load_decoder=True)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hostile_decoder_pickle_is_refused(tmp_path, source_encoder, legacy, capsys):
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "encoder.pkl", legacy)
    torch.save({"payload": _Hostile()}, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match="DALL-E decoder pickle.*allow-list") as err:
        build_tokenizer("dall-e", tmp_path, image_size=16)
    assert "print" in str(err.value)
    assert "this must never run" not in capsys.readouterr().out


def test_encoder_classes_are_not_allowed_in_decoder_pickle(tmp_path, source_encoder):
    """Each file has its own allow-list: an encoder pickled as decoder.pkl names classes the decoder list lacks."""
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "decoder.pkl", legacy=True)
    with pytest.raises(ValueError, match="dall_e.encoder.Encoder"):
        read_dalle_decoder_pickle(tmp_path / "decoder.pkl")


def test_decoder_pickle_checks(tmp_path, source_encoder, source_decoder):
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "encoder.pkl", legacy=False)

    def bilinear():
        tree = _openai_like(source_decoder)
        tree._modules["blocks"]._modules["group_2"]._modules["upsample"].mode = "bilinear"
        return tree

    _save_openai_like(bilinear, tmp_path / "decoder.pkl", legacy=False)
    with pytest.raises(ValueError, match=r"blocks\.group_2\.upsample.*bilinear"):
        build_tokenizer("dall-e", tmp_path, image_size=16)

    _save_openai_like(lambda: _openai_like(source_decoder, drop=("n_init",)), tmp_path / "decoder.pkl", legacy=True)
    with pytest.raises(ValueError, match="n_init"):
        build_tokenizer("dall-e", tmp_path, image_size=16)

    other_vocab = DallEDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
    _save_openai_like(lambda: _openai_like(other_vocab), tmp_path / "decoder.pkl", legacy=False)
    with pytest.raises(ValueError, match="vocab_size 32.*vocab_size 64"):
        build_tokenizer("dall-e", tmp_path, image_size=16)

    def without_bias():
        tree = _openai_like(source_decoder)
        del tree._modules["blocks"]._modules["input"]._parameters["b"]
        return tree

    _save_openai_like(without_bias, tmp_path / "decoder.pkl", legacy=False)
    with pytest.raises(ValueError, match=r"blocks\.input\.b"):
        build_tokenizer("dall-e", tmp_path, image_size=16)


@pytest.mark.parametrize("cut", [1, 10, 300])
def test_truncated_legacy_file_is_refused(tmp_path, source_encoder, cut):
    """Cut inside the last storage's data or its 8-byte length header (the storage order varies)."""
    _save_openai_like(lambda: _openai_like(source_encoder), tmp_path / "encoder.pkl", legacy=True)
    data = (tmp_path / "encoder.pkl").read_bytes()
    (tmp_path / "encoder.pkl").write_bytes(data[:-cut])
    with pytest.raises(ValueError, match="truncated"):
        build_tokenizer("dall-e", tmp_path, image_size=16)
