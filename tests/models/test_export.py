"""Export to timm safetensors + config.json and to transformers BEiT: loaded back, the outputs match (1e-4),
and the class names of a fine-tuned checkpoint come back as timm's label_names and transformers' id2label."""
import argparse
import copy
import json
import logging

import pytest
import timm
import torch
from safetensors import safe_open

from mcbeit.models.classifier import build_classifier
from mcbeit.models.export import (ExportError, hf_config_kwargs, load_for_export, save_hf, save_timm,
                                  timm_to_hf_state_dict, verify_export)

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-4
CLS_NAME, MIM_NAME = "beit_tiny_patch16_224", "beit_tiny_patch16_224_8k_vocab"
LABELS = ["tabby cat", "goldfish", "Zebra", "space shuttle", "ångström", "a/b", "7", "x y z", "café", "last"]


# ---------------------------------------------------------------------- checkpoints like the trainers write
def randomize(model, seed):
    """Move every parameter off its initial value (relative tables by a lot, so they matter) and set eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if "relative_position_bias_table" in name else 0.05))
    return model.eval()


def make_finetuned(path, input_size=224, use_mean_pooling=True, rel_pos_bias=True, abs_pos_emb=False,
                   layer_scale_init_value=0.1, classes=None):
    """An mcbeit-finetune-v1 checkpoint (10 classes) with a different model_ema; returns (path, model, ema).
    ``classes``: the class names mcbeit-finetune keeps (None: a checkpoint from before it kept them)."""
    args = dict(model=CLS_NAME, nb_classes=10, input_size=input_size, use_mean_pooling=use_mean_pooling,
                rel_pos_bias=rel_pos_bias, abs_pos_emb=abs_pos_emb, layer_scale_init_value=layer_scale_init_value)
    model = randomize(build_classifier(CLS_NAME, drop_path=0.0, **{k: v for k, v in args.items() if k != "model"}), 0)
    ema = randomize(copy.deepcopy(model), 1)
    torch.save({"format": "mcbeit-finetune-v1", "model": model.state_dict(),
                "model_ema": {"module." + k: v for k, v in ema.state_dict().items()},  # as timm's EMA wrapper names them
                "args": dict(args, drop_path=0.1, imagenet_default_mean_and_std=True),
                **({"classes": classes} if classes is not None else {})}, path)
    return path, model, ema


def make_pretrained(path, input_size=112, with_args=True):
    """An mcbeit-pretrain-v1 checkpoint (shared relative table, lm_head, mask_token); returns (path, model)."""
    model = randomize(timm.create_model(MIM_NAME, img_size=input_size), 2)
    ckpt = {"format": "mcbeit-pretrain-v1", "model": model.state_dict()}
    if with_args:
        ckpt["args"] = dict(model=MIM_NAME, input_size=input_size, rel_pos_bias=True, abs_pos_emb=False,
                            layer_scale_init_value=0.1)
    torch.save(ckpt, path)
    return path, model


def images(size, n=2):
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(3))  # (n,3,H,W)


def by_file(out, num_classes):
    """The by-file call, built from config.json the way a user would write it."""
    cfg = json.loads((out / "config.json").read_text())
    return timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                             pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=num_classes))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------- fine-tuned
FINETUNED = {  # id -> make_finetuned kwargs
    "224-mean-pool-block-tables-named": dict(classes=LABELS),
    "160-cls-abs-pos-no-layer-scale": dict(input_size=160, use_mean_pooling=False, rel_pos_bias=False,
                                           abs_pos_emb=True, layer_scale_init_value=0.0),
}


@pytest.fixture(scope="module", params=list(FINETUNED))
def finetuned_export(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path, model, ema = make_finetuned(tmp / "ft.pth", **FINETUNED[request.param])
    exp = load_for_export(path)
    return save_timm(exp, tmp / "out"), model, ema, exp


@pytest.fixture(scope="module")
def finetuned_hf(finetuned_export):
    transformers = pytest.importorskip("transformers")
    out, model, _, exp = finetuned_export
    save_hf(exp.model, out / "hf", exp.label_names)
    return transformers.BeitForImageClassification.from_pretrained(out / "hf").eval(), model, exp


def test_finetuned_loads_back_through_timm_both_ways(finetuned_export):
    out, model, _, exp = finetuned_export
    size = exp.data_config["input_size"][-1]
    x = images(size)
    with torch.inference_mode():
        ref = model(x)  # (2,10)
        by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert max_diff(by_dir(x), ref) < ATOL
        assert max_diff(by_file(out, 10).eval()(x), ref) < ATOL
    assert by_dir.pretrained_cfg["input_size"] == (3, size, size)
    assert tuple(by_dir.pretrained_cfg["mean"]) == (0.485, 0.456, 0.406)  # the checkpoint's --imagenet_default_mean_and_std
    assert list(by_dir.pretrained_cfg.get("label_names") or []) == exp.label_names   # the class names, if it had them


def test_finetuned_loads_back_through_transformers(finetuned_hf):
    hf, model, exp = finetuned_hf
    size = exp.data_config["input_size"][-1]
    x = images(size)
    with torch.inference_mode():
        assert max_diff(hf(x).logits, model(x)) < ATOL
        assert max_diff(hf.beit(x).last_hidden_state, model.forward_features(x)) < ATOL
    assert hf.config.image_size == size and hf.config.layer_norm_eps == 1e-6
    assert hf.config.use_mean_pooling == (model.global_pool == "avg")
    assert hf.config.num_labels == 10 and hf.config.architectures == ["BeitForImageClassification"]
    if exp.label_names:
        assert [hf.config.id2label[i] for i in range(10)] == LABELS and hf.config.label2id["Zebra"] == 2
    else:
        assert hf.config.id2label[3] == "LABEL_3"  # transformers' placeholder names


def test_timm_files_layout(finetuned_export):
    out, model, _, exp = finetuned_export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == CLS_NAME and cfg["num_classes"] == 10 and cfg["num_features"] == 192
    assert cfg["model_args"]["img_size"] == exp.data_config["input_size"][-1]
    assert cfg["model_args"]["global_pool"] == model.global_pool
    assert cfg["model_args"]["init_values"] == (0.1 if model.blocks[0].gamma_1 is not None else 0.0)
    assert cfg.get("label_names", []) == exp.label_names   # where timm's own push_to_hf_hub writes them
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())  # no relative_position_index / k_bias buffers


def test_class_names_come_back_from_every_route(tmp_path):
    """timm local-dir and transformers both return the checkpoint's names; verify_export checks they do."""
    pytest.importorskip("transformers")
    path, _, _ = make_finetuned(tmp_path / "ft.pth", input_size=64, classes=LABELS)
    exp = load_for_export(path)
    assert exp.label_names == LABELS
    out = save_timm(exp, tmp_path / "out")
    diffs = verify_export(exp, out, save_hf(exp.model, out / "hf", exp.label_names))
    assert set(diffs) == {"timm local-dir", "timm file", "transformers"}
    exp.label_names = LABELS[::-1]  # names that the files do not hold: refused
    with pytest.raises(ExportError, match=r"do not carry the class names back: \['timm local-dir', 'transformers'\]"):
        verify_export(exp, out, out / "hf")


