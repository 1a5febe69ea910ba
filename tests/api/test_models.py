"""mcbeit.get_model / list_models: every file a command here writes, released files and names -> the model with its
weights, its preprocessing, ``model.mcbeit`` and ``extract_feat``; clear errors for what it cannot be."""
from __future__ import annotations

import shutil

import pytest
import timm
import torch

import mcbeit
from mcbeit.errors import InputError
from mcbeit.models.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(model, sd):
    own = model.state_dict()
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        assert torch.equal(own[k], v), k


def test_names_cover_every_kind_and_the_seeds_names():
    names = mcbeit.list_models()
    for name in ("beit_base_patch16_224", "beitv2_base_patch16_224", "beit_tiny_patch16_224_8k_vocab",
                 "beit_base_patch16_224_8k_vocab_cls_pt", "conmim_base_patch16_224",
                 "beitv2_beit-base-p16_8xb256-amp-coslr-300e_in1k", "beit-base-p16_beitv2-pre_8xb128-coslr-100e_in1k",
                 "upernet_mcbeit_base_12_512_slide_160k_ade20k_pt", "benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit"):
        assert name in names, name
    assert mcbeit.list_models("*ADE20K*", kind="segmentation") == mcbeit.list_models("upernet_*")
    assert "conmim_tiny_patch16_224" in mcbeit.list_models(kind="pretrain")
    assert not set(mcbeit.list_models(kind="classifier")) & set(mcbeit.list_models(kind="pretrain"))
    with pytest.raises(InputError, match="kind="):
        mcbeit.list_models(kind="tokenizer")


def test_a_pretraining_checkpoint_and_its_run_folder(pretrained_checkpoint):
    model = mcbeit.get_model(pretrained_checkpoint.parent, device="cpu")  # the run's folder: its newest checkpoint
    info = model.mcbeit
    assert (info.kind, info.method, info.name) == ("pretrain", "mcbeit", "beit_tiny_patch16_224_8k_vocab")
    assert info.source == str(pretrained_checkpoint) and not model.training
    ckpt = read_checkpoint(pretrained_checkpoint)
    _same_weights(model, ckpt["model"])
    assert ckpt["args"]["method"] == "mcbeit"  # recorded by the task now
    cfg = mcbeit.data_config(model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.5, 0.5, 0.5)
    x = torch.rand(2, 3, 64, 64)
    tokens = model.extract_feat(x)
    assert tokens.shape == (2, 17, 192)
    torch.testing.assert_close(tokens, model.forward_features(x))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    torch.testing.assert_close(model.extract_feat(x, mask), model.forward_features(x, mask))
    assert info.settings["mask_type"] == "block" and info.settings["num_mask_patches"] == 6


def test_a_fine_tuned_checkpoint_keeps_its_class_names_and_pooled_features(finetuned_run):
    model = mcbeit.get_model(finetuned_run / "checkpoint-best.pth")
    assert model.mcbeit.kind == "classifier" and model.mcbeit.classes == ["class_0", "class_1", "class_2", "class_3"]
    _same_weights(model, read_checkpoint(finetuned_run / "checkpoint-best.pth")["model"])
    cfg = mcbeit.data_config(model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["crop_pct"] == pytest.approx(224 / 256)
    assert model.pretrained_cfg["label_names"] == model.mcbeit.classes
    x = torch.rand(3, 3, 64, 64)
    feats = model.extract_feat(x)
    assert feats.shape == (3, 192)
    torch.testing.assert_close(model.head(feats), model(x))  # the feature the head reads


def test_a_linear_probe_checkpoint(linprobe_run):
    model = mcbeit.get_model(linprobe_run)
    assert type(model).__name__ == "LinearProbe" and model.mcbeit.settings["linear_probe"]
    assert model.layer == 2 and model.pool == "cls"
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model.head(model.bn(model.extract_feat(x))), model(x))


