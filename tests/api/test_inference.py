"""``mcbeit.inference_model`` on a checkpoint of every command (the real runs of tests/api/conftest.py, and tiny BEiT
v2 / ConMIM runs made here through their own entry points), each answer checked against the same prediction made by
hand with the project's lower-level pieces: the fine-tuning evaluation transform, mmseg's test views and sliding
window, detectron2's resize-and-pad and the COCO results of the detection evaluation, the mask generators, the token
heads and tokenizers. Then the inputs it refuses, with messages that say what to pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import mcbeit
from mcbeit.cli import pretrain
from mcbeit.data.transforms import normalisation
from mcbeit.errors import InputError
from tests.tasks.conftest import make_image_folder
from tests.tasks.test_beitv2_pretrain import CODES, V2_FAST, VQKD_MODEL
from tests.tasks.test_conmim_pretrain import CONMIM_FAST

pytestmark = pytest.mark.usefixtures("one_thread")


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H,W,3): a colour gradient with a few shapes on it (structure for the models to see)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * (xx / width)[..., None] + \
        rng.uniform(-60, 60, 3) * (yy / height)[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        box = [x0, y0, x0 + int(rng.integers(8, 40)), y0 + int(rng.integers(8, 40))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return np.asarray(image)


def checkpoint_of(model) -> dict:
    """The file get_model read the model from."""
    return torch.load(model.mcbeit.source, map_location="cpu", weights_only=False)


def assert_weights_are(model, state: dict) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        assert torch.equal(own[key], value.to(own[key].dtype)), key


# ---------------------------------------------------------------------- classifiers
@pytest.fixture(scope="module")
def classifier(finetuned_run):
    return mcbeit.get_model(finetuned_run, device="cpu")


def by_hand(model, args: dict, image: Image.Image) -> np.ndarray:
    """Softmax of model(eval_transform(image)), the transform built from the checkpoint's flags as mcbeit-finetune
    builds its evaluation transform."""
    from mcbeit.data.classification_transforms import build_classification_transform

    mean, std = normalisation(args["imagenet_default_mean_and_std"])
    transform = build_classification_transform(False, args["input_size"], mean=mean, std=std,
                                               crop_pct=args["crop_pct"])
    x = transform(image, np.random.default_rng(0))  # (3,S,S)
    assert x.shape == (3, args["input_size"], args["input_size"])
    with torch.no_grad():
        return model(x[None]).float().softmax(-1)[0].numpy()


def test_a_classifier_answers_paths_pil_images_arrays_and_lists_as_its_evaluation_does(classifier, cls_data, tmp_path):
    ckpt = checkpoint_of(classifier)
    assert ckpt["format"] == "mcbeit-finetune-v1"
    assert_weights_are(classifier, ckpt["model"])
    classes = sorted(p.name for p in (cls_data / "train").iterdir())
    assert ckpt["classes"] == classes == ["class_0", "class_1", "class_2", "class_3"]  # the class folders

    pixels = scene(90, 120, seed=1)  # not square and larger than 64: the resize and the centre crop matter
    path = tmp_path / "scene.png"  # lossless: the same pixels as the array
    Image.fromarray(pixels).save(path)
    forms = {"path": path, "str": str(path), "pil": Image.fromarray(pixels), "uint8": pixels,
             "float": pixels.astype(np.float64) / 255.0}
    expected = by_hand(classifier, ckpt["args"], Image.fromarray(pixels))
    for name, image in forms.items():
        result = mcbeit.inference_model(classifier, image)
        assert isinstance(result, dict), name
        assert set(result) == {"pred_scores", "pred_label", "pred_score", "pred_class"}, name
        scores = result["pred_scores"]
        assert scores.shape == (4,) and scores.dtype == np.float32, name
        assert scores.sum() == pytest.approx(1.0, abs=1e-5), name
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6, err_msg=name)
        assert result["pred_label"] == int(expected.argmax()) and isinstance(result["pred_label"], int), name
        assert result["pred_score"] == pytest.approx(float(scores[result["pred_label"]]), abs=1e-7), name
        assert result["pred_class"] == classes[result["pred_label"]], name
    # the comparison tells pipelines apart: a plain resize to 64 px (no crop) gives other scores
    squashed = by_hand(classifier, {**ckpt["args"], "crop_pct": 1.0}, Image.fromarray(pixels).resize((64, 64)))
    assert np.abs(squashed - expected).max() > 1e-4

    listed = mcbeit.inference_model(classifier, [path, pixels])
    assert isinstance(listed, list) and len(listed) == 2
    for result in listed:
        np.testing.assert_allclose(result["pred_scores"], expected, rtol=0, atol=1e-6)
    assert mcbeit.inference_model(classifier, (path,))[0]["pred_class"] == classes[int(expected.argmax())]
    assert mcbeit.inference_model(classifier, []) == []


def test_batch_size_does_not_change_a_classifiers_answers(classifier):
    images = [scene(64 + 8 * i, 100 - 6 * i, seed=10 + i) for i in range(5)]
    one = mcbeit.inference_model(classifier, images, batch_size=1)
    eight = mcbeit.inference_model(classifier, images, batch_size=8)
    two = mcbeit.inference_model(classifier, images, batch_size=2)
    assert len(one) == len(eight) == len(two) == 5
    for a, b, c in zip(one, eight, two, strict=True):
        np.testing.assert_allclose(a["pred_scores"], b["pred_scores"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["pred_scores"], c["pred_scores"], rtol=0, atol=1e-6)
        assert a["pred_label"] == b["pred_label"] == c["pred_label"]
    # the images are told apart (each result is its own image's)
    assert len({tuple(np.round(r["pred_scores"], 5)) for r in one}) == 5


def test_a_linear_probe_answers_as_its_model_does(linprobe_run):
    from mcbeit.models.linear_probe import LinearProbe

    model = mcbeit.get_model(linprobe_run, device="cpu")
    assert isinstance(model, LinearProbe) and model.mcbeit.settings["linear_probe"] is True
    ckpt = checkpoint_of(model)
    assert_weights_are(model, ckpt["model"])
    pixels = scene(80, 70, seed=2)
    result = mcbeit.inference_model(model, Image.fromarray(pixels))
    np.testing.assert_allclose(result["pred_scores"], by_hand(model, ckpt["args"], Image.fromarray(pixels)),
                               rtol=0, atol=1e-6)
    assert result["pred_scores"].sum() == pytest.approx(1.0, abs=1e-5)
    assert result["pred_class"] == ckpt["classes"][result["pred_label"]]


# ---------------------------------------------------------------------- segmentation
def test_a_segmentor_gives_the_label_map_of_its_test_pipeline(seg_run):
    from mcbeit.data.embedded_seg import embedded_segmentation_root
    from mcbeit.data.seg_transforms import SegTestTransform
    from mcbeit.evaluation.segmentation import predict

    model = mcbeit.get_model(seg_run, device="cpu")
    ckpt = checkpoint_of(model)
    args, num_classes = ckpt["args"], ckpt["num_classes"]
    assert ckpt["format"] == "mcbeit-seg-v1" and not args["aug_test"]
    # the checkpoint's flags -> mmseg's single-scale test views and the sliding window, by hand
    crop = args["crop_size"]
    views_of = SegTestTransform(img_scale=tuple(args["img_scale"]), ratios=(1.0,), flip=False, crop_size=(crop, crop))
    stride = args["stride"] or crop * 2 // 3  # SegmentationConfig's default stride

    files = sorted((embedded_segmentation_root() / "images" / "val").glob("*.jpg"))[:2]
    odd = scene(45, 77, seed=3)  # an odd size: the map comes back at the image's size, not the views'
    results = mcbeit.inference_model(model, [*files, odd])
    assert isinstance(results, list) and len(results) == 3
    for image, result in zip([*files, odd], results, strict=True):
        pixels = np.asarray(Image.open(image).convert("RGB")) if not isinstance(image, np.ndarray) else image
        label = result["pred_sem_seg"]
        assert label.shape == pixels.shape[:2] and label.dtype == np.int64
        assert label.min() >= 0 and label.max() < num_classes
        assert result["classes"] == ckpt["classes"] == ["background", "stripes", "checkers", "dots", "grid"]
        views, _ = views_of(pixels, np.zeros(pixels.shape[:2], dtype=np.uint8))
        with torch.no_grad():
            expected = predict(model.encode_decode, views, pixels.shape[:2], num_classes, mode=args["test_mode"],
                               crop=crop, stride=stride)
        np.testing.assert_array_equal(label, expected.numpy())


# ---------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def detector(det_run):
    return mcbeit.get_model(det_run, device="cpu")


@pytest.fixture(scope="module")
def det_image():
    from mcbeit.data.embedded_det import embedded_detection_root

    root = embedded_detection_root()
    categories = json.loads((root / "annotations" / "instances_val2017.json").read_text())["categories"]
    return sorted((root / "val2017").glob("*.jpg"))[0], {c["id"]: c["name"] for c in categories}


def test_a_detector_gives_the_boxes_and_masks_of_its_coco_evaluation(detector, det_image):
    from faster_coco_eval.core import mask as mask_util

    from mcbeit.data.det_transforms import ResizePadTestTransform
    from mcbeit.evaluation.detection import to_coco_results

    path, names = det_image
    ckpt = checkpoint_of(detector)
    assert ckpt["format"] == "mcbeit-det-v1"
    image = Image.open(path).convert("RGB")
    width, height = image.size
    result = mcbeit.inference_model(detector, path)
    assert set(result) == {"boxes", "labels", "scores", "masks", "classes"}
    boxes, scores, labels, masks = result["boxes"], result["scores"], result["labels"], result["masks"]
    k = len(scores)
    assert k > 0
    assert boxes.shape == (k, 4) and boxes.dtype == np.float32 and scores.shape == (k,)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 1] >= 0).all() \
        and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert masks.shape == (k, height, width) and masks.dtype == np.bool_
    assert labels.dtype == np.int64 and set(labels.tolist()) <= set(names)  # the json's ids (3, 5, 8, 13)
    assert result["classes"] == [names[int(i)] for i in labels]
    assert (scores >= 0.05).all()  # the model's own threshold

    # the evaluation pipeline by hand: resize and pad, the model's box-level masks, COCO results (xywh, ids)
    x, target = ResizePadTestTransform(ckpt["args"]["image_size"])(image)
    target.update(image_id=1, orig_size=(height, width))
    detector.transform.paste_masks = False
    try:
        with torch.no_grad():
            out = detector([x])[0]
    finally:
        detector.transform.paste_masks = True
    coco = to_coco_results([{**out, "mask_kind": "roi"}], [target], [c for c, _ in ckpt["categories"]])
    assert len(coco) == k
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    np.testing.assert_allclose(xywh, np.array([r["bbox"] for r in coco]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, np.array([r["score"] for r in coco]), rtol=0, atol=1e-6)
    assert labels.tolist() == [r["category_id"] for r in coco]
    decoded = mask_util.decode([r["segmentation"] for r in coco]).transpose(2, 0, 1).astype(bool)  # (K,H,W)
    np.testing.assert_array_equal(masks, decoded)
    assert detector.transform.paste_masks is True  # inference left the model as it found it


def test_score_threshold_keeps_the_detections_scoring_at_least_it(detector, det_image):
    path, _ = det_image
    everything = mcbeit.inference_model(detector, path)
    threshold = float(np.median(everything["scores"]))
    kept = mcbeit.inference_model(detector, [path], score_threshold=threshold)[0]
    keep = everything["scores"] >= threshold
    assert 0 < keep.sum() < len(keep) and (kept["scores"] >= threshold).all()
    np.testing.assert_array_equal(kept["scores"], everything["scores"][keep])
    np.testing.assert_array_equal(kept["boxes"], everything["boxes"][keep])
    np.testing.assert_array_equal(kept["labels"], everything["labels"][keep])
    np.testing.assert_array_equal(kept["masks"], everything["masks"][keep])
    assert kept["classes"] == [c for c, k in zip(everything["classes"], keep, strict=True) if k]
    assert len(mcbeit.inference_model(detector, path, score_threshold=1.01)["scores"]) == 0


# ---------------------------------------------------------------------- pre-training
def mask_counts(model, args: dict) -> set[int]:
    """Masked-patch counts the method's mask generator draws with the checkpoint's flags."""
    from mcbeit.data.masking import build_mask_generator
    from mcbeit.tasks.pretrain import mask_cell

    generator = build_mask_generator(args["mask_type"], tuple(model.patch_embed.grid_size), args["num_mask_patches"],
                                     args["mask_ratio"], args["min_mask_patches_per_block"],
                                     args["max_mask_patches_per_block"], exact=args.get("method") == "beitv2",
                                     cell=mask_cell(model.patch_embed.patch_size[0]))
    return {int(generator(np.random.default_rng(seed)).sum()) for seed in range(20)}


def model_input(pixels: np.ndarray, args: dict) -> torch.Tensor:
    """(1,3,64,64): the central 64 x 64 square of a 64 px high image, normalised (no resize: it is the input size)."""
    assert pixels.shape[0] == args["input_size"] == 64
    left = (pixels.shape[1] - 64) // 2
    mean, std = (torch.tensor(v)[:, None, None] for v in normalisation(args["imagenet_default_mean_and_std"]))
    x = torch.from_numpy(pixels[:, left:left + 64].copy()).permute(2, 0, 1).float() / 255
    return ((x - mean) / std)[None]


def tokens_by_hand(model, x: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        tokens = model.forward_features(x, torch.from_numpy(mask).reshape(1, -1))  # (1,1+N,D) after the norm
        return model.lm_head(tokens)[:, 1:].argmax(-1).reshape(mask.shape).numpy()


def test_a_pretraining_checkpoint_predicts_its_visual_tokens_under_the_seeds_mask(pretrained_checkpoint):
    model = mcbeit.get_model(pretrained_checkpoint, device="cpu")
    args = checkpoint_of(model)["args"]
    assert model.mcbeit.kind == "pretrain" and model.mcbeit.method == "mcbeit"
    pixels = scene(64, 96, seed=4)  # the central square is the model's input as it is
    result = mcbeit.inference_model(model, pixels, seed=0)
    assert set(result) == {"mask", "pred_tokens"}  # no tokenizer file in the checkpoint: tokens only
    mask, pred = result["mask"], result["pred_tokens"]
    assert mask.shape == tuple(model.patch_embed.grid_size) == (4, 4) and mask.dtype == np.bool_
    assert int(mask.sum()) in mask_counts(model, args)
    assert pred.shape == (4, 4) and pred.dtype == np.int64 and 0 <= pred.min() and pred.max() < 8192
    np.testing.assert_array_equal(pred, tokens_by_hand(model, model_input(pixels, args), mask))

    again = mcbeit.inference_model(model, pixels, seed=0)
    np.testing.assert_array_equal(again["mask"], mask)
    np.testing.assert_array_equal(again["pred_tokens"], pred)
    others = [mcbeit.inference_model(model, pixels, seed=s)["mask"] for s in (1, 2, 3)]
    assert any(not np.array_equal(other, mask) for other in others)
    for other in others:
        assert int(other.sum()) in mask_counts(model, args)


def tokenizer_answer(tokenizer, pixels: np.ndarray, size: int) -> np.ndarray:
    """The tokenizer's tokens (h,w) of a square image resized to its input size (the second view: lanczos)."""
    view = Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)
    x = tokenizer.input_transform(torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1).float() / 255)
    with torch.no_grad():
        return tokenizer(x[None]).argmax(1)[0].numpy()


