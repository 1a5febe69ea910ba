"""DeepSpeed path (``mcbeit.engine.deepspeed``) on DeepSpeed's CPU accelerator: the same updates as
the plain path (betas, eps, clipping, per-group weight decay, layer-decay lr scales, bf16 / fp16
autocast), gradient accumulation, checkpoints resumed exactly, and two gloo processes."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcbeit.engine import deepspeed as ds
from mcbeit.engine.optim import backward_and_step, build_optimizer
from mcbeit.engine.schedules import apply_schedules
from mcbeit.errors import ConfigError, InputError

if importlib.util.find_spec("deepspeed") is None:  # not imported here: DS_ACCELERATOR is set first (fixture)
    pytest.skip('DeepSpeed is not installed (pip install -e ".[deepspeed]")', allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
CLIP = 0.5          # the gradient norm of these batches is about 6: clipping is active in every update
BETAS = (0.8, 0.9)
EPS = 1e-4          # large enough that eps visibly changes the update (see test_the_comparison_is_sensitive)
LRS = [2e-3, 3e-3, 1.5e-3, 1e-3]
WDS = [0.05, 0.08, 0.03, 0.05]
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_process():
    """DeepSpeed's CPU accelerator for this module; afterwards close the one-process group and
    restore the environment, so later tests see no process group."""
    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "LOCAL_RANK")}
    ds.prepare_accelerator("cpu")
    yield
    ds.release_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ------------------------------------------------------------------------------------------ helpers

def tiny_beit(seed: int = 0) -> torch.nn.Module:
    """A 2-block BEiT-tiny classifier on 32x32 images (relative position bias, layer scale)."""
    import timm

    from mcbeit.models.classifier import classifier_kwargs

    torch.manual_seed(seed)
    return timm.create_model("beit_tiny_patch16_224", depth=2,
                             **classifier_kwargs(nb_classes=5, input_size=32, drop_path=0.0))


def make_optimizer(model, betas=BETAS, eps=EPS, layer_decay=0.75):
    return build_optimizer(model, lr=LRS[0], weight_decay=WDS[0], opt_betas=betas, opt_eps=eps,
                           layer_decay=layer_decay)


def batches(n: int, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def plain_run(model, data, *, clip=CLIP, amp=None, start=0, **opt_kwargs):
    """The plain path: apply_schedules, forward under autocast, backward_and_step (GradScaler for fp16)."""
    optimizer = make_optimizer(model, **opt_kwargs)
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i, (x, y) in enumerate(data, start):
        apply_schedules(optimizer, LRS[i], WDS[i])
        with autocast(amp):
            loss = F.cross_entropy(model(x).float(), y)
        norms.append(backward_and_step(loss, optimizer, scaler, params, clip)[0])
    return torch.stack(norms)


def ds_run(trainer, data, *, update_freq=1, amp=None, start=0):
    """The DeepSpeed path as the fine-tuning loop drives it; returns the update norms."""
    norms = []
    for micro, (x, y) in enumerate(data):
        update, phase = divmod(micro, update_freq)
        if phase == 0:
            apply_schedules(trainer.optimizer, LRS[start + update], WDS[start + update])
        with autocast(amp):
            loss = F.cross_entropy(trainer(x).float(), y)
        norm = trainer.step(loss)
        assert (norm is None) == (phase != update_freq - 1)
        if norm is not None:
            norms.append(norm)
    return torch.stack(norms)


def make_trainer(model, *, zero=0, amp=None, update_freq=1, batch_size=4, clip=CLIP, world_size=1, **opt_kwargs):
    config = ds.deepspeed_config(batch_size=batch_size, update_freq=update_freq, world_size=world_size, amp=amp,
                                 zero_stage=zero, clip_grad=clip)
    return ds.DeepSpeedTrainer(model, make_optimizer(model, **opt_kwargs), config, device="cpu")


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


# -------------------------------------------------------------------------------------------- config

def test_config_maps_the_flags():
    cfg = ds.deepspeed_config(batch_size=8, update_freq=4, world_size=2, amp=torch.bfloat16, zero_stage=2,
                              clip_grad=3.0)
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 3.0
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "optimizer" not in cfg and "bf16" not in cfg and "fp16" not in cfg
    off = ds.deepspeed_config(batch_size=8, amp="off", clip_grad=None)
    assert off["gradient_clipping"] == 0.0 and "torch_autocast" not in off


@pytest.mark.parametrize("kwargs, match", [
    (dict(zero_stage=3), "stage 3 partitions"),
    (dict(zero_stage=1, amp="fp16"), "use --amp bf16, or --zero_stage 0"),
    (dict(amp="fp16", device="cpu"), "--amp fp16 needs a CUDA device"),
    (dict(update_freq=0), "--update_freq must be at least 1"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ds.deepspeed_config(batch_size=4, **kwargs)


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(InputError, match=r'pip install -e "\.\[deepspeed\]"'):
        ds.import_deepspeed()


def test_accelerator_conflicts_are_errors(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cuda but the run is on cpu"):
        ds.prepare_accelerator("cpu")
    monkeypatch.delenv("DS_ACCELERATOR")
    ds.import_deepspeed("cpu")  # deepspeed is now imported with its CPU accelerator
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(InputError, match="imported with its cpu accelerator but the run is on cuda"):
        ds.prepare_accelerator("cuda")


def test_zero_rejects_per_tensor_optimizers():
    model = tiny_beit()
    optimizer = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05)
    with pytest.raises(ConfigError, match="--opt adamw or --zero_stage 0"):
        ds.DeepSpeedTrainer(model, optimizer, ds.deepspeed_config(batch_size=4, zero_stage=1), device="cpu")


# ------------------------------------------------------------------------------- same updates as plain

@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_matches_plain_adamw(zero, amp):
    """3 updates with changing lr / wd, layer-decay groups, betas, eps and active clipping: the
    DeepSpeed weights and norms are the plain path's (bf16: DeepSpeed's torch_autocast == torch.autocast)."""
    data = batches(3)
    reference = tiny_beit()
    expected = plain_run(reference, data, amp=amp)
    trainer = make_trainer(tiny_beit(), zero=zero, amp=amp)
    assert len(trainer.optimizer.param_groups) == 8 and {g["lr_scale"] for g in trainer.optimizer.param_groups} == {
        0.75 ** 3, 0.75 ** 2, 0.75, 1.0}
    norms = ds_run(trainer, data, amp=amp)
    assert max_diff(trainer.module, reference) < TOL
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=0)
    assert (expected > CLIP).all()
    assert trainer.loss_scale().item() == 1.0
    assert next(trainer.module.parameters()).dtype == torch.float32  # weights stay fp32 under autocast


def test_the_comparison_is_sensitive():
    """Each of clip, betas, eps and layer decay changes the weights by over 20 x TOL: matching the
    plain run proves DeepSpeed honours them (the original's DeepSpeed config dropped them)."""
    data = batches(3)
    reference = tiny_beit()
    plain_run(reference, data)
    for kwargs in (dict(clip=None), dict(betas=(0.9, 0.999)), dict(eps=1e-8), dict(layer_decay=None)):
        other = tiny_beit()
        plain_run(other, data, **kwargs)
        assert max_diff(other, reference) > 20 * TOL, kwargs


def test_fp16_zero0_matches_gradscaler_and_later_engines_are_clean():
    """fp16 autocast (stage 0): DeepSpeed's GradScaler == the plain path's; the norm is unscaled.
    A later fp32 ZeRO-1 engine in the same process is unaffected (DeepSpeed keeps autocast globals)."""
    data = batches(3)
    reference = tiny_beit()
    expected = plain_run(reference, data, amp=torch.float16)
    trainer = make_trainer(tiny_beit(), zero=0, amp=torch.float16)
    assert trainer.loss_scale().item() == 2.0 ** 16
    norms = ds_run(trainer, data, amp=torch.float16)
    assert max_diff(trainer.module, reference) < 5e-5
    torch.testing.assert_close(norms, expected, rtol=1e-3, atol=0)

    reference = tiny_beit()
    plain_run(reference, data)
    trainer = make_trainer(tiny_beit(), zero=1)
    assert getattr(trainer.optimizer, "torch_autocast_gradscaler", None) is None
    ds_run(trainer, data)
    assert max_diff(trainer.module, reference) < TOL


@pytest.mark.parametrize("zero", [0, 2])
def test_update_freq_accumulates_like_one_big_batch(zero):
    """update_freq=2 over micro-batches of 4 == one update on the 8 images (per-micro-batch mean losses)."""
    micro = batches(4)
    merged = [(torch.cat([micro[i][0], micro[i + 1][0]]), torch.cat([micro[i][1], micro[i + 1][1]]))
              for i in (0, 2)]
    reference = tiny_beit()
    expected = plain_run(reference, merged)
    trainer = make_trainer(tiny_beit(), zero=zero, update_freq=2)
    norms = ds_run(trainer, micro, update_freq=2)
    assert trainer.engine.global_steps == 2
    assert max_diff(trainer.module, reference) < TOL
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=0)