def test_segmentation_and_detection_checkpoints(seg_run, det_run):
    seg = mcbeit.get_model(seg_run)
    assert seg.mcbeit.kind == "segmentation" and len(seg.mcbeit.classes) == seg.decode_head.conv_seg.out_channels
    maps = seg.extract_feat(torch.rand(1, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 8, 8), (1, 192, 4, 4), (1, 192, 2, 2), (1, 192, 1, 1)]
    assert seg.mcbeit.settings["test_mode"] == "slide" and mcbeit.data_config(seg)["img_scale"] == (128, 32)

    det = mcbeit.get_model(det_run)
    assert det.mcbeit.kind == "detection"
    assert det.mcbeit.classes == ["disc", "square", "triangle", "cross"]
    assert det.mcbeit.settings["category_ids"] == [3, 5, 8, 13]
    levels = det.extract_feat(torch.rand(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        "0": (2, 32, 16, 16), "1": (2, 32, 8, 8), "2": (2, 32, 4, 4), "3": (2, 32, 2, 2), "pool": (2, 32, 1, 1)}
    assert not det.backbone.body.grad_checkpointing


def test_an_exported_folder_through_timm(finetuned_run, tmp_path):
    from mcbeit.cli import export

    assert export.main([str(finetuned_run / "checkpoint-best.pth"), "--output", str(tmp_path / "exp")]) == 0
    model = mcbeit.get_model(tmp_path / "exp")
    source = mcbeit.get_model(finetuned_run / "checkpoint-best.pth")
    assert model.mcbeit.kind == "classifier" and model.mcbeit.classes == source.mcbeit.classes
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(model(x), source(x))
    torch.testing.assert_close(model.extract_feat(x), source.extract_feat(x))


def test_released_files_without_our_flags(tmp_path):
    from tests.models.test_released_v2 import unilm_v2_pretraining_sd

    v2 = unilm_v2_pretraining_sd(depth=4)  # unilm's beitv2 pre-training layout, tiny, 14x14 grid
    torch.save({"model": v2, "epoch": 299}, tmp_path / "beitv2_tiny_pt.pth")
    model = mcbeit.get_model(tmp_path / "beitv2_tiny_pt.pth")
    assert (model.mcbeit.kind, model.mcbeit.method) == ("pretrain", "beitv2")
    assert type(model).__name__ == "BeitV2ForMaskedImageModeling" and model.head_layers == 2
    assert mcbeit.data_config(model)["mean"] == (0.485, 0.456, 0.406)  # BEiT v2 takes ImageNet's mean / std
    _same_weights(model, v2)
    early, last = model.extract_feat(torch.rand(1, 3, 224, 224))
    assert early.shape == last.shape == (1, 197, 192)

    torch.manual_seed(0)
    clf = timm.create_model("beit_tiny_patch16_224", num_classes=1000)
    torch.save({"model": clf.state_dict()}, tmp_path / "released_ft.pth")  # no args: the size from the weights
    model = mcbeit.get_model(tmp_path / "released_ft.pth")
    assert model.mcbeit.kind == "classifier" and len(model.mcbeit.classes) == 1000  # ImageNet's names
    assert model.mcbeit.classes[1] == "goldfish"
    _same_weights(model, clf.state_dict())


def test_names_build_random_or_load_a_file(pretrained_checkpoint, tmp_path):
    model = mcbeit.get_model("beit_tiny_patch16_224", num_classes=3)
    assert model.mcbeit.kind == "classifier" and model.mcbeit.source is None and model.num_classes == 3
    assert model.extract_feat(torch.rand(1, 3, 224, 224)).shape == (1, 192)

    mim = mcbeit.get_model("beit_tiny_patch16_224_8k_vocab", pretrained=pretrained_checkpoint, img_size=64)
    _same_weights(mim, read_checkpoint(pretrained_checkpoint)["model"])
    assert mim.mcbeit.source == str(pretrained_checkpoint)
    with pytest.raises(InputError, match=r"lm_head.weight: checkpoint \(8192, 192\) vs model \(64, 192\)"):
        mcbeit.get_model("beit_tiny_patch16_224_8k_vocab", pretrained=pretrained_checkpoint, img_size=64,
                         vocab_size=64)

    with pytest.raises(InputError, match="nothing is downloaded.*pretrained='<file>'"):
        mcbeit.get_model("beit_tiny_patch16_224_8k_vocab", pretrained=True)


def test_a_seed_name_with_pretrained_true_reads_torch_hubs_cache(tmp_path, monkeypatch):
    from mcbeit.api.models import SEED_MODELS, hub_cache_path

    name = "beit-base-p16_beitv2-in21k-pre_3rdparty_in1k"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch hub's cache: <TORCH_HOME>/hub/checkpoints
    with pytest.raises(InputError, match=r"beitv2-base_3rdparty_in1k_20221114-73e11905\.pth \(put it at "):
        mcbeit.get_model(name, pretrained=True)
    torch.manual_seed(1)
    released = timm.create_model("beit_base_patch16_224", num_classes=1000)
    path = hub_cache_path(SEED_MODELS[name].url)
    assert path.startswith(str(tmp_path / "torch" / "hub" / "checkpoints"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": released.state_dict()}, path)
    model = mcbeit.get_model(name, pretrained=True)
    assert model.mcbeit.source == path and model.mcbeit.classes[0] == "tench"
    assert mcbeit.data_config(model)["mean"] == (0.485, 0.456, 0.406)
    _same_weights(model, released.state_dict())


def test_presets_build_their_recipe_with_the_datasets_names():
    model = mcbeit.get_model("upernet_beit_base_12_512_slide_160k_ade20k_pt", num_classes=5)
    assert model.mcbeit.kind == "segmentation" and model.mcbeit.classes == []
    assert mcbeit.data_config(model)["input_size"] == (3, 512, 512)
    assert len(mcbeit.get_model("upernet_beit_base_12_512_slide_160k_ade20k_pt").mcbeit.classes) == 150
    with pytest.raises(InputError, match="num_classes= only"):
        mcbeit.get_model("upernet_beit_base_12_512_slide_160k_ade20k_pt", img_size=256)

    det = mcbeit.get_model("benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit")
    assert det.mcbeit.kind == "detection" and det.mcbeit.source is None
    assert det.mcbeit.classes[0] == "person" and len(det.mcbeit.classes) == 80
    assert det.mcbeit.settings["category_ids"][-1] == 90  # COCO's ids, not 1..80
    assert mcbeit.data_config(det)["image_size"] == 1024


def test_clear_errors(tmp_path, vq_tokenizer_file, pretrained_checkpoint):
    with pytest.raises(InputError, match="neither a file nor a model name"):
        mcbeit.get_model("beit_huge_patch99")
    with pytest.raises(InputError, match="does not exist"):
        mcbeit.get_model(tmp_path / "missing.pth")
    with pytest.raises(InputError, match="is a tokenizer"):
        mcbeit.get_model(vq_tokenizer_file)
    with pytest.raises(InputError, match="pretrained= goes with a model name"):
        mcbeit.get_model(pretrained_checkpoint, pretrained=True)
    with pytest.raises(InputError, match="apply to model names only"):
        mcbeit.get_model(pretrained_checkpoint, num_classes=3)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pth"):
        mcbeit.get_model(tmp_path / "junk.pth")
    with pytest.raises(InputError, match="nothing is downloaded"):
        mcbeit.get_model("https://example.org/weights/beit.pth")
    copy = tmp_path / "seg.pth"
    shutil.copy(pretrained_checkpoint, copy)
    ckpt = torch.load(copy, weights_only=False)
    torch.save({"state_dict": {"backbone.patch_embed.proj.weight": ckpt["model"]["patch_embed.proj.weight"],
                               "decode_head.conv_seg.weight": torch.zeros(5, 8, 1, 1)}}, copy)
    with pytest.raises(InputError, match="whole segmentor.*get_model\\(PRESET, pretrained=FILE\\)"):
        mcbeit.get_model(copy)