def test_a_checkpoint_with_its_tokenizer_gives_target_tokens_accuracy_and_a_reconstruction(tokenized_pretrain_run,
                                                                                           vq_tokenizer_file):
    from mcbeit.tokenizers import build_tokenizer

    model = mcbeit.get_model(tokenized_pretrain_run, device="cpu")
    args = checkpoint_of(model)["args"]
    assert args["discrete_vae_weight_path"] == str(vq_tokenizer_file)
    pixels = scene(64, 64, seed=5)
    result = mcbeit.inference_model(model, pixels)
    assert set(result) == {"mask", "pred_tokens", "target_tokens", "token_accuracy", "reconstruction"}
    mask, pred, target = result["mask"], result["pred_tokens"], result["target_tokens"]
    assert target.shape == mask.shape == (4, 4) and target.dtype == np.int64 and target.max() < 64
    assert 0.0 <= result["token_accuracy"] <= 1.0
    assert result["token_accuracy"] == pytest.approx(float((pred == target)[mask].mean()), abs=1e-6)
    np.testing.assert_array_equal(pred, tokens_by_hand(model, model_input(pixels, args), mask))

    size = args["second_input_size"]  # 32: the tokenizer's input size
    tokenizer = build_tokenizer("customized", str(vq_tokenizer_file), size).eval()
    np.testing.assert_array_equal(target, tokenizer_answer(tokenizer, pixels, size))
    recon = result["reconstruction"]
    assert recon.shape == (size, size, 3) and recon.dtype == np.uint8
    with torch.no_grad():  # decoded from the predictions where masked, the tokenizer's own tokens elsewhere
        decoded = tokenizer.decode(torch.from_numpy(np.where(mask, pred, target))[None])
    np.testing.assert_array_equal(recon, (decoded.clamp(0, 1) * 255 + 0.5).to(torch.uint8)[0].permute(1, 2, 0).numpy())