# -------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("zero, amp", [(0, None), (2, torch.bfloat16)], ids=["zero0-fp32", "zero2-bf16"])
def test_save_load_continue_equals_uninterrupted(tmp_path, zero, amp):
    data = batches(4)
    straight = make_trainer(tiny_beit(), zero=zero, amp=amp)
    ds_run(straight, data, amp=amp)

    first = make_trainer(tiny_beit(), zero=zero, amp=amp)
    ds_run(first, data[:2], amp=amp)
    ema = {"w": torch.arange(3.0)}
    folder = first.save(tmp_path, 0, {"model_ema": ema, "args": {"lr": 2e-3, "input_size": 32}})
    assert folder == tmp_path / "checkpoint-0" and (tmp_path / "latest").read_text() == "checkpoint-0"
    marker = json.loads((folder / ds.MARKER).read_text())
    assert marker["epoch"] == 0 and marker["world_size"] == 1 and marker["zero_stage"] == zero
    assert ds.find_resumable(tmp_path) == folder
    first.save(tmp_path, "best")  # not a resume point: 'latest' still names checkpoint-0
    assert (tmp_path / "checkpoint-best" / ds.MARKER).is_file() and ds.find_resumable(tmp_path) == folder
    assert (tmp_path / "latest").read_text() == "checkpoint-0"

    resumed = make_trainer(tiny_beit(seed=7), zero=zero, amp=amp)  # other initial weights: all must come back
    state = resumed.load(folder)
    assert state["epoch"] == 0 and state["args"] == {"lr": 2e-3, "input_size": 32}
    assert torch.equal(state["model_ema"]["w"], ema["w"])
    assert resumed.engine.global_steps == 2
    ds_run(resumed, data[2:], amp=amp, start=2)
    assert max_diff(resumed.module, straight.module) < 1e-6


