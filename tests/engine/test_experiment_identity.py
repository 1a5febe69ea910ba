"""A run resumes only its own experiment (issue 14, cases 4 and 5).

End to end: real runs of `mcbeit-pretrain` on a real image folder (16 images, batch 8: 2 steps per
epoch, each run a few seconds), then reruns on the same --output_dir with other flags. Unit tests
hold the comparison (:mod:`mcbeit.engine.identity`) to the many kinds of flags.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from mcbeit.cli import pretrain
from mcbeit.config import as_flags
from mcbeit.config.fields import experiment_flags, resolve
from mcbeit.config.finetune import FinetuneConfig, LinprobeConfig
from mcbeit.config.pretrain import BeitPretrainConfig, PretrainConfig
from mcbeit.config.run import RunConfig
from mcbeit.config.tokenizer import TokenizerTrainConfig
from mcbeit.engine.identity import CHECKPOINT_KEY, check_experiment, differences, prepare_fresh_start
from mcbeit.errors import ConfigError, InputError
from tests.tasks.conftest import FAST, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two real image folders (16 images each, 4 classes): the data and 'another dataset'."""
    root = tmp_path_factory.mktemp("identity")
    return (make_image_folder(root / "a", n_per_class=4, size=64, seed=0),
            make_image_folder(root / "b", n_per_class=4, size=64, seed=1))


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--output_dir", str(out), "--device", "cpu", *FAST, "--batch_size", "8",
            "--warmup_epochs", "0", "--save_ckpt_freq", "1", "--epochs", "1", *extra]


def _run(data: Path, out: Path, *extra: str) -> int:
    return pretrain.main(_argv(data, out, *extra))


def _refused(data: Path, out: Path, *extra: str) -> str:
    """The message of a run that stops with exit status 1 (SystemExit with a message is status 1)."""
    with pytest.raises(SystemExit) as stop:
        _run(data, out, *extra)
    assert isinstance(stop.value.code, str), stop.value.code
    return stop.value.code


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file a run takes and releases aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".mcbeit")}


# ------------------------------------------------------------------------------------ real runs

def test_a_rerun_with_other_experiment_flags_stops_naming_each_and_changes_nothing(folders, tmp_path):
    data, other = folders
    out = tmp_path / "out"
    assert _run(data, out) == 0
    before = _snapshot(out)
    assert {"checkpoint-0.pth", "log.txt"} <= set(before)

    message = _refused(other, out, "--lr", "1e-3", "--batch_size", "4", "--mask_type", "random", "--omega", "0.5")
    assert f"auto-resume: {out / 'checkpoint-0.pth'}" in message and "another experiment" in message
    for line in (f"--data_path: {data} in the checkpoint, {other} in this run",
                 "--lr: 0.0005 in the checkpoint, 0.001 in this run",
                 "--batch_size (the total batch): 8 (--batch_size 8 x 1 process) in the checkpoint, "
                 "4 (--batch_size 4 x 1 process) in this run",
                 "--mask_type: block in the checkpoint, random in this run",
                 "--omega: 0.2 in the checkpoint, 0.5 in this run"):
        assert line in message, message
    # how to go on: another folder, accept the change, resume explicitly, or start over
    assert "--accept_changed_flags batch_size lr data_path mask_type omega" in message, message
    assert "another --output_dir" in message and f"--resume {out / 'checkpoint-0.pth'}" in message
    assert "--start_over" in message
    assert _snapshot(out) == before  # checkpoints byte-identical, log.txt and tensorboard/ unchanged


def test_run_flags_may_differ_and_a_finished_run_says_how_to_extend_it(folders, tmp_path, capfd):
    data, _ = folders
    out = tmp_path / "out"
    assert _run(data, out) == 0
    capfd.readouterr()
    assert _run(data, out, "--num_workers", "1", "--print_freq", "1", "--save_ckpt_steps", "7") == 0
    text = capfd.readouterr().err
    assert f"resumed from {out / 'checkpoint-0.pth'}" in text
    assert "nothing to do" in text and "--epochs N --accept_changed_flags epochs" in text


