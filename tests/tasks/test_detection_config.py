"""mcbeit-det's configuration: the seed's config names as presets, detectron2's KEY=VALUE overrides and
lazyconfig_train_net.py's arguments, the derived batch and iteration counts."""
import pathlib
import sys

import pytest

from mcbeit.cli.detection import get_args_parser, launcher_command, lazyconfig_parser
from mcbeit.config.detection import PRESETS, parse_overrides, read_config_file
from mcbeit.errors import ConfigError, InputError

MIMDET = pathlib.Path(__file__).parents[2] / "mimdet"
SEED_CONFIG = "configs/benchmarking/benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit.py"


def _config(argv, command="train"):
    from mcbeit.cli.common import to_config

    return to_config(get_args_parser(command).parse_args(argv))


def test_overrides_map_lazyconfig_keys_and_refuse_unknown_ones():
    assert parse_overrides(("train.init_checkpoint=/x.pth", "optimizer.lr=1e-4", "train.max_iter=90",
                            "dataloader.train.total_batch_size=16", "train.amp.enabled=False",
                            "model.backbone.bottom_up.with_cp=True")) == {
        "init_checkpoint": "/x.pth", "lr": 1e-4, "max_iter": 90, "total_batch_size": 16, "amp": "off",
        "grad_checkpointing": True}
    with pytest.raises(ConfigError, match="model.roi_heads.foo: not a config key"):
        parse_overrides(("model.roi_heads.foo=1",))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(("train.init_checkpoint",))


def test_the_seed_config_from_the_mimdet_folder_carries_the_benchmark_recipe(monkeypatch, tmp_path):
    """The seed's --config-file path from mimdet/: 25 epochs of batch 64 (46093 iterations), AdamW 8e-5 / 0.1, 1 %
    warm-up from 0.001, window 16, drop path 0.1, layer scale 0.1, the shared relative tables; the file's own
    pretrained path (relative, as the seed's)."""
    monkeypatch.chdir(MIMDET)
    monkeypatch.setenv("WORLD_SIZE", "32")  # 8 GPUs x 4 machines: 2 images per process
    cfg = _config(["--config-file", SEED_CONFIG, "--data_path", str(tmp_path)])
    assert (cfg.max_iter, cfg.eval_period, cfg.checkpoint_period, cfg.epochs, cfg.save_ckpt_freq) == (
        46093, 1844, 1844, 25, 1)
    assert (cfg.total_batch_size, cfg.batch_size, cfg.update_freq) == (64, 2, 1)
    assert (cfg.lr, cfg.weight_decay, cfg.opt_betas, cfg.layer_decay, cfg.warmup_length, cfg.warmup_factor) == (
        8e-5, 0.1, (0.9, 0.999), 1.0, 0.01, 0.001)
    assert (cfg.model, cfg.image_size, cfg.window_size, cfg.drop_path, cfg.layer_scale_init_value) == (
        "beit_base_patch16_224", 1024, 16, 0.1, 0.1)
    assert cfg.shared_rel_pos_bias and cfg.pyramid == "benchmarking" and cfg.scale_range == (0.1, 2.0)
    assert cfg.pretrained == "mcbeit_pretrained/checkpoint-799.pth"
    assert cfg.output_dir == "work_dirs/mask_rcnn_base_FPN_25ep_LSJ_mc-beit"
    ft = _config(["--config-file", SEED_CONFIG.replace("LSJ_mc", "LSJ_ft_mc"), "--data_path", str(tmp_path)])
    assert not ft.shared_rel_pos_bias and ft.pretrained == "mcbeit_pretrained/checkpoint-best.pth"


def test_flags_beat_the_config_and_trailing_overrides_beat_both(monkeypatch, tmp_path):
    monkeypatch.chdir(MIMDET)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _config([SEED_CONFIG, "--data_path", str(tmp_path), "--lr", "1e-4", "--update_freq", "4",
                   "train.max_iter=100", "train.eval_period=30", "train.checkpointer.period=60",
                   "model.backbone.bottom_up.pretrained=/ck.pth", "--pretrained", "/ignored.pth"])
    assert cfg.lr == 1e-4 and cfg.pretrained == "/ck.pth"
    assert (cfg.batch_size, cfg.total_batch_size) == (8, 64)        # 64 / 2 processes / 4 accumulation steps
    assert (cfg.max_iter, cfg.eval_period, cfg.epochs, cfg.save_ckpt_freq) == (100, 30, 4, 2)  # 3 x 30 + 10
    with pytest.raises(SystemExit, match="not a multiple of 2 processes"):
        _config([SEED_CONFIG, "--data_path", str(tmp_path), "dataloader.train.total_batch_size=5"])


def test_every_preset_has_its_file_and_bad_configs_say_what_to_do(tmp_path):
    files = {p.stem: p for p in (MIMDET / "configs").rglob("*.py")}
    assert set(files) == set(PRESETS)
    name, values = read_config_file("benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit")  # a bare preset name
    assert name in PRESETS and values["max_iter"] == 46093
    with pytest.raises(InputError, match="neither a file nor one of the presets"):
        read_config_file("configs/benchmarking/mask_rcnn_vit_huge.py")
    with pytest.raises(SystemExit, match="does not divide the 64x64 token grid"):
        _config(["--data_path", str(tmp_path), "--window_size", "12"])


def test_lazyconfig_arguments_start_torchrun_as_detectron2s_launch_would(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a one-process DeepSpeed run leaves behind: not a launched worker
    args, rest = lazyconfig_parser().parse_known_args(
        ["--config-file", SEED_CONFIG, "--num-gpus", "8", "--num-machines", "4", "--machine-rank", "2",
         "--dist-url", "tcp://10.0.0.1:21633", "--resume", "train.max_iter=10"])
    assert rest == ["train.max_iter=10"] and args.resume
    cmd = launcher_command(args, ["--config-file", SEED_CONFIG, *rest], "/x/lazyconfig_train_net.py")
    assert cmd[:3] == [sys.executable, "-m", "mcbeit.launch"]
    assert {"--nproc_per_node=8", "--nnodes=4", "--node_rank=2", "--master_addr=10.0.0.1",
            "--master_port=21633"} <= set(cmd)
    assert cmd[-4:] == ["/x/lazyconfig_train_net.py", "--config-file", SEED_CONFIG, "train.max_iter=10"]
    one, _ = lazyconfig_parser().parse_known_args(["--num-gpus", "1"])
    assert launcher_command(one, [], "x") is None                   # one process: no launcher
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")                # a worker torchrun started: runs, not relaunches
    assert launcher_command(args, [], "x") is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    many, _ = lazyconfig_parser().parse_known_args(["--num-gpus", "2", "--num-machines", "2"])
    with pytest.raises(SystemExit, match="auto works on one machine only"):
        launcher_command(many, [], "x")