def test_mismatched_zero_stage_needs_weights_only(tmp_path):
    trainer = make_trainer(tiny_beit(), zero=0)
    ds_run(trainer, batches(1))
    folder = trainer.save(tmp_path, 3)
    other = make_trainer(tiny_beit(seed=5), zero=1)
    with pytest.raises(ds.DeepSpeedCheckpointError, match="ZeRO stage 0, this run uses 1"):
        other.load(folder)
    assert other.load(tmp_path, weights_only=True)["epoch"] == 3  # the output folder: 'latest' names the tag
    assert max_diff(other.module, trainer.module) == 0.0


def test_checkpoints_are_read_without_unpickling_code(tmp_path):
    """DeepSpeed itself loads with weights_only=False; the trainer reads with weights_only=True, so a
    client_state holding arbitrary objects (an argparse.Namespace here) is refused, not executed."""
    import argparse

    trainer = make_trainer(tiny_beit(), zero=0)
    trainer.save(tmp_path, 0, {"args": argparse.Namespace(lr=1.0)})
    with pytest.raises(RuntimeError, match="not readable with weights_only=True"):
        make_trainer(tiny_beit(), zero=0).load(tmp_path / "checkpoint-0")


def test_released_process_group_allows_a_new_run():
    """The one-process group the trainer opens is closed by release_process_group (also after
    mcbeit's cleanup() closed it); a later trainer in the same process (an in-process CLI test,
    say) opens a fresh one."""
    import torch.distributed as dist

    from mcbeit.engine.distributed import cleanup

    make_trainer(tiny_beit(), zero=0)
    assert dist.is_initialized()
    cleanup()
    ds.release_process_group()
    trainer = make_trainer(tiny_beit(), zero=1)
    ds_run(trainer, batches(1))
    assert trainer.engine.global_steps == 1
    ds.release_process_group()
    assert not dist.is_initialized()
    trainer = make_trainer(tiny_beit(), zero=2)
    ds_run(trainer, batches(1))
    assert dist.is_initialized() and trainer.engine.global_steps == 1