def test_a_tokenizer_given_as_a_path_is_used_and_one_of_another_vocabulary_is_refused(tokenized_pretrain_run,
                                                                                     vq_tokenizer_file,
                                                                                     pretrained_checkpoint, tmp_path):
    from mcbeit.tokenizers.custom import CustomTokenizer, save_custom_tokenizer

    pixels = scene(64, 64, seed=5)
    reference = mcbeit.inference_model(tokenized_pretrain_run, pixels, device="cpu")
    # the same checkpoint, its tokenizer moved away since: no comparison unless the tokenizer is given
    ckpt = torch.load(mcbeit.get_model(tokenized_pretrain_run, device="cpu").mcbeit.source, map_location="cpu",
                      weights_only=False)
    ckpt["args"] = {**ckpt["args"], "discrete_vae_weight_path": str(tmp_path / "moved" / "tokenizer.pth")}
    torch.save(ckpt, tmp_path / "checkpoint-0.pth")
    moved = mcbeit.get_model(tmp_path / "checkpoint-0.pth", device="cpu")
    assert set(mcbeit.inference_model(moved, pixels)) == {"mask", "pred_tokens"}
    given = mcbeit.inference_model(moved, pixels, tokenizer=str(vq_tokenizer_file))
    assert set(given) == set(reference)
    for key in ("mask", "pred_tokens", "target_tokens", "reconstruction"):
        np.testing.assert_array_equal(given[key], reference[key], err_msg=key)
    assert given["token_accuracy"] == reference["token_accuracy"]

    torch.manual_seed(0)
    small = tmp_path / "small_tokenizer.pth"
    save_custom_tokenizer(CustomTokenizer(image_size=32, head="vq", vocab_size=32, n_hid=16, n_blk_per_group=1,
                                          embed_dim=8), small)
    with pytest.raises(InputError, match=r"32 tokens, the model predicts 64"):
        mcbeit.inference_model(moved, pixels, tokenizer=str(small))
    with pytest.raises(InputError, match=r"8192"):  # the fixture's 64-word tokenizer for an 8192-word model
        mcbeit.inference_model(pretrained_checkpoint, pixels, tokenizer=str(vq_tokenizer_file),
                               device="cpu")
    with pytest.raises(InputError, match=r"does not exist"):
        mcbeit.inference_model(moved, pixels, tokenizer=str(tmp_path / "nowhere.pth"))


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("api_tiny_images"), n_per_class=2, size=64, seed=4)


