"""`mcbeit-knn` (issue 15, second step): the k-NN / linear-probe measurement on any checkpoint, checked
against the library functions called directly; released files; random init; clear errors."""
import json

import pytest
import torch

from mcbeit.cli.knn import main
from mcbeit.data.classification_transforms import build_classification_transform
from mcbeit.data.datasets import build_classification_dataset
from mcbeit.data.samplers import build_eval_loader
from mcbeit.evaluation.knn import extract, knn_accuracy, linear_probe_accuracy
from mcbeit.models.export import load_for_export
from tests.models.test_export import MIM_NAME, make_pretrained
from tests.tasks.conftest import PYTHON, make_image_folder, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The seeds' layout root: train/ and val/ of class folders."""
    root = tmp_path_factory.mktemp("knn_data")
    make_image_folder(root / "train", n_per_class=6, size=72, seed=1)
    make_image_folder(root / "val", n_per_class=3, size=72, seed=2)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model = make_pretrained(tmp_path_factory.mktemp("knn_ckpt") / "pt.pth", input_size=SIZE)
    return path, model


def flat(d, prefix=""):
    """Nested {key: {...: number}} -> {"key/...": number} (pytest.approx compares flat mappings)."""
    out = {}
    for key, value in d.items():
        out.update(flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _direct(path, data, block, ks, model_name=None):
    """The same measurement with the library functions, independently of the command."""
    exp = load_for_export(path, overrides={"model": model_name})
    cfg = exp.data_config
    transform = build_classification_transform(False, SIZE, mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"])
    feats = []
    for split in ("train", "val"):
        ds = build_classification_dataset(data, "IMNET", split, transform)
        feats.append(extract(exp.model, build_eval_loader(ds, 5, 0, False), torch.device("cpu"), block=block))
    (tf, tl), (vf, vl) = feats
    knn = {key: {str(k): knn_accuracy(tf[key], tl, vf[key], vl, 4, k=k, temperature=0.07) for k in ks} for key in tf}
    linear = {key: linear_probe_accuracy(tf[key], tl, vf[key], vl, 4, seed=0) for key in tf}
    return knn, linear


def test_project_checkpoint_prints_and_writes_what_the_library_computes(checkpoint, data, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "res" / "knn.json"
    assert main(["--resume", str(path), "--data_path", str(data), "--nb_knn", "5", "20", "--block", "1",
                 "--eval_linear", "--num_workers", "0", "--batch_size", "7", "--device", "cpu",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["knn.json"]  # no temporary file left
    assert (res["num_train"], res["num_val"], res["num_classes"], res["input_size"]) == (24, 12, 4, SIZE)
    assert set(res["knn"]) == {"cls", "patch_mean", "cls@1", "patch_mean@1"}
    knn, linear = _direct(path, data, 1, (5, 20))
    assert flat(res["knn"]) == pytest.approx(flat(knn)) and flat(res["linear"]) == pytest.approx(flat(linear))
    for acc in [a for by_k in res["knn"].values() for a in by_k.values()] + list(res["linear"].values()):
        assert 0 <= acc["top1"] <= acc["top5"] <= 100
    for key in res["knn"]:
        assert f"{res['knn'][key]['20']['top1']:.2f}" in printed
    assert "k-NN k=5" in printed and "linear" in printed and "patch_mean@1" in printed


def test_released_plain_state_dict_with_model(checkpoint, data, tmp_path, capsys):
    path, model = checkpoint
    released = tmp_path / "released.pth"
    torch.save(model.state_dict(), released)  # the released files' keys, no args
    assert main(["--resume", str(released), "--model", MIM_NAME, "--data_path", str(data / "train"),
                 "--eval_data_path", str(data / "val"), "--num_workers", "0", "--output", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    knn, _ = _direct(path, data, None, (20,))  # the same weights as the project checkpoint
    assert flat(res["knn"]) == pytest.approx(flat(knn)) and "linear" not in res
    assert "k-NN k=20" in capsys.readouterr().out


def test_random_init_model_is_the_baseline(data, tmp_path):
    """As a console script, on class folders whose val split is the sibling folder."""
    proc = run_cli(["mcbeit-knn", "--model", MIM_NAME, "--input_size", str(SIZE), "--data_path", str(data / "train"),
                    "--num_workers", "0", "--output", str(tmp_path / "b.json")], tmp_path)
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["resume"] is None and res["model"].startswith("random init") and res["num_val"] == 12
    assert 0 <= res["knn"]["cls"]["20"]["top1"] <= 100
    assert "random init" in proc.stdout


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("not_a_model", "no state dict found"),
    ("other_tensors", "holds no BEiT weights"),
    ("no_images", "no images found"),
    ("no_val", "pass --eval_data_path"),
    ("nothing", "pass --resume CKPT"),
])
def test_bad_input_is_one_line_and_status_1(case, match, checkpoint, data, tmp_path):
    path, _ = checkpoint
    args = ["--resume", str(path), "--data_path", str(data), "--num_workers", "0"]
    if case == "missing":
        args[1] = str(tmp_path / "nope.pth")
    elif case == "not_a_model":
        torch.save({"optimizer": {"lr": torch.ones(1)}}, tmp_path / "opt.pth")
        args[1:2] = [str(tmp_path / "opt.pth"), "--model", MIM_NAME]
    elif case == "other_tensors":
        torch.save({"model": {"encoder.weight": torch.ones(2)}}, tmp_path / "other.pth")
        args[1:2] = [str(tmp_path / "other.pth"), "--model", MIM_NAME]
    elif case == "no_images":
        (tmp_path / "empty" / "a").mkdir(parents=True)
        args[3] = str(tmp_path / "empty")
    elif case == "no_val":
        make_image_folder(tmp_path / "lonely", n_per_class=1, size=32)
        args[3] = str(tmp_path / "lonely")
    else:
        args = ["--data_path", str(data)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    message = str(exc.value.code)
    assert message.startswith("mcbeit-knn: ") and match in message and "\n" not in message


def test_help_runs_as_python_m(tmp_path):
    proc = run_cli([PYTHON, "-m", "mcbeit.cli.knn", "--help"], tmp_path)
    assert "--nb_knn" in proc.stdout and "--eval_linear" in proc.stdout