def test_finding_checkpoints(tmp_path):
    def folder(name, marker=True, states=True):
        path = tmp_path / name
        path.mkdir()
        if states:
            torch.save({"module": {}}, path / "mp_rank_00_model_states.pt")
        if marker:
            (path / ds.MARKER).write_text("{}")
        return path

    assert ds.find_resumable(tmp_path) is None and ds.find_resumable(tmp_path / "missing") is None
    one, two = folder("checkpoint-1"), folder("checkpoint-2")
    folder("checkpoint-5", marker=False)  # a save a crash interrupted: no marker, not named by 'latest'
    folder("checkpoint-best")
    (tmp_path / "latest").write_text("checkpoint-2")
    assert ds.list_deepspeed_checkpoints(tmp_path) == [(1, one), (2, two)]
    assert ds.find_resumable(tmp_path) == two
    foreign = folder("checkpoint-9", marker=False)  # written by other DeepSpeed code and named by 'latest'
    (tmp_path / "latest").write_text("checkpoint-9")
    assert ds.find_resumable(tmp_path) == foreign
    assert ds.resume_checkpoint(None, True, str(tmp_path)) == foreign
    assert ds.resume_checkpoint(str(one), True, str(tmp_path)) == one
    assert ds.resume_checkpoint(str(tmp_path), False, None) == foreign
    assert ds.resume_checkpoint(None, False, str(tmp_path)) is None
    with pytest.raises(ds.DeepSpeedCheckpointError, match="not a DeepSpeed checkpoint"):
        ds.resume_checkpoint(str(folder("other", states=False)), False, None)
    with pytest.raises(ds.DeepSpeedCheckpointError, match="no such folder"):
        ds.resume_checkpoint(str(tmp_path / "nope"), False, None)


def _saved_run(tmp_path, epochs, keep_last=0):
    """A ZeRO-1 trainer after one update, saved as checkpoint-<e>/ for each of ``epochs``."""
    trainer = make_trainer(tiny_beit(), zero=1)
    ds_run(trainer, batches(1))
    for epoch in epochs:
        trainer.save(tmp_path, epoch, {"step": epoch}, keep_last=keep_last)
    return trainer