@pytest.fixture(scope="module")
def beitv2_run(tiny_images, tmp_path_factory):
    """mcbeit-pretrain-beitv2, tiny (64 px, a random 64-code VQ-KD), one step."""
    from mcbeit.tokenizers.vqkd import VQKD

    folder = tmp_path_factory.mktemp("api_beitv2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save({"model": VQKD(VQKD_MODEL, image_size=64, codebook_size=CODES, codebook_dim=32).state_dict()},
                   folder / "vqkd.pth")
        pretrain.run(pretrain.get_beitv2_args_parser().parse_args(
            ["--data_path", str(tiny_images), "--output_dir", str(folder / "run"), "--tokenizer_weight",
             str(folder / "vqkd.pth"), *V2_FAST, "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0"]))
    return folder / "run"


@pytest.fixture(scope="module")
def conmim_run(tiny_images, tmp_path_factory):
    """mcbeit-pretrain-conmim, tiny (64 px, a narrow projector), one step."""
    out = tmp_path_factory.mktemp("api_conmim")
    with torch.random.fork_rng():
        pretrain.run(pretrain.get_conmim_args_parser().parse_args(
            ["--data_path", str(tiny_images), "--output_dir", str(out), *CONMIM_FAST, "--batch_size", "8",
             "--epochs", "1", "--warmup_epochs", "0"]))
    return out


