"""Real multi-process runs: 2 gloo processes on CPU, started by torchrun and by torch.distributed.launch."""
import json

import pytest
import torch

from tests.tasks.conftest import FAST, PYTHON, SEED_README_COMMAND, make_image_folder, run_cli, free_port



def torchrun(nproc: int) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "run_mcbeit_pretraining.py"]


def test_two_process_torchrun_writes_one_checkpoint_and_mean_loss(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli(torchrun(2) + ["--data_path", str(image_folder), "--output_dir", str(out), "--device", "cpu",
                           "--batch_size", "8", "--epochs", "1", *FAST], tmp_path)
    assert [p.name for p in out.glob("checkpoint-*.pth")] == ["checkpoint-0.pth"]
    (rec,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert rec["train_steps"] == 4  # 64 images / (8 per process x 2 processes)
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["world_size"] == 2


def test_legacy_launch_passes_local_rank_flag(image_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "run_mcbeit_pretraining.py", "--data_path", str(image_folder),
           "--output_dir", str(out), "--device", "cpu", "--batch_size", "16", "--epochs", "1", *FAST]
    run_cli(cmd, tmp_path)
    assert (out / "checkpoint-0.pth").is_file()


# 7x7 patches, 25 masked in blocks of >= 16: about a third of the masks stop short of 25, so the
# two ranks mask different counts and only the pooled mean over the global batch agrees.
RAGGED_BLOCKS = ["--input_size", "112", "--second_input_size", "56", "--mask_type", "block",
                 "--num_mask_patches", "25", "--min_mask_patches_per_block", "16"]


@pytest.mark.parametrize("mask", [RAGGED_BLOCKS, ["--mask_type", "random", "--mask_ratio", "0.5"]])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, mask):
    """One SGD step from the same weights on the same images: 2 x b == 1 x 2b (block masks are ragged)."""
    data = make_image_folder(tmp_path / "data", n_per_class=2, size=80, seed=3)  # 8 images: exactly one step
    common = ["--data_path", str(data), "--device", "cpu", "--epochs", "1", "--warmup_epochs", "0",
              "--opt", "momentum", "--lr", "0.5", "--momentum", "0", "--weight_decay", "0", *FAST, *mask]
    run_cli([PYTHON, "run_mcbeit_pretraining.py", "--output_dir", str(tmp_path / "one"), "--batch_size", "8",
             *common], tmp_path)
    run_cli(torchrun(2) + ["--output_dir", str(tmp_path / "two"), "--batch_size", "4", *common], tmp_path)
    one = torch.load(tmp_path / "one" / "checkpoint-0.pth", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "checkpoint-0.pth", weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    # The step moved the weights by lr x grad (so the comparison is not vacuous).
    fresh_log = [json.loads(line) for line in (tmp_path / "one" / "log.txt").read_text().splitlines()]
    assert fresh_log[0]["train_grad_norm"] > 0




def _small_vqgan_folder(folder):
    """A taming-style GumbelVQ log folder (model.yaml + Lightning last.ckpt) of a small f8 VQGAN."""
    import yaml

    from mcbeit.tokenizers.vqgan import GumbelVQGANTokenizer

    ddconfig = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    torch.manual_seed(0)
    tok = GumbelVQGANTokenizer(ddconfig, n_embed=512, embed_dim=32, image_size=32)
    folder.mkdir(parents=True)
    doc = {"model": {"target": "taming.models.vqgan.GumbelVQ",
                     "params": {"kl_weight": 1e-8, "embed_dim": 32, "n_embed": 512, "ddconfig": ddconfig,
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}
    (folder / "model.yaml").write_text(yaml.safe_dump(doc))
    sd = dict(tok.state_dict())  # encoder-only: a folder without decoder weights tokenizes, cannot decode
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
                "optimizer_states": [], "lr_schedulers": []}, folder / "last.ckpt")
    return folder


def test_seed_readme_command_runs_with_small_data(image_folder, tmp_path):
    """The mc-BEiT README's command, word for word, with 2 processes instead of 16 and, appended
    last (argparse's last value wins), the sizes a 2-core CI machine can afford."""
    import shlex

    command = SEED_README_COMMAND.replace("\\\n", " ")
    command = command.replace("${DATA_PATH}", str(image_folder)).replace("${OUTPUT_DIR}", str(tmp_path / "out"))
    command = command.replace("${TOKENIZER_PATH}", str(_small_vqgan_folder(tmp_path / "tokenizer")))
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "torch.distributed.launch", "--nproc_per_node=16"]
    argv[0], argv[3] = PYTHON, "--nproc_per_node=2"
    argv[4:4] = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    ci_sized = ["--model", "beit_tiny_patch16_224_8k_vocab", "--batch_size", "8", "--epochs", "2",
                "--input_size", "64", "--second_input_size", "32", "--num_workers", "1", "--device", "cpu"]
    run_cli(argv + ci_sized, tmp_path)
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_steps"] == 4 for r in log)
    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
    a = ckpt["args"]
    assert (a["discrete_vae_type"], a["mask_type"], a["omega"], a["clip_grad"], a["lr"]) == ("vqgan", "random", 0.2, 3.0, 1.5e-3)
    assert a["imagenet_default_mean_and_std"] and a["world_size"] == 2
    assert ckpt["model"]["lm_head.weight"].shape == (512, 192)  # the tokenizer's vocabulary