def test_accepting_changed_flags_resumes_and_logs_them(folders, tmp_path, capfd):
    data, _ = folders
    out = tmp_path / "out"
    assert _run(data, out) == 0
    message = _refused(data, out, "--epochs", "2", "--lr", "1e-3")
    assert "--epochs: 1 in the checkpoint, 2 in this run" in message and "--accept_changed_flags epochs lr" in message
    # accepting only one of the two is not enough, and says which is left
    assert "--accept_changed_flags lr" in _refused(data, out, "--epochs", "2", "--lr", "1e-3",
                                                   "--accept_changed_flags", "epochs")
    capfd.readouterr()
    assert _run(data, out, "--epochs", "2", "--lr", "1e-3", "--accept_changed_flags", "epochs", "lr") == 0
    err = capfd.readouterr().err
    assert "resuming" in err and "with changed flags (--accept_changed_flags epochs lr)" in err
    assert "--lr: 0.0005 in the checkpoint, 0.001 in this run" in err
    assert f"resumed from {out / 'checkpoint-0.pth'}: continuing at epoch 1" in err
    resumed = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert resumed["args"]["lr"] == 1e-3 and resumed["args"]["epochs"] == 2  # the next rerun compares these
    assert _run(data, out, "--epochs", "2", "--lr", "1e-3") == 0
    assert _refused(data, out, "--epochs", "2", "--lr", "1e-3", "--accept_changed_flags", "num_workers").startswith(
        "--accept_changed_flags num_workers: --num_workers may differ anyway")


def test_explicit_resume_with_other_flags_warns_and_runs(folders, tmp_path, capfd):
    data, _ = folders
    first, second = tmp_path / "first", tmp_path / "second"
    assert _run(data, first) == 0
    capfd.readouterr()
    assert _run(data, second, "--resume", str(first / "checkpoint-0.pth"), "--epochs", "2", "--omega", "0.5") == 0
    err = capfd.readouterr().err
    assert f"--resume {first / 'checkpoint-0.pth'} was written with other flags" in err
    assert "--omega: 0.2 in the checkpoint, 0.5 in this run" in err
    assert (second / "checkpoint-1.pth").is_file()


def test_no_auto_resume_refuses_a_folder_with_checkpoints_and_start_over_moves_them_aside(folders, tmp_path, capfd):
    data, other = folders
    out = tmp_path / "out"
    assert _run(data, out, "--epochs", "2") == 0           # the earlier run: checkpoint-0.pth and checkpoint-1.pth
    before = _snapshot(out)
    message = _refused(other, out, "--no_auto_resume")
    assert message.startswith(f"--no_auto_resume: --output_dir {out} holds checkpoints of an earlier run "
                              "(checkpoint-0.pth, checkpoint-1.pth)") and "--start_over" in message
    assert _snapshot(out) == before

    capfd.readouterr()
    assert _run(other, out, "--no_auto_resume", "--start_over") == 0      # another experiment, 1 epoch
    err = capfd.readouterr().err
    (aside,) = out.glob("replaced-*")
    assert f"--start_over: moved the earlier run's checkpoint-0.pth, checkpoint-1.pth, log.txt, tensorboard into " \
           f"{aside}/" in err
    assert "resumed from" not in err
    assert _snapshot(aside) == before                      # nothing written is lost
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0.pth"]
    assert torch.load(out / "checkpoint-0.pth", weights_only=True)["args"]["data_path"] == str(other)
    assert len((out / "log.txt").read_text().splitlines()) == 1

    capfd.readouterr()                                      # the next run continues the new run, not the old one
    assert _run(other, out) == 0
    err = capfd.readouterr().err
    assert f"resumed from {out / 'checkpoint-0.pth'}" in err and "nothing to do" in err


def test_pretraining_with_a_tokenizer_in_the_no_argument_runs_folder_says_the_tokenizer_flags_differ(folders,
                                                                                                      tmp_path):
    """Case 5: a run with a trained tokenizer on the folder of a run with the random one (vocabulary 8192
    there, 64 here: another prediction head)."""
    from mcbeit.tokenizers.custom import CustomTokenizer, save_custom_tokenizer

    data, _ = folders
    out, tokenizer = tmp_path / "out", tmp_path / "tokenizer.pth"
    save_custom_tokenizer(CustomTokenizer(image_size=32, vocab_size=64, n_hid=8, n_blk_per_group=1,
                                          cosine_scale=10.0), tokenizer)
    assert _run(data, out) == 0
    with_tokenizer = ("--discrete_vae_type", "customized", "--discrete_vae_weight_path", str(tokenizer))
    message = _refused(data, out, *with_tokenizer)
    assert f"--discrete_vae_weight_path: none in the checkpoint, {tokenizer} in this run" in message
    # resumed explicitly, the weights do not fit: the message names the flag, never "flags equal"
    message = _refused(data, tmp_path / "elsewhere", *with_tokenizer, "--resume", str(out / "checkpoint-0.pth"))
    assert f"it was written with --discrete_vae_weight_path none (this run: {tokenizer})" in message
    assert "equal this run's" not in message


