"""Parameter groups as the original BEiT optim_factory: decay membership, layer-wise lr scales."""
import pytest
import torch
from torch import nn
from timm.models.beit import Beit

from mcbeit.engine.optim import build_optimizer, layer_id, param_groups
from mcbeit.engine.schedules import apply_schedules
from mcbeit.models.beit import BeitForMaskedImageModeling

DEPTH = 3


def tiny_mim_model():
    return BeitForMaskedImageModeling(
        img_size=32, patch_size=16, embed_dim=16, depth=DEPTH, num_heads=2, vocab_size=20,
        use_abs_pos_emb=True, use_shared_rel_pos_bias=True, init_values=0.1)


def tiny_classifier(**kwargs):
    return Beit(img_size=32, patch_size=16, embed_dim=16, depth=DEPTH, num_heads=2, num_classes=5,
                use_abs_pos_emb=False, init_values=0.1, **kwargs)


def names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in groups]


def decay_membership(model, groups):
    decay, no_decay = set(), set()
    for group, names in zip(groups, names_by_group(model, groups), strict=True):
        (decay if group["weight_decay"] > 0 else no_decay).update(names)
    return decay, no_decay


def test_decay_membership_exactly_as_the_original():
    model = tiny_mim_model()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = param_groups(model, 0.05, skip_list=model.no_weight_decay())
    decay, no_decay = decay_membership(model, groups)

    expected_no_decay = {n for n, p in model.named_parameters()
                         if p.ndim == 1 or n.endswith(".bias") or n in ("pos_embed", "cls_token")}
    assert no_decay == expected_no_decay
    assert decay == {n for n, _ in model.named_parameters()} - expected_no_decay
    for name in ("mask_token", "lm_head.weight", "rel_pos_bias.relative_position_bias_table",
                 "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        assert name in decay, name
    for name in ("pos_embed", "cls_token", "lm_head.bias", "norm.weight", "blocks.1.attn.q_bias",
                 "blocks.2.gamma_1", "patch_embed.proj.bias"):
        assert name in no_decay, name
    assert all(g["lr_scale"] == 1.0 for g in groups) and len(groups) == 2
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}


def test_frozen_parameters_are_left_out():
    model = tiny_mim_model()
    model.patch_embed.requires_grad_(False)
    names = set().union(*names_by_group(model, param_groups(model, 0.05)))
    assert not any(n.startswith("patch_embed") for n in names)
    assert "lm_head.weight" in names


def test_layer_decay_scales():
    model = tiny_mim_model()
    decay = 0.65
    groups = param_groups(model, 0.05, skip_list=model.no_weight_decay(), layer_decay=decay)
    scale = {}
    for group, names in zip(groups, names_by_group(model, groups), strict=True):
        for n in names:
            scale[n] = group["lr_scale"]
    top = DEPTH + 1
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "mask_token", "pos_embed"):
        assert scale[name] == pytest.approx(decay ** top), name
    for i in range(DEPTH):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(decay ** (top - (i + 1)))
        assert scale[f"blocks.{i}.norm1.weight"] == pytest.approx(decay ** (top - (i + 1)))
    for name in ("rel_pos_bias.relative_position_bias_table", "norm.weight", "lm_head.weight", "lm_head.bias"):
        assert scale[name] == 1.0, name  # layer num_layers + 1, the shared bias included
    # one group per (layer, decay / no decay) present
    keys = [(round(g["lr_scale"], 12), g["weight_decay"] > 0) for g in groups]
    assert len(keys) == len(set(keys))


def test_layer_id_rules():
    assert layer_id("cls_token", 12) == layer_id("mask_token", 12) == layer_id("pos_embed", 12) == 0
    assert layer_id("patch_embed.proj.weight", 12) == 0
    assert layer_id("blocks.0.mlp.fc1.weight", 12) == 1
    assert layer_id("blocks.11.gamma_2", 12) == 12
    for name in ("rel_pos_bias.relative_position_bias_table", "norm.bias", "fc_norm.weight", "head.weight"):
        assert layer_id(name, 12) == 13


def test_build_optimizer_keeps_timm_beit_tables_decayed_unless_disabled():
    model = tiny_classifier(use_rel_pos_bias=True)
    assert any("relative_position_bias_table" in n for n in model.no_weight_decay())  # timm's differ
    table = "blocks.0.attn.relative_position_bias_table"

    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    decay, no_decay = decay_membership(model, opt.param_groups)
    assert table in decay and "head.weight" in decay
    assert {"cls_token", "head.bias"} <= no_decay

    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75,
                          extra_no_decay_keywords=("relative_position_bias_table",))
    decay, no_decay = decay_membership(model, opt.param_groups)
    assert table in no_decay and "blocks.0.attn.qkv.weight" in decay