@pytest.mark.parametrize("classes, warned", [(LABELS[:4], "names 4 classes for a head of 10 outputs"),
                                             ("goldfish", "not a list of names"), ([], None)])
def test_class_names_that_do_not_fit_the_head_are_left_out(tmp_path, caplog, classes, warned):
    path, _, _ = make_finetuned(tmp_path / "ft.pth", input_size=64, classes=classes)
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        exp = load_for_export(path)
    save_timm(exp, tmp_path / "out")
    assert exp.label_names == [] and "label_names" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert (warned in caplog.text) if warned else not caplog.text
    with pytest.raises(ExportError, match="4 class names for a model of 10 outputs"):
        hf_config_kwargs(exp.model, LABELS[:4])


def test_use_ema_exports_the_ema_weights(tmp_path):
    path, model, ema = make_finetuned(tmp_path / "ft.pth")
    exported = load_for_export(path, use_ema=True).model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in ema.state_dict().items())
    assert not torch.equal(exported["head.weight"], model.state_dict()["head.weight"])


# ---------------------------------------------------------------------- pre-trained backbone
@pytest.fixture(scope="module")
def pretrained_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt")
    path, model = make_pretrained(tmp / "pt.pth")
    exp = load_for_export(path)
    return save_timm(exp, tmp / "out"), model, exp


