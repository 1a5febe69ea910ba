"""`mcbeit-export`: the printed calls load the export; EMA; clear errors; runs as `python -m`."""
import pytest
import timm
import torch
from safetensors.torch import load_file

from mcbeit.cli.export import main
from tests.models.test_export import CLS_NAME, LABELS, images, make_finetuned, make_pretrained
from tests.tasks.conftest import PYTHON, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def printed_calls(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.strip().startswith("timm.create_model(")]


def test_export_finetuned_with_hf_prints_calls_that_load_it(tmp_path, capsys):
    pytest.importorskip("transformers")
    path, model, _ = make_finetuned(tmp_path / "ft.pth", input_size=160, classes=LABELS)
    assert main([str(path), "--output", str(tmp_path / "out"), "--hf"]) == 0
    out = capsys.readouterr().out
    calls = printed_calls(out)
    assert len(calls) == 2 and calls[0].startswith("timm.create_model('local-dir:")
    x = images(160)
    with torch.inference_mode():
        ref = model(x)  # (2,10)
        for call in calls:  # exactly as printed
            assert (eval(call, {"timm": timm}).eval()(x) - ref).abs().max() < 1e-4, call
    assert "transformers.BeitForImageClassification.from_pretrained(" in out
    assert "import timm, mcbeit.models" in out  # the tiny size is registered by mcbeit
    assert "verified on random images" in out and "transformers" in out.split("verified")[1]
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()
    assert ("class names (10): tabby cat, goldfish, Zebra, space shuttle, ångström and 5 more: label_names in "
            "config.json, id2label in hf/config.json") in out


def test_use_ema_and_overwrite(tmp_path, capsys):
    path, model, ema = make_finetuned(tmp_path / "ft.pth")
    out = tmp_path / "out"
    assert main([str(path), "--output", str(out), "--no_verify"]) == 0
    assert "no class names exported (the checkpoint names none)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds an export: pass --overwrite"):
        main([str(path), "--output", str(out), "--use_ema"])
    assert main([str(path), "--output", str(out), "--use_ema", "--overwrite", "--no_verify"]) == 0
    assert torch.equal(load_file(out / "model.safetensors")["head.weight"], ema.state_dict()["head.weight"])


@pytest.mark.parametrize("case, extra, match", [
    ("missing", [], "does not exist"),
    ("no_args", [], "has no args naming its model: pass --model"),
    ("no_args", ["--model", "vit_base_patch16_224"], "not a BEiT model timm knows"),
    ("pretrained", ["--use_ema"], "holds no model_ema"),
])
def test_errors_say_what_to_do(tmp_path, case, extra, match):
    path = tmp_path / "ckpt.pth"
    if case != "missing":
        make_pretrained(path, with_args=case != "no_args")
    with pytest.raises(SystemExit, match=match):
        main([str(path), "--output", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()  # nothing written


def test_python_m_exports_a_pretrained_backbone(tmp_path):
    path, _ = make_pretrained(tmp_path / "pt.pth")
    proc = run_cli([PYTHON, "-m", "mcbeit.cli.export", str(path), "--output", str(tmp_path / "out")], tmp_path)
    assert f"exported the pre-trained {CLS_NAME}" in proc.stdout
    assert "local-dir:" in proc.stdout and "verified on random images" in proc.stdout
    assert (tmp_path / "out" / "config.json").is_file()
