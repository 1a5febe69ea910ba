"""Untrusted files: every place a command reads a checkpoint or weights refuses a hostile pickle
without running it.

The payload's ``__reduce__`` makes unpickling call ``os.mkdir(marker)``: a side effect that is only
ever produced by loading (``torch.save`` merely records the call). Each hostile file goes through a
real entry point (the commands' ``main`` in-process, and two console commands as subprocesses),
in the serialisations users meet: ``torch.save``'s zip format, its legacy format, and a bare
``pickle.dump``. Each case checks that the command fails with a message saying why, and that the
marker was never created. ``test_the_payload_runs_when_unpickled_in_full`` shows the marker test is
not vacuous: unpickled without a restricted unpickler, each file does create the marker.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mcbeit.cli import pretrain
from mcbeit.cli import finetune
from mcbeit.cli import export
from mcbeit.cli import tokenizer as tok_task
from tests.tasks.conftest import FAST as PRETRAIN_FAST
from tests.tasks.conftest import PYTHON, REPO, cli_env

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]  # the bare pickle.dump files

FORMATS = ("zip", "legacy", "pickle")
MARKER = "PAYLOAD_RAN"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickled, this calls ``os.mkdir(marker)``; pickled, it only names that call."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_hostile(path: Path, fmt: str, marker: Path, **entries) -> Path:
    """A checkpoint-shaped dict (real tensors, the entries a loader looks for) carrying the payload."""
    obj = {"payload": Payload(marker), "model": {"weight": torch.zeros(2, 2)}, "epoch": 0, **entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    assert not marker.exists()  # saving recorded the call, it did not make it
    return path


# ------------------------------------------------------------------------------- the entry points
# Each builder writes its hostile file(s) under ``tmp`` and returns the command to run: a callable that
# runs the entry point's ``main`` as the console script does, with the flags that reach the loader.

TOKENIZER_TRAIN = ["--device", "cpu", "--input_size", "32", "--vocab_size", "64", "--embed_dim", "8", "--hidden", "8",
                   "--batch_size", "16", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0"]
FINETUNE = ["--model", "beit_tiny_patch16_224", "--input_size", "64", "--batch_size", "8", "--num_workers", "0",
            "--device", "cpu", "--epochs", "1", "--warmup_epochs", "0", "--nb_classes", "4",
            "--data_set", "image_folder", "--aa", "", "--reprob", "0"]
TAMING_DDCONFIG = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                       ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def _pretrain(data, out, *extra):
    argv = ["--data_path", str(data), "--output_dir", str(out), "--device", "cpu", *PRETRAIN_FAST,
            "--batch_size", "8", "--epochs", "1", *extra]
    return lambda: pretrain.main(argv)


def _finetune(data, out, *extra):
    argv = ["--data_path", str(data), "--eval_data_path", str(data), "--output_dir", str(out), *FINETUNE, *extra]
    return lambda: finetune.main(argv)


def _taming_folder(folder: Path, fmt: str, marker: Path, target: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump({"model": {
        "target": f"taming.models.vqgan.{target}",
        "params": {"embed_dim": 32, "n_embed": 64, "ddconfig": dict(TAMING_DDCONFIG)}}}))
    write_hostile(folder / "last.ckpt", fmt, marker, state_dict={"encoder.conv_in.weight": torch.zeros(1)},
                  **{"pytorch-lightning_version": "1.0.8"})
    return folder


def _deepspeed_folder(folder: Path, fmt: str, marker: Path) -> Path:
    """``checkpoint-<epoch>/`` as DeepSpeedTrainer.save leaves it: model states, the manifest
    (mcbeit_checkpoint.json, which auto-resume looks for), ``latest`` beside it."""
    states = write_hostile(folder / "mp_rank_00_model_states.pt", fmt, marker,
                           module={"weight": torch.zeros(2)}, format="mcbeit-finetune-v1")
    manifest = {"epoch": 0, "tag": folder.name, "world_size": 1, "zero_stage": 0, "amp": None,
                "files": {states.name: states.stat().st_size}}
    (folder / "mcbeit_checkpoint.json").write_text(json.dumps(manifest))
    (folder.parent / "latest").write_text(folder.name)
    return folder


def pretrain_resume(env, tmp, fmt, marker):
    ckpt = write_hostile(tmp / "evil.pth", fmt, marker, format="mcbeit-pretrain-v1")
    return _pretrain(env.data, tmp / "run", "--resume", str(ckpt))


def pretrain_auto_resume(env, tmp, fmt, marker):
    write_hostile(tmp / "run" / "checkpoint-3.pth", fmt, marker, format="mcbeit-pretrain-v1")
    return _pretrain(env.data, tmp / "run", "--auto_resume")


def pretrain_customized_tokenizer(env, tmp, fmt, marker):
    weights = write_hostile(tmp / "tokenizer.pth", fmt, marker, kind="customized")
    return _pretrain(env.data, tmp / "run", "--discrete_vae_type", "customized",
                     "--discrete_vae_weight_path", str(weights))


def pretrain_dalle_encoder(env, tmp, fmt, marker):
    write_hostile(tmp / "dalle" / "encoder.pkl", fmt, marker)
    return _pretrain(env.data, tmp / "run", "--discrete_vae_type", "dall-e",
                     "--discrete_vae_weight_path", str(tmp / "dalle"))


def pretrain_vqgan(env, tmp, fmt, marker):
    folder = _taming_folder(tmp / "vqgan", fmt, marker, "GumbelVQ")
    return _pretrain(env.data, tmp / "run", "--discrete_vae_type", "vqgan", "--discrete_vae_weight_path", str(folder))


def tokenizer_train_resume(env, tmp, fmt, marker):
    ckpt = write_hostile(tmp / "evil.pth", fmt, marker, format="mcbeit-tokenizer-v1")
    argv = ["train", "--data_path", str(env.data), "--output_dir", str(tmp / "run"), *TOKENIZER_TRAIN,
            "--resume", str(ckpt)]
    return lambda: tok_task.main(argv)


def tokenizer_train_auto_resume(env, tmp, fmt, marker):
    write_hostile(tmp / "run" / "checkpoint-0.pth", fmt, marker, format="mcbeit-tokenizer-v1")
    argv = ["train", "--data_path", str(env.data), "--output_dir", str(tmp / "run"), *TOKENIZER_TRAIN]
    return lambda: tok_task.main(argv)


def _inspect(data, tmp, kind, weights):
    argv = ["inspect", "--discrete_vae_type", kind, "--discrete_vae_weight_path", str(weights),
            "--data_path", str(data), "--input_size", "32", "--num_images", "2", "--histogram_images", "4",
            "--device", "cpu", "--output", str(tmp / "inspect" / "grid.png")]
    return lambda: tok_task.main(argv)


def tokenizer_inspect_customized(env, tmp, fmt, marker):
    return _inspect(env.data, tmp, "customized", write_hostile(tmp / "tokenizer.pth", fmt, marker, kind="customized"))


def tokenizer_inspect_dalle_decoder(env, tmp, fmt, marker):
    """A genuine (OpenAI-like) encoder.pkl with a hostile decoder.pkl beside it: only `inspect` reads decoders."""
    from mcbeit.tokenizers import DallEEncoder
    from tests.tokenizers.test_dalle_pickle import _openai_like, _save_openai_like

    encoder = DallEEncoder(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=32).eval()
    (tmp / "dalle").mkdir()
    _save_openai_like(lambda: _openai_like(encoder), tmp / "dalle" / "encoder.pkl", legacy=fmt != "zip")
    write_hostile(tmp / "dalle" / "decoder.pkl", fmt, marker)
    return _inspect(env.data, tmp, "dall-e", tmp / "dalle")


def tokenizer_inspect_vqgan_ema(env, tmp, fmt, marker):
    return _inspect(env.data, tmp, "vqgan_ema", _taming_folder(tmp / "ema", fmt, marker, "EMAVQ"))


def finetune_finetune(env, tmp, fmt, marker):
    ckpt = write_hostile(tmp / "pretrained.pth", fmt, marker, args={"model": "beit_tiny_patch16_224_8k_vocab"})
    return _finetune(env.data, tmp / "run", "--finetune", str(ckpt))


def finetune_finetune_deepspeed_folder(env, tmp, fmt, marker):
    _deepspeed_folder(tmp / "ds" / "checkpoint-0", fmt, marker)
    return _finetune(env.data, tmp / "run", "--finetune", str(tmp / "ds"))


def finetune_resume(env, tmp, fmt, marker):
    ckpt = write_hostile(tmp / "evil.pth", fmt, marker, format="mcbeit-finetune-v1")
    return _finetune(env.data, tmp / "run", "--resume", str(ckpt))


def finetune_auto_resume(env, tmp, fmt, marker):
    write_hostile(tmp / "run" / "checkpoint-0.pth", fmt, marker, format="mcbeit-finetune-v1")
    return _finetune(env.data, tmp / "run", "--epochs", "2")


def finetune_eval_resume(env, tmp, fmt, marker):
    ckpt = write_hostile(tmp / "checkpoint-best.pth", fmt, marker, format="mcbeit-finetune-v1")
    return _finetune(env.data, tmp / "run", "--eval", "--resume", str(ckpt))


def finetune_eval_resume_deepspeed_folder(env, tmp, fmt, marker):
    folder = _deepspeed_folder(tmp / "ds" / "checkpoint-0", fmt, marker)
    return _finetune(env.data, tmp / "run", "--eval", "--resume", str(folder))


def finetune_deepspeed_resume(env, tmp, fmt, marker):
    folder = _deepspeed_folder(tmp / "ds" / "checkpoint-0", fmt, marker)
    return _finetune(env.data, tmp / "run", "--enable_deepspeed", "--resume", str(folder))


def finetune_deepspeed_auto_resume(env, tmp, fmt, marker):
    _deepspeed_folder(tmp / "run" / "checkpoint-0", fmt, marker)
    return _finetune(env.data, tmp / "run", "--enable_deepspeed", "--epochs", "2")


def finetune_deepspeed_zero1_resume_optimizer_states(env, tmp, fmt, marker):
    """A real ZeRO-1 checkpoint (its model states are genuine) whose optimizer partition is hostile."""
    genuine = env.fixture("zero1_checkpoint")
    folder = tmp / "ds" / genuine.name
    folder.mkdir(parents=True)
    shutil.copyfile(genuine / "mp_rank_00_model_states.pt", folder / "mp_rank_00_model_states.pt")
    write_hostile(folder / OPTIM_STATES, fmt, marker, optimizer_state_dict={"state": {}}, ds_version="0.19.8")
    manifest = json.loads((genuine / "mcbeit_checkpoint.json").read_text())
    manifest["files"] = {p.name: p.stat().st_size for p in folder.iterdir()}  # the attacker rewrites the sizes too
    (folder / "mcbeit_checkpoint.json").write_text(json.dumps(manifest))
    return _finetune(env.data, tmp / "run", "--enable_deepspeed", "--zero_stage", "1", "--resume", str(folder))


def export_checkpoint(env, tmp, fmt, marker):
    ckpt = write_hostile(tmp / "checkpoint-best.pth", fmt, marker, args={"model": "beit_tiny_patch16_224"})
    return lambda: export.main([str(ckpt), "--output", str(tmp / "export")])


# What each command says. The zip and legacy formats reach the payload's global, and the restricted
# unpickler names it (posix.mkdir); a bare pickle.dump (protocol 4+) is already refused at its first opcode.
NAMED = r"(?=.*posix\.mkdir)"  # put first: the refused global is named somewhere after the match's start
UNSAFE = r"refusing to unpickle .*which is not on the allow-list .*unpickling it could run code"
WEIGHTS_ONLY = r"could not be read with torch\.load\(weights_only=True\)"
TAMING = r"could not be read safely: torch\.load\(weights_only=True\) refused it.*never unpickles arbitrary objects"
DALLE = NAMED + r"not a DALL-E {part} pickle that mcbeit can read safely.*never unpickles arbitrary objects"
DEEPSPEED = r"not readable with weights_only=True .*not loaded here \(unpickling could run code\)"


def every_format(regex: str) -> dict:
    return {"zip": NAMED + regex, "legacy": NAMED + regex, "pickle": regex}


CASES = {
    pretrain_resume: every_format(UNSAFE),
    pretrain_auto_resume: every_format(UNSAFE),
    pretrain_customized_tokenizer: every_format(WEIGHTS_ONLY),
    pretrain_dalle_encoder: {f: DALLE.format(part="encoder") for f in FORMATS},
    pretrain_vqgan: every_format(TAMING),
    tokenizer_train_resume: every_format(UNSAFE),
    tokenizer_train_auto_resume: every_format(UNSAFE),
    tokenizer_inspect_customized: every_format(WEIGHTS_ONLY),
    tokenizer_inspect_dalle_decoder: {f: DALLE.format(part="decoder") for f in FORMATS},
    tokenizer_inspect_vqgan_ema: every_format(TAMING),
    finetune_finetune: every_format(UNSAFE),
    finetune_finetune_deepspeed_folder: every_format(UNSAFE),
    finetune_resume: every_format(UNSAFE),
    finetune_auto_resume: every_format(UNSAFE),
    finetune_eval_resume: every_format(UNSAFE),
    finetune_eval_resume_deepspeed_folder: every_format(UNSAFE),
    finetune_deepspeed_resume: every_format(DEEPSPEED),
    finetune_deepspeed_auto_resume: every_format(DEEPSPEED),
    finetune_deepspeed_zero1_resume_optimizer_states: every_format(re.escape(OPTIM_STATES) + ": " + DEEPSPEED),
    export_checkpoint: every_format("mcbeit-export: " + UNSAFE),
}
PARAMS = [pytest.param(build, fmt, expected, id=f"{build.__name__}-{fmt}")
          for build, by_format in CASES.items() for fmt, expected in by_format.items()]


def refusal(command) -> str:
    """Run ``command``; it must fail (SystemExit with a message or non-zero status, or an exception): its message."""
    try:
        status = command()
    except SystemExit as exc:
        assert exc.code not in (0, None), f"exited with status {exc.code!r}"
        return str(exc.code)
    except Exception as exc:  # noqa: BLE001 - what the console script would print last
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"the hostile file was accepted (returned {status!r})")


@pytest.fixture(scope="module")
def zero1_checkpoint(image_folder, tmp_path_factory) -> Path:
    """``checkpoint-0/`` of a real one-epoch DeepSpeed ZeRO-1 fine-tuning run."""
    out = tmp_path_factory.mktemp("zero1")
    assert _finetune(image_folder, out, "--enable_deepspeed", "--zero_stage", "1",
                     "--disable_eval_during_finetuning")() == 0
    assert (out / "checkpoint-0" / OPTIM_STATES).is_file()
    return out / "checkpoint-0"


@pytest.mark.parametrize("build, fmt, expected", PARAMS)
def test_hostile_file_is_refused_without_running_it(build, fmt, expected, image_folder, tmp_path, request):
    marker = tmp_path / MARKER
    env = SimpleNamespace(data=image_folder, fixture=request.getfixturevalue)
    message = refusal(build(env, tmp_path, fmt, marker))
    assert not marker.exists(), f"the payload ran; then the command said: {message}"
    assert re.search(expected, message, re.S), message


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_payload_runs_when_unpickled_in_full(tmp_path, fmt):
    """The files above are live: full unpickling (what the refused loaders never do) makes the marker."""
    marker = tmp_path / MARKER
    path = write_hostile(tmp_path / "evil.pth", fmt, marker)
    if fmt == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("script, argv, expected", [
    ("run_class_finetuning.py", ["--finetune", "{ckpt}", "--data_path", "{data}", "--eval_data_path", "{data}",
                                 "--output_dir", "{tmp}/run", *FINETUNE], "^" + UNSAFE),  # the message alone, no traceback
    ("-m", ["mcbeit.cli.export", "{ckpt}", "--output", "{tmp}/export"], r"mcbeit-export: refusing to unpickle"),
], ids=["run_class_finetuning.py --finetune", "python -m mcbeit.cli.export"])
def test_console_commands_exit_non_zero_with_the_reason(script, argv, expected, image_folder, tmp_path):
    marker = tmp_path / MARKER
    ckpt = write_hostile(tmp_path / "evil.pth", "zip", marker, args={"model": "beit_tiny_patch16_224"})
    argv = [a.format(ckpt=ckpt, data=image_folder, tmp=tmp_path) for a in argv]
    proc = subprocess.run([PYTHON, script, *argv], cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(expected, proc.stderr.strip().splitlines()[-1]), proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