# ------------------------------------------------------------------------------------ the comparison

def test_which_flags_define_the_experiment_is_declared_once_for_every_command():
    run_flags = {"save_ckpt_freq", "output_dir", "log_dir", "device", "resume", "auto_resume", "accept_changed_flags",
                 "start_over", "save_ckpt_steps", "save_ckpt_minutes", "keep_last", "start_epoch", "num_workers",
                 "pin_mem", "amp", "print_freq", "max_bad_fraction", "max_bad_steps", "debug", "world_size",
                 "local_rank", "dist_on_itp", "dist_url", "dist_timeout"}
    # a new flag of the run group must be classified: here, or with flag(..., experiment=False)
    assert set(experiment_flags(RunConfig)) == {"epochs", "batch_size", "seed"}
    for cls in (PretrainConfig, BeitPretrainConfig, TokenizerTrainConfig, FinetuneConfig, LinprobeConfig):
        defining = set(experiment_flags(cls))
        assert not defining & run_flags, cls  # re-declared defaults (output_dir per command) stay run flags
        assert {"epochs", "batch_size", "seed", "lr", "data_path"} <= defining, cls
    assert {"model", "mask_type", "omega", "discrete_vae_weight_path", "drop_path"} <= set(
        experiment_flags(PretrainConfig))
    assert not {"compile", "recompute", "warmup_lr", "no_loss_masked"} & set(experiment_flags(PretrainConfig))
    assert {"vocab_size", "hidden"} <= set(experiment_flags(TokenizerTrainConfig))
    assert "image_freq" not in experiment_flags(TokenizerTrainConfig)
    assert {"finetune", "nb_classes", "layer_decay", "update_freq", "model_ema"} <= set(
        experiment_flags(FinetuneConfig))
    assert not {"enable_deepspeed", "zero_stage", "eval", "dist_eval", "save_ckpt"} & set(
        experiment_flags(FinetuneConfig))


def _differ(written: dict, now: dict, names=None) -> list[str]:
    names = names or sorted((set(written) | set(now)) - {"world_size"})  # world_size: a run flag (set by the launcher)
    return [str(d) for d in differences(written, now, names)]


@pytest.mark.parametrize("written, now, expected", [
    ({"lr": 5e-4}, {"lr": 1e-3}, ["--lr: 0.0005 in the checkpoint, 0.001 in this run"]),
    ({"lr": 1}, {"lr": 1.0}, []),                                            # int and float alike
    ({"opt_betas": [0.9, 0.98]}, {"opt_betas": (0.9, 0.98)}, []),            # list (stored) and tuple (flag)
    ({"opt_betas": [0.9, 0.98]}, {"opt_betas": [0.9, 0.999]},
     ["--opt_betas: 0.9 0.98 in the checkpoint, 0.9 0.999 in this run"]),
    ({"clip_grad": None}, {"clip_grad": 3.0}, ["--clip_grad: none in the checkpoint, 3.0 in this run"]),
    ({"hard_targets": False}, {"hard_targets": True}, ["--hard_targets: False in the checkpoint, True in this run"]),
    ({"finetune": ""}, {"finetune": "x.pth"}, ["--finetune: '' in the checkpoint, x.pth in this run"]),
    ({"data_path": "data"}, {"data_path": str(Path("data").resolve())}, []),  # one folder, two spellings
    ({"data_path": "/a"}, {"data_path": "/b"}, ["--data_path: /a in the checkpoint, /b in this run"]),
    ({"omega": 0.2}, {}, []),                                                # a flag of another version
    # the batch is the total batch: the same total over another number of processes is the same experiment
    ({"batch_size": 8, "world_size": 1}, {"batch_size": 4, "world_size": 2}, []),
    ({"batch_size": 8, "world_size": 2, "update_freq": 1}, {"batch_size": 4, "world_size": 2, "update_freq": 2}, []),
    ({"batch_size": 8, "world_size": 1}, {"batch_size": 8, "world_size": 2},
     ["--batch_size (the total batch): 8 (--batch_size 8 x 1 process) in the checkpoint, 16 (--batch_size 8 x 2 "
      "processes) in this run"]),
    ({"batch_size": 8, "update_freq": 1}, {"batch_size": 8, "update_freq": 4},
     ["--batch_size (the total batch): 8 (--batch_size 8 x 1 process) in the checkpoint, 32 (--batch_size 8 x 1 "
      "process x --update_freq 4) in this run"]),
])
def test_differences_of_each_kind_of_flag(written, now, expected):
    assert _differ(written, now) == expected


