"""``mcbeit-predict`` (mcbeit.cli.predict) on the real runs of tests/api/conftest.py: what it prints, the pictures
and label maps it writes with ``--out``, the JSON of ``--json`` against ``mcbeit.inference_model``, its errors as
one ``mcbeit-predict: ...`` line, and ``--help`` through the installed console script."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import mcbeit
from mcbeit.cli import predict
from tests.api.test_inference import scene
from tests.tasks.conftest import REPO, cli_env

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images of other sizes than the models': a lossless PNG and a JPEG."""
    folder = tmp_path_factory.mktemp("predict_images")
    Image.fromarray(scene(90, 120, seed=1)).save(folder / "wide.png")
    Image.fromarray(scene(64, 64, seed=5)).save(folder / "square.jpg", quality=95)
    return [folder / "wide.png", folder / "square.jpg"]


def run(capsys, *argv) -> str:
    assert predict.main([*map(str, argv), "--device", "cpu"]) == 0
    return capsys.readouterr().out


def picture(path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.size > 0 and pixels.std() > 0  # not empty, not one colour
    return pixels


def test_a_classifier_prints_its_top_classes_draws_them_and_writes_the_api_results(finetuned_run, images, tmp_path,
                                                                                  capsys):
    out, record = tmp_path / "pictures", tmp_path / "predictions.json"
    printed = run(capsys, *images, "--model", finetuned_run, "--out", out, "--json", record, "--topk", "2")
    expected = mcbeit.inference_model(finetuned_run, images, device="cpu")
    lines = printed.splitlines()
    assert lines[0].startswith("classifier beit_tiny_patch16_224 (") and lines[0].endswith(") on cpu")
    for image, result in zip(images, expected, strict=True):
        head = f"{image}: {result['pred_class']} ({result['pred_score']:.4f})"
        at = lines.index(head)  # the top class per image
        top2 = np.argsort(-result["pred_scores"])[:2]
        assert lines[at + 1:at + 3] == [f"  class_{i}: {result['pred_scores'][i]:.4f}" for i in top2]  # --topk 2
        assert not lines[at + 3].startswith("  ")
    assert f"pictures in {out}" in lines

    for image in images:  # <out>/<stem>.png: the image over a band of its top classes
        drawn = picture(out / f"{image.stem}.png")
        pixels = np.asarray(Image.open(image).convert("RGB"))
        assert drawn.shape[0] > pixels.shape[0] and drawn.shape[1] >= pixels.shape[1]
        np.testing.assert_array_equal(drawn[:pixels.shape[0], :pixels.shape[1]], pixels)
    assert sorted(p.name for p in out.iterdir()) == ["square.png", "wide.png"]

    data = json.loads(record.read_text())
    assert data["model"] == str(finetuned_run) and data["kind"] == "classifier"
    assert [r["image"] for r in data["results"]] == [str(i) for i in images]
    for got, result in zip(data["results"], expected, strict=True):
        assert set(got) == {"image", "pred_scores", "pred_label", "pred_score", "pred_class"}
        np.testing.assert_allclose(got["pred_scores"], result["pred_scores"], rtol=0, atol=1e-6)
        assert got["pred_label"] == result["pred_label"] and got["pred_class"] == result["pred_class"]
        assert got["pred_score"] == pytest.approx(result["pred_score"], abs=1e-6)


def test_a_segmentor_writes_its_label_maps_as_pngs(seg_run, images, tmp_path, capsys):
    out = tmp_path / "maps"
    printed = run(capsys, *images, "--model", seg_run, "--out", out)
    model = mcbeit.get_model(seg_run, device="cpu")
    expected = mcbeit.inference_model(model, images)
    assert printed.splitlines()[0].startswith("segmentation ")
    classes = model.mcbeit.classes
    for image, result in zip(images, expected, strict=True):
        label = np.asarray(Image.open(out / f"{image.stem}_label.png"))
        np.testing.assert_array_equal(label, result["pred_sem_seg"])  # the class map, pixel for pixel
        pixels = np.asarray(Image.open(image).convert("RGB"))
        drawn = picture(out / f"{image.stem}.png")  # the image | its colourised map
        assert drawn.shape[0] == pixels.shape[0] and drawn.shape[1] > 2 * pixels.shape[1]
        np.testing.assert_array_equal(drawn[:, :pixels.shape[1]], pixels)
        # the largest class of the map and its share, first under the image's line
        values, counts = np.unique(result["pred_sem_seg"], return_counts=True)
        top = int(counts.argmax())
        share = 100 * counts[top] / result["pred_sem_seg"].size
        assert f"{image}:\n  {classes[values[top]]}: {share:.1f}%\n" in printed


def test_a_detector_prints_its_detections(det_run, tmp_path, capsys):
    from mcbeit.data.embedded_det import embedded_detection_root

    image = sorted((embedded_detection_root() / "val2017").glob("*.jpg"))[0]
    out, record = tmp_path / "boxes", tmp_path / "boxes.json"
    printed = run(capsys, image, "--model", det_run, "--score_threshold", "0.1", "--out", out, "--json", record)
    expected = mcbeit.inference_model(det_run, image, score_threshold=0.1, device="cpu")
    k = len(expected["scores"])
    assert k > 0
    assert printed.splitlines()[0].startswith("detection ")
    assert f"{image}: {k} detections" in printed
    shown = re.findall(r"^  (\w+) (\d\.\d{3}) \[([\d. ]+)\]$", printed, flags=re.M)
    assert len(shown) == k
    for (name, score, box), c, s, b in zip(shown, expected["classes"], expected["scores"], expected["boxes"],
                                          strict=True):
        assert name == c and float(score) == pytest.approx(float(s), abs=6e-4)
        np.testing.assert_allclose([float(v) for v in box.split()], b, atol=0.051)
    assert picture(out / f"{image.stem}.png").shape[:2] == np.asarray(Image.open(image)).shape[:2]
    data = json.loads(record.read_text())["results"][0]
    assert set(data) == {"image", "boxes", "scores", "labels", "classes"}  # masks stay out of the JSON
    np.testing.assert_allclose(data["boxes"], expected["boxes"], atol=1e-5)
    assert data["labels"] == expected["labels"].tolist() and data["classes"] == expected["classes"]


def test_a_pretraining_checkpoint_with_tokenizer_prints_token_accuracy_and_draws_the_reconstruction(
        tokenized_pretrain_run, vq_tokenizer_file, images, tmp_path, capsys):
    square = images[1]
    out, record = tmp_path / "tokens", tmp_path / "tokens.json"
    printed = run(capsys, square, "--model", tokenized_pretrain_run, "--tokenizer", vq_tokenizer_file, "--seed", "2",
                  "--out", out, "--json", record)
    expected = mcbeit.inference_model(tokenized_pretrain_run, square, tokenizer=str(vq_tokenizer_file), seed=2,
                                      device="cpu")
    assert printed.splitlines()[0].startswith("pretrain beit_tiny_patch16_224_8k_vocab (")
    assert f"  masked patches: {int(expected['mask'].sum())} of 16\n" in printed
    assert f"  token accuracy on the masked patches: {expected['token_accuracy']:.3f}\n" in printed
    assert f"  predicted tokens (first row): {' '.join(map(str, expected['pred_tokens'][0]))}\n" in printed
    # the view | masked | predicted tokens | the tokenizer's | its reconstruction, each 64 px high, 4 px apart
    assert picture(out / "square.png").shape == (64, 5 * 64 + 4 * 4, 3)
    data = json.loads(record.read_text())
    assert data["kind"] == "pretrain"
    got = data["results"][0]
    assert set(got) == {"image", "mask", "pred_tokens", "target_tokens", "token_accuracy"}
    for key in ("mask", "pred_tokens", "target_tokens"):
        np.testing.assert_array_equal(np.array(got[key]), expected[key], err_msg=key)
    assert got["token_accuracy"] == pytest.approx(expected["token_accuracy"], abs=1e-6)


def test_errors_are_one_line_naming_the_command(finetuned_run, pretrained_checkpoint, vq_tokenizer_file, images,
                                                tmp_path):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as caught:
            predict.main([*map(str, argv), "--device", "cpu"])
        message = str(caught.value.code)
        assert message.startswith("mcbeit-predict: ") and "\n" not in message
        return message

    assert re.search(r"image .*missing\.jpg does not exist", fails(images[0], tmp_path / "missing.jpg", "--model",
                                                                     finetuned_run))
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    assert re.search(r"--out .*not_a_folder is a file", fails(*images, "--model", finetuned_run, "--out", a_file))
    assert a_file.read_text() == ""
    assert "--batch_size 0" in fails(*images, "--model", finetuned_run, "--batch_size", "0")
    assert "the model predicts 8192" in fails(images[1], "--model", pretrained_checkpoint, "--tokenizer",
                                              vq_tokenizer_file)
    fails(images[0], "--model", tmp_path / "no_such_run")
    with pytest.raises(SystemExit) as caught:  # argparse: --model is required
        predict.main([str(images[0])])
    assert caught.value.code == 2


def test_the_console_script_prints_its_help(tmp_path):
    exe = shutil.which("mcbeit-predict")
    assert exe is not None, "mcbeit-predict is not installed: pip install -e ."
    proc = subprocess.run([exe, "--help"], cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mcbeit-predict")
    for flag in ("--model", "--out", "--json", "--tokenizer", "--score_threshold", "--topk"):
        assert flag in proc.stdout
