"""mcbeit-seg's configuration: the seeds' config names as presets, mmseg's --options syntax, the seeds' argument
spellings (tools/train.py, tools/test.py), and the derived iteration counts."""
import pytest

from mcbeit.cli.segmentation import get_args_parser
from mcbeit.config.fields import resolve
from mcbeit.config.presets import option_value
from mcbeit.config.segmentation import PRESETS, SegmentationConfig, parse_options, read_config_file
from mcbeit.errors import ConfigError, InputError

SEED_CONFIG = "configs/mcbeit/upernet/upernet_mcbeit_base_12_512_slide_160k_ade20k_pt"


def _config(argv, command="train"):
    from mcbeit.cli.common import to_config

    return to_config(get_args_parser(command).parse_args(argv))


def test_mmcv_dictaction_values():
    assert option_value("8e-5") == 8e-5 and isinstance(option_value("3"), int)
    assert option_value("True") is True and option_value("false") is False
    assert option_value("None") == "None"                                     # mmcv keeps it a string
    assert option_value("1,2") == [1, 2] and option_value("[3,5,7,11]") == [3, 5, 7, 11]
    assert option_value("(0.9,0.999)") == (0.9, 0.999) and option_value("'/a/b.pth'") == "/a/b.pth"


def test_options_map_mmseg_keys_and_refuse_unknown_ones():
    assert parse_options(("model.pretrained=/x.pth", "optimizer.lr=1e-4", "data.samples_per_gpu=4",
                          "model.backbone.out_indices=[3,5,7,11]")) == {
        "pretrained": "/x.pth", "lr": 1e-4, "batch_size": 4, "out_indices": (3, 5, 7, 11)}
    with pytest.raises(ConfigError, match="model.neck.foo: not a key"):
        parse_options(("model.neck.foo=1",))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_options(("model.pretrained",))


def test_the_seed_command_line_from_semantic_segmentation(monkeypatch, tmp_path):
    """tools/train.py's arguments as dist_train.sh passes them, from the semantic_segmentation folder (the seed's
    config path without .py): mc-BEiT's recipe, the checkpoint as the backbone's weights."""
    import pathlib

    monkeypatch.chdir(pathlib.Path(__file__).parents[2] / "semantic_segmentation")
    cfg = _config([SEED_CONFIG, "--launcher", "pytorch", "--work-dir", str(tmp_path), "--seed", "0",
                   "--deterministic", "--options", "model.pretrained=/ckpt/checkpoint-799.pth", "--data_path",
                   str(tmp_path)])
    assert (cfg.config, cfg.output_dir, cfg.deterministic, cfg.pretrained) == (
        SEED_CONFIG, str(tmp_path), True, "/ckpt/checkpoint-799.pth")
    assert (cfg.model, cfg.lr, cfg.layer_decay, cfg.drop_path, cfg.crop_size, cfg.batch_size, cfg.max_iters) == (
        "beit_base_patch16_224", 8e-5, 0.9, 0.1, 512, 2, 160000)
    assert (cfg.eval_interval, cfg.epochs, cfg.save_ckpt_freq, cfg.stride_or_default) == (16000, 10, 1, 341)
    assert (cfg.warmup_iters, cfg.warmup_ratio, cfg.power, cfg.weight_decay, cfg.opt_betas) == (
        1500, 1e-6, 1.0, 0.05, (0.9, 0.999))


def test_every_preset_has_its_file_and_the_recipes_differ_where_the_originals_do():
    import pathlib

    root = pathlib.Path(__file__).parents[2] / "semantic_segmentation" / "configs"
    files = {p.stem: p for p in root.rglob("*.py")}
    assert set(files) == set(PRESETS)
    for name, path in files.items():
        assert read_config_file(str(path))[1] == PRESETS[name]
        assert read_config_file(str(path)[:-3])[0] == name                   # without .py, as the seed writes it
    assert (PRESETS["upernet_beit_base_12_512_slide_160k_ade20k_pt"]["lr"],
            PRESETS["upernet_beit_base_12_512_slide_160k_ade20k_pt"]["layer_decay"]) == (7e-4, 0.65)
    large640 = PRESETS["upernet_beit_large_24_640_slide_160k_ade20k_pt2ft"]
    assert (large640["crop_size"], large640["batch_size"], large640["update_freq"], large640["layer_decay"]) == (
        640, 1, 2, 0.95)
    assert PRESETS["upernet_beit_base_12_512_slide_160k_21ktoade20k"]["layer_decay"] == 0.85


def test_a_config_file_can_override_its_preset_and_flags_override_both(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text('preset = "upernet_beit_base_12_512_slide_160k_ade20k_pt"\n'
                    'options = {"optimizer.lr": 1e-4, "data_root": "/data/ade"}\n')
    cfg = _config([str(path), "--layer_decay", "0.8"])
    assert (cfg.lr, cfg.layer_decay, cfg.data_path) == (1e-4, 0.8, "/data/ade")
    with pytest.raises(InputError, match="neither a file nor one of the presets"):
        read_config_file("configs/nowhere/upernet_unknown")


def test_test_command_reads_config_checkpoint_and_eval_miou(tmp_path):
    cfg = _config(["upernet_beit_base_12_640_slide_160k_ade20k_ms", str(tmp_path / "iter.pth"), "--eval", "mIoU",
                   "--data_path", str(tmp_path)], "test")
    assert (cfg.eval, cfg.load_from, cfg.auto_resume, cfg.aug_test, cfg.crop_size, cfg.stride_or_default) == (
        True, str(tmp_path / "iter.pth"), False, True, 640, 426)
    with pytest.raises(SystemExit):
        get_args_parser("test").parse_args(["upernet_beit_base_12_512_slide_160k_ade20k_pt", "x.pth", "--eval",
                                            "mDice"])


def test_iterations_must_divide_into_rounds():
    with pytest.raises(ConfigError, match="not a multiple of --eval_interval"):
        resolve(SegmentationConfig, {"max_iters": 250, "eval_interval": 100})
    cfg = resolve(SegmentationConfig, {"max_iters": 50, "eval_interval": 100, "checkpoint_interval": 100})
    assert (cfg.eval_interval, cfg.epochs) == (50, 1)                         # a run shorter than one interval