def test_resolved_values_are_compared_embedded_defaults_included():
    """The embedded demonstration's batch is 32: `--batch_size 32` there is the same run, and with
    --data_path the default (64) is another."""
    names = experiment_flags(PretrainConfig)
    embedded, given = (as_flags(resolve(PretrainConfig, g)) for g in ({}, {"batch_size": 32}))
    assert differences(embedded, given, names) == []
    real = as_flags(resolve(PretrainConfig, {"data_path": "/data"}))
    assert {d.name for d in differences(embedded, real, names)} >= {"data_path", "batch_size", "epochs", "input_size"}


def _ckpt(**args) -> dict:
    return {"args": {"lr": 5e-4, "epochs": 1, "num_workers": 0, **args}, CHECKPOINT_KEY: ["lr", "epochs"]}


def test_check_experiment_refuses_accepts_and_warns(caplog):
    names = ("lr", "epochs", "omega")
    now = {"lr": 1e-3, "epochs": 2, "num_workers": 8, "omega": 0.5}
    with pytest.raises(InputError) as stop:
        check_experiment(_ckpt(), "/o/checkpoint-0.pth", now, names, explicit=False, output_dir="/o")
    text = str(stop.value)
    assert "2 flags differ" in text and "--accept_changed_flags lr epochs" in text
    assert "num_workers" not in text and "omega" not in text  # a run flag; a flag the checkpoint does not define
    with caplog.at_level(logging.WARNING, logger="mcbeit"):
        assert len(check_experiment(_ckpt(), "p", now, names, explicit=False, accepted=("all",))) == 2
        assert "--accept_changed_flags all" in caplog.text
        check_experiment(_ckpt(), "p", now, names, explicit=False, accepted=("--lr", "epochs"))
        assert len(check_experiment(_ckpt(), "p", now, names, explicit=True)) == 2
        assert "--resume p was written with other flags" in caplog.text
    with caplog.at_level(logging.INFO, logger="mcbeit"):  # earlier versions and released files: nothing to compare
        assert check_experiment({"args": {"lr": 1.0}}, "old.pth", now, names, explicit=False) == []
        assert check_experiment({"model": {}}, "released.pth", now, names, explicit=False) == []
    assert "old.pth does not record which flags define its experiment" in caplog.text
    assert "released.pth does not record" in caplog.text


def test_accept_changed_flags_names_are_checked():
    base = {"data_path": "/d"}
    resolve(PretrainConfig, {**base, "accept_changed_flags": ("lr", "all", "--epochs")})
    with pytest.raises(ConfigError, match="--num_workers may differ anyway"):
        resolve(PretrainConfig, {**base, "accept_changed_flags": ("num_workers",)})
    with pytest.raises(ConfigError, match="--nonsense is no flag of this command"):
        resolve(PretrainConfig, {**base, "accept_changed_flags": ("nonsense",)})
    assert "accept_changed_flags" in {f.name for f in dataclasses.fields(TokenizerTrainConfig)}
    assert "--accept_changed_flags" in pretrain.get_args_parser().format_help()
    assert "--start_over" in pretrain.get_args_parser().format_help()


def test_start_over_refuses_a_resume_file_it_would_move(tmp_path):
    (tmp_path / "checkpoint-3.pth").write_bytes(b"x")
    with pytest.raises(InputError, match="lies among the files --start_over moves aside"):
        prepare_fresh_start(str(tmp_path), auto_resume=True, resume=str(tmp_path / "checkpoint-3.pth"),
                            start_over=True, is_main=True)
    assert (tmp_path / "checkpoint-3.pth").read_bytes() == b"x"