def test_pretrained_backbone_loads_back_through_timm_with_the_same_features(pretrained_export):
    out, mim, exp = pretrained_export
    x = images(112)
    with torch.inference_mode():
        tokens = mim.forward_features(x)  # (2,1+49,192) after the final norm, no mask
        by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        for m in (by_dir, by_file(out, 0).eval()):
            assert max_diff(m.forward_features(x), tokens) < ATOL
            assert max_diff(m(x), tokens[:, 0]) < ATOL  # num_classes=0, 'token': the CLS feature
    assert exp.name == CLS_NAME and exp.source == "pre-trained"
    assert exp.model_args["use_shared_rel_pos_bias"] and not exp.model_args["use_rel_pos_bias"]
    assert by_dir.num_classes == 0 and by_dir.global_pool == "token"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith(("lm_head", "mask_token"))]


def test_pretrained_backbone_loads_back_through_transformers(pretrained_export):
    transformers = pytest.importorskip("transformers")
    out, mim, exp = pretrained_export
    save_hf(exp.model, out / "hf")
    hf = transformers.BeitModel.from_pretrained(out / "hf").eval()
    x = images(112)
    with torch.inference_mode():
        tokens, hf_out = mim.forward_features(x), hf(x)  # (2,1+49,192)
        assert max_diff(hf_out.last_hidden_state, tokens) < ATOL  # no mean pooling: HF's final layernorm is timm's norm
        assert max_diff(hf_out.pooler_output, tokens[:, 0]) < ATOL  # the CLS token
    assert hf.config.use_shared_relative_position_bias and not hf.config.use_mean_pooling
    assert hf.config.architectures == ["BeitModel"]


def test_released_file_without_args_needs_model(tmp_path):
    path, mim = make_pretrained(tmp_path / "pt.pth", with_args=False)
    with pytest.raises(ExportError, match="--model"):
        load_for_export(path)
    released = tmp_path / "released.pth"  # the original's layout: 'module' + an argparse.Namespace
    sd = dict(mim.state_dict(), **{"cls_pt_layers.0.norm1.weight": torch.ones(192)})  # BEiT v2 aggregation: dropped too
    torch.save({"module": sd, "args": argparse.Namespace(input_size=112, rel_pos_bias=True)}, released)
    exp = load_for_export(released, overrides={"model": MIM_NAME})
    assert exp.name == CLS_NAME and exp.data_config["input_size"] == (3, 112, 112)
    assert torch.equal(exp.model.state_dict()["norm.weight"], mim.state_dict()["norm.weight"])


@pytest.mark.parametrize("model, match", [("resnet50", "not a BEiT model"),
                                          ("beit_small_patch16_224", "do not fit beit_small")])
def test_wrong_model_is_refused(tmp_path, model, match):
    path, _ = make_pretrained(tmp_path / "pt.pth")
    with pytest.raises(ExportError, match=match):
        load_for_export(path, overrides={"model": model})


def test_flags_that_disagree_with_the_weights(tmp_path, caplog):
    path, model, _ = make_finetuned(tmp_path / "ft.pth", input_size=160)
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        exp = load_for_export(path, overrides={"use_mean_pooling": False})
    assert exp.model.global_pool == "avg" and "--use_mean_pooling False disagrees" in caplog.text
    with pytest.raises(ExportError, match="--input_size 224: the weights hold a 10x10 grid"):
        load_for_export(path, overrides={"input_size": 224})


# ---------------------------------------------------------------------- what transformers cannot express
@pytest.mark.parametrize("kwargs, match", [
    (dict(swiglu_mlp=True), "swiglu"),
    (dict(scale_mlp=True), "scale_mlp"),
    (dict(global_pool="avg", use_fc_norm=False), "pooling 'avg'"),
    (dict(img_size=(224, 160)), "not square"),
])
def test_hf_refuses_what_it_cannot_express(kwargs, match):
    model = timm.create_model(CLS_NAME, depth=1, num_classes=0, **kwargs)
    with pytest.raises(ExportError, match=match):
        hf_config_kwargs(model)


def test_hf_names_cover_every_weight():
    model = randomize(timm.create_model(CLS_NAME, depth=2, num_classes=3, qkv_bias=False), 4)
    sd = timm_to_hf_state_dict(model)  # no q/v bias in timm: HF gets zeros
    assert torch.count_nonzero(sd["beit.encoder.layer.0.attention.attention.query.bias"]) == 0
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in model.state_dict().values()) + 2 * 2 * 192