def test_beitv2_extracts_the_early_and_last_tokens_and_predicts_tokens_with_exact_masks(beitv2_run):
    model = mcbeit.get_model(beitv2_run, device="cpu")
    args = checkpoint_of(model)["args"]
    assert model.mcbeit.method == "beitv2" and type(model).__name__ == "BeitV2ForMaskedImageModeling"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[1, [0, 15]] = True
    seen = []
    hook = model.blocks[model.early_layers - 1].register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            early, last = model.extract_feat(x, mask)
    finally:
        hook.remove()
    assert early.shape == last.shape == (2, 17, 192) and len(seen) == 1
    assert torch.equal(early, seen[0])  # block early_layers' output, before any norm
    with torch.no_grad():
        assert torch.allclose(last, model.forward_features(x, mask), rtol=0, atol=1e-6)  # after the final norm
        assert not torch.allclose(early, model.forward_features(x, mask), atol=1e-3)

    pixels = scene(64, 80, seed=6)
    result = mcbeit.inference_model(model, pixels, seed=3)
    assert set(result) == {"mask", "pred_tokens", "target_tokens", "token_accuracy"}  # VQ-KD has no decoder
    assert result["mask"].shape == (4, 4) and int(result["mask"].sum()) == args["num_mask_patches"] == 6  # exact
    assert mask_counts(model, args) == {6}
    assert result["pred_tokens"].max() < CODES and result["target_tokens"].max() < CODES
    assert 0.0 <= result["token_accuracy"] <= 1.0
    np.testing.assert_array_equal(result["pred_tokens"], tokens_by_hand(model, model_input(pixels, args),
                                                                        result["mask"]))