def test_keep_last_and_damaged_folders_fall_back_with_a_warning(tmp_path, caplog):
    _saved_run(tmp_path, [0, 1, 2, 3], keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["checkpoint-2", "checkpoint-3"]  # no staging or replaced folders left either
    marker = json.loads((tmp_path / "checkpoint-3" / ds.MARKER).read_text())
    assert marker["files"] and all((tmp_path / "checkpoint-3" / f).stat().st_size == n
                                   for f, n in marker["files"].items())
    assert ds.find_resumable(tmp_path) == tmp_path / "checkpoint-3"

    optim = next((tmp_path / "checkpoint-3").glob("*optim_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])  # truncated (a node died while copying, say)
    with caplog.at_level("WARNING"):
        assert ds.find_resumable(tmp_path) == tmp_path / "checkpoint-2"
    assert "skipping" in caplog.text and "bytes" in caplog.text and optim.name in caplog.text
    assert optim.exists()  # nothing written is deleted on suspicion
    with pytest.raises(ds.DeepSpeedCheckpointError, match="--resume .*checkpoint-3.*pass an earlier"):
        ds.resume_checkpoint(str(tmp_path / "checkpoint-3"), False, None)

    states = tmp_path / "checkpoint-2" / "mp_rank_00_model_states.pt"
    flipped = bytearray(states.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size: only the CRC can tell
    states.write_bytes(bytes(flipped))
    assert "CRC" in ds.deepspeed_checkpoint_problem(tmp_path / "checkpoint-2")
    with pytest.raises(ds.DeepSpeedCheckpointError, match="every DeepSpeed checkpoint .* is damaged"):
        ds.find_resumable(tmp_path)
    # a resumed run that saves again prunes only up to the epoch it wrote
    _saved_run(tmp_path, [1], keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert ds.deepspeed_checkpoint_problem(tmp_path / "checkpoint-1") is None


def test_a_save_interrupted_between_the_renames_still_resumes(tmp_path):
    """A crash after the old folder was moved aside but before the new one took its name: the moved
    folder is found under its epoch; the next save clears both leftovers."""
    _saved_run(tmp_path, [0, 1])
    os.replace(tmp_path / "checkpoint-1", tmp_path / ".replaced-checkpoint-1")
    (tmp_path / ".saving-checkpoint-1").mkdir()  # the new one, half written
    assert ds.find_resumable(tmp_path) == tmp_path / ".replaced-checkpoint-1"
    resumed = make_trainer(tiny_beit(seed=4), zero=1)
    assert resumed.load(ds.find_resumable(tmp_path))["step"] == 1
    resumed.save(tmp_path, 1, {"step": 10})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-0", "checkpoint-1"]
    assert ds.find_resumable(tmp_path) == tmp_path / "checkpoint-1"


DISK_FULL_SCRIPT = """
import resource, signal, sys
import torch
from tests.engine.test_deepspeed import batches, ds_run, make_trainer, tiny_beit
from mcbeit.engine import deepspeed as ds

ds.prepare_accelerator("cpu")
torch.set_num_threads(1)
trainer = make_trainer(tiny_beit(), zero=0)
ds_run(trainer, batches(1))
trainer.save(sys.argv[1], 0, {"step": 1})           # a whole checkpoint-0/
ds_run(trainer, batches(2)[1:], start=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
trainer.save(sys.argv[1], 0, {"step": 2})           # the mid-epoch save of the same epoch fails
"""


def test_a_failing_write_keeps_the_previous_folder_whole(tmp_path):
    """A real process whose writes the kernel refuses (RLIMIT_FSIZE) while rewriting checkpoint-0/:
    the error says so, and the earlier checkpoint-0/ is whole (every file the size its marker lists) and resumable."""
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_SCRIPT)
    out = tmp_path / "out"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "CheckpointWriteError" in proc.stderr and "the previous checkpoints are untouched" in proc.stderr, \
        proc.stderr[-3000:]
    assert "file too large" in proc.stderr or "most likely a full disk" in proc.stderr
    folder = out / "checkpoint-0"
    marker = json.loads((folder / ds.MARKER).read_text())
    assert {name: (folder / name).stat().st_size for name in marker["files"]} == marker["files"]
    assert ds.find_resumable(out) == folder
    assert make_trainer(tiny_beit(seed=2), zero=0).load(folder)["step"] == 1


# ---------------------------------------------------------------------------------- two processes

TWO_PROCESS_SCRIPT = """
import sys
from pathlib import Path
import torch
from mcbeit.engine.distributed import init_distributed
from mcbeit.engine import deepspeed as ds
from tests.engine.test_deepspeed import batches, ds_run, make_trainer, tiny_beit

torch.set_num_threads(1)
info = init_distributed("cpu")
out = Path(sys.argv[1])
for zero in (0, 1):
    trainer = make_trainer(tiny_beit(), zero=zero, world_size=info.world_size)
    lo = 4 * info.rank  # each process takes its half of every global batch of 8
    local = [(x[lo:lo + 4], y[lo:lo + 4]) for x, y in batches(3, size=8)]
    norms = ds_run(trainer, local)
    trainer.save(out / f"zero{zero}", 0, {"rank_count": info.world_size})
    if info.is_main:
        torch.save({"model": trainer.module.state_dict(), "norms": norms}, out / f"zero{zero}.pt")
"""


def test_two_processes_write_a_checkpoint_one_process_loads(tmp_path):
    """torchrun, 2 gloo processes x 4 images == 1 process x 8 images; the checkpoint loads in 1 process
    (ZeRO 0 fully; ZeRO 1 only its weights: the optimizer state is split between the 2 processes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    reference = tiny_beit()
    expected = plain_run(reference, batches(3, size=8))
    for zero in (0, 1):
        saved = torch.load(tmp_path / f"zero{zero}.pt", weights_only=True)
        assert max((saved["model"][k] - v).abs().max().item() for k, v in reference.state_dict().items()) < TOL
        torch.testing.assert_close(saved["norms"], expected, rtol=1e-4, atol=0)
        folder = ds.find_resumable(tmp_path / f"zero{zero}")
        assert json.loads((folder / ds.MARKER).read_text())["world_size"] == 2

        single = make_trainer(tiny_beit(seed=3), zero=zero, batch_size=8)
        if zero:
            with pytest.raises(ds.DeepSpeedCheckpointError, match="2 processes under ZeRO stage 1"):
                single.load(folder)
        state = single.load(folder, weights_only=bool(zero))
        assert state["rank_count"] == 2 and state["epoch"] == 0
        assert max_diff(single.module, reference) < TOL
        if not zero:  # the whole state came back: one more update alone == a plain 4-update run
            longer = tiny_beit()
            plain_run(longer, batches(4, size=8))
            ds_run(single, batches(4, size=8)[3:], start=3)
            assert max_diff(single.module, longer) < TOL
