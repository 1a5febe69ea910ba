"""Reading OpenAI-style whole-module ``encoder.pkl`` files without running their code.

The files are made here from stand-in classes registered as ``dall_e.encoder.Encoder``,
``dall_e.encoder.EncoderBlock`` and ``dall_e.utils.Conv2d`` (the names OpenAI's pickle
uses), with the attributes OpenAI's attrs classes store; they are unregistered before loading.
The real ``dall_e`` package (DALL_E 0.1) was checked the same way once, in both formats.
"""
from __future__ import annotations

import os
import sys
import types
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mcbeit.tokenizers import DallEEncoder, build_tokenizer
from mcbeit.tokenizers.dalle import DallEConv2d, DallEEncoderBlock
from mcbeit.tokenizers.safe_pickle import read_dalle_encoder_pickle


class Encoder(nn.Module):
    pass


class EncoderBlock(nn.Module):
    pass


class Conv2d(nn.Module):
    pass


_FAKES = {DallEEncoder: (Encoder, "dall_e.encoder"), DallEEncoderBlock: (EncoderBlock, "dall_e.encoder"), DallEConv2d: (Conv2d, "dall_e.utils")}


def _openai_like(module: nn.Module, drop=()):
    """A copy of ``module`` whose classes and attributes look like OpenAI's pickled encoder."""
    fake = next((f for t, (f, _) in _FAKES.items() if type(module) is t), type(module))
    new = fake.__new__(fake)
    state = {k: v for k, v in module.__dict__.items() if k.startswith("_") or k == "training"}
    state["_modules"] = OrderedDict((k, _openai_like(v)) for k, v in module._modules.items())
    if isinstance(module, DallEEncoder):
        # attrs fields of OpenAI's Encoder (group_count is a class attribute there, so absent)
        state.update(n_hid=module.n_hid, n_blk_per_group=module.n_blk_per_group, input_channels=module.input_channels,
                     vocab_size=module.vocab_size, device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True)
    elif isinstance(module, DallEEncoderBlock):
        state.update(n_in=0, n_out=0, n_layers=0, device=None, requires_grad=False, n_hid=0, post_gain=module.post_gain)
    elif isinstance(module, DallEConv2d):
        state.update(n_in=module.n_in, n_out=module.n_out, kw=module.kw, use_float16=True, device=torch.device("cpu"), requires_grad=False)
    for key in drop:
        state.pop(key, None)
    new.__dict__.update(state)
    return new


def _save_openai_like(obj_factory, path, legacy: bool):
    """Save with the stand-in classes registered under OpenAI's module names, then unregister them."""
    names = ["dall_e", "dall_e.encoder", "dall_e.utils"]
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