def test_conmim_gives_each_masked_patch_its_nearest_unmasked_patch(conmim_run):
    model = mcbeit.get_model(conmim_run, device="cpu")
    assert model.mcbeit.method == "conmim"
    assert model.mcbeit.source.endswith("checkpoint_copy-0.pth")  # the EMA teacher
    assert_weights_are(model, torch.load(conmim_run / "checkpoint-0.pth", map_location="cpu",
                                         weights_only=False)["teacher"])
    args = checkpoint_of(model)["args"]
    pixels = scene(64, 64, seed=7)
    result = mcbeit.inference_model(model, pixels, seed=0)
    assert set(result) == {"mask", "nearest_patch", "patch_accuracy"}
    mask, nearest = result["mask"], result["nearest_patch"]
    assert mask.shape == nearest.shape == (4, 4)
    assert int(mask.sum()) == 12 and mask_counts(model, args) == {12}  # 3 of the 4 cells of 2 x 2 patches
    cells = mask.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)  # one row per cell
    assert all(row.all() or not row.any() for row in cells)
    assert nearest.dtype == np.int64 and 0 <= nearest.min() and nearest.max() < 16
    own = np.arange(16).reshape(4, 4)
    assert result["patch_accuracy"] == pytest.approx(float((nearest == own)[mask].mean()), abs=1e-6)

    x, m = model_input(pixels, args), torch.from_numpy(mask).reshape(1, -1)
    with torch.no_grad():
        q, k = model(x, m)[1], model(x, None)[1]  # projections (1,N,P) of the masked and the whole view
        assert torch.allclose(model.extract_feat(x), model.forward_features(x), rtol=0, atol=0)
    expected = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2)).argmax(-1).reshape(4, 4)
    np.testing.assert_array_equal(nearest, expected.numpy())