def test_build_optimizer_adamw_settings():
    model = tiny_mim_model()
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 and g["lr"] == 2e-3 and g["lr_scale"] == 1.0
        assert g["fused"] is True  # CPU and CUDA: the fused kernel (it also skips non-finite steps on the device)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


@pytest.mark.parametrize("name", ["sgd", "lamb", "lookahead_adamw", "adam"])
def test_any_timm_optimizer_keeps_lr_scale(name):
    model = tiny_mim_model()
    opt = build_optimizer(model, name, lr=0.1, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.5 ** k for k in range(DEPTH + 1, -1, -1)])
    apply_schedules(opt, 0.2, 0.01)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.2 * g["lr_scale"])
        assert g["weight_decay"] in (0.0, 0.01)
    model(torch.randn(2, 3, 32, 32), torch.ones(2, 4, dtype=torch.bool))[1].sum().backward()
    opt.step()


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'adamz'.*not found in registry.*adamw"):
        build_optimizer(tiny_mim_model(), "adamz", lr=1e-3, weight_decay=0.05)


def test_optimizer_from_the_finetuning_flags_and_compiled_model_names():
    from mcbeit.config import resolve
    from mcbeit.config.finetune import FinetuneConfig
    from mcbeit.tasks.finetune import FinetuneTask

    model = tiny_classifier(use_rel_pos_bias=True)
    flags = resolve(FinetuneConfig, dict(opt="adamw", lr=1e-3, weight_decay=0.05, opt_eps=1e-8, momentum=0.9,
                                         layer_decay=0.75, disable_weight_decay_on_rel_pos_bias=True))
    assert flags.opt_betas is None
    opt = FinetuneTask(flags).build_optimizer(torch.compile(model))  # names without the _orig_mod. prefix
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # --opt_betas unset: the optimizer's default
    decay, no_decay = decay_membership(model, opt.param_groups)
    assert "blocks.2.attn.relative_position_bias_table" in no_decay
    assert len({g["lr_scale"] for g in opt.param_groups}) == DEPTH + 2


def test_layer_prefix_reads_layers_under_it_and_puts_everything_else_on_top():
    """A segmentor (backbone.* + neck and heads): mmseg's LayerDecayOptimizerConstructor, num_layers + 2 groups."""
    from torch import nn

    class Segmentor(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_mim_model()
            self.decode_head = nn.Conv2d(4, 3, 1)

    model = Segmentor()
    decay = 0.9
    groups = param_groups(model, 0.05, skip_list=(), layer_decay=decay, layer_prefix="backbone.")
    scale = {n: g["lr_scale"] for g, names in zip(groups, names_by_group(model, groups), strict=True) for n in names}
    top = DEPTH + 1
    assert scale["backbone.cls_token"] == scale["backbone.patch_embed.proj.weight"] == pytest.approx(decay ** top)
    assert scale[f"backbone.blocks.{DEPTH - 1}.attn.qkv.weight"] == pytest.approx(decay)
    assert scale["decode_head.weight"] == scale["backbone.norm.weight"] == 1.0
    decayed = {n for g, names in zip(groups, names_by_group(model, groups), strict=True) if g["weight_decay"] > 0
               for n in names}
    assert "backbone.cls_token" in decayed  # the original's quirk: its exemption list never matches prefixed names


def test_detectron2_decay_rule_exempts_norm_modules_and_named_parameters_only():
    """detectron2's get_default_optimizer_params(weight_decay_norm=0, overrides={pos_embed, relative tables: 0}):
    norm modules' weights and biases get none; other biases, cls_token, q/v biases and gammas keep it."""
    from timm.models.beit import Beit

    from mcbeit.engine.optim import detectron2_no_decay

    model = nn.Sequential()
    model.add_module("vit", Beit(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=2, num_classes=0,
                                 use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=0.1))
    model.add_module("neck", nn.Sequential(nn.Conv2d(24, 8, 1), nn.GroupNorm(4, 8), nn.BatchNorm2d(8)))
    exempt = detectron2_no_decay(model)
    assert {"vit.pos_embed", "vit.blocks.0.attn.relative_position_bias_table", "vit.blocks.0.norm1.weight",
            "vit.blocks.0.norm1.bias", "neck.1.weight", "neck.1.bias", "neck.2.weight", "neck.2.bias"} <= exempt
    for kept in ("vit.cls_token", "vit.blocks.0.attn.q_bias", "vit.blocks.0.gamma_1", "neck.0.bias",
                 "vit.blocks.1.mlp.fc1.bias", "vit.blocks.1.attn.proj.weight"):
        assert kept not in exempt
    groups = param_groups(model, 0.1, no_decay_names=exempt)
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["neck.0.bias"]) in decay and id(named["vit.cls_token"]) in decay
    assert id(named["neck.1.weight"]) not in decay and id(named["vit.pos_embed"]) not in decay
    assert sum(len(g["params"]) for g in groups) == len(named)