# ---------------------------------------------------------------------- inputs refused
def test_bad_images_and_batch_sizes_are_input_errors_that_say_what_to_pass(classifier, tmp_path):
    good = scene(64, 64, seed=8)
    with pytest.raises(InputError, match=r"image .*missing\.jpg does not exist"):
        mcbeit.inference_model(classifier, tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match=r"cannot read the image .*corrupt\.jpg.*JPEG / PNG"):
        mcbeit.inference_model(classifier, [good, corrupt])  # one bad image in a list
    with pytest.raises(InputError, match=r"\(H,W,3\) or \(H,W\), got \(32, 32, 5\)"):
        mcbeit.inference_model(classifier, np.zeros((32, 32, 5), dtype=np.uint8))
    with pytest.raises(InputError, match=r"uint8 or float"):
        mcbeit.inference_model(classifier, np.zeros((32, 32, 3), dtype=np.int32))
    for wrong in (3.5, {"image": good}, torch.zeros(3, 32, 32)):
        with pytest.raises(InputError, match=r"a path, a PIL image or a numpy array, got"):
            mcbeit.inference_model(classifier, wrong)
    for size in (0, -2):
        with pytest.raises(InputError, match=r"batch_size must be at least 1"):
            mcbeit.inference_model(classifier, good, batch_size=size)
    with pytest.raises(InputError, match=r"get_model"):
        mcbeit.inference_model(torch.nn.Linear(2, 2), good)  # a module get_model did not build


def test_no_empty_box_survives_the_clipping_to_the_image(detector):
    """Detections in the padding clip to zero width at the original size: dropped, as the COCO evaluation does."""
    from mcbeit.data.embedded_det import embedded_detection_root

    images = sorted((embedded_detection_root() / "val2017").glob("*.jpg"))
    assert len(images) >= 20
    results = mcbeit.inference_model(detector, images, score_threshold=0.0)
    for result in results:
        boxes = result["boxes"]
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert len(result["masks"]) == len(boxes) == len(result["labels"]) == len(result["scores"])
    assert detector.transform.paste_masks  # restored after the box-level masks

    import warnings

    from mcbeit.api.visualise import render

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on a read-only array
        picture = render(detector, images[0], results[0])
    assert picture.dtype == np.uint8 and picture.shape[2] == 3


def test_models_built_by_name_at_small_sizes_answer():
    """A 32-px classifier (the CIFAR recipe's evaluation does not resize) takes images of any size; a pre-training
    model built at 64 px gets the recipe's masking scaled to its 4x4 grid (75 of 196 patches -> 6 of 16)."""
    torch.manual_seed(0)
    small = mcbeit.get_model("beit_tiny_patch16_224", img_size=32, num_classes=10, device="cpu")
    results = mcbeit.inference_model(small, [scene(64, 64, 1), scene(40, 50, 2), scene(32, 32, 3)])
    assert [r["pred_scores"].shape for r in results] == [(10,)] * 3
    mim = mcbeit.get_model("beit_tiny_patch16_224_8k_vocab_cls_pt", img_size=64, depth=4, vocab_size=64,
                           early_layers=3, head_layers=1, device="cpu")
    result = mcbeit.inference_model(mim, scene(64, 64, 4))
    assert result["mask"].shape == (4, 4) and result["mask"].sum() == 6  # BEiT v2's exact block masks
    assert result["pred_tokens"].max() < 64
