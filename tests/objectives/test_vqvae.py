"""VQ-VAE tokenizer training (mcbeit.objectives.vqvae, driven by `mcbeit-tokenizer train`) on real images."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mcbeit.cli import tokenizer as tok_task
from mcbeit.tokenizers import CustomTokenizer, build_tokenizer
from mcbeit.objectives.vqvae import VQVAETraining
from mcbeit.tasks.tokenizer import build_vq_tokenizer
from tests.tasks.conftest import make_image_folder

# 64 images of 4 classes, 32 px crops, 64 codes: 4 steps per epoch.
TRAIN_FLAGS = ["--device", "cpu", "--input_size", "32", "--vocab_size", "64", "--embed_dim", "8", "--hidden", "8",
               "--batch_size", "16", "--num_workers", "0", "--print_freq", "2", "--lr", "3e-3", "--min_lr", "1e-4",
               "--warmup_epochs", "0", "--dead_code_steps", "4", "--seed", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def read_log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def train_args(data, out, *extra):
    return tok_task.get_train_parser().parse_args(["--data_path", str(data), "--output_dir", str(out), *TRAIN_FLAGS, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run (8 epochs x 4 steps), then a resumed run to epoch 10 in the same folder."""
    root = tmp_path_factory.mktemp("tok")
    data = make_image_folder(root / "data", n_per_class=16, size=64)
    out = root / "run"
    tok_task.run_train(train_args(data, out, "--epochs", "8", "--save_ckpt_freq", "4", "--image_freq", "6"))
    first = read_log(out)
    # --auto_resume continues; a longer run is another schedule, accepted explicitly
    tok_task.run_train(train_args(data, out, "--epochs", "10", "--save_ckpt_freq", "4",
                                  "--accept_changed_flags", "epochs"))
    return data, out, first


def test_dead_code_is_reinitialised_from_batch_features():
    torch.manual_seed(0)
    vq = VQVAETraining(CustomTokenizer(image_size=32, head="vq", vocab_size=4, n_hid=8, embed_dim=3))
    vq.initialised.fill_(True)
    with torch.no_grad():
        vq.tokenizer.codebook.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, -1.0]]))
    # Features in two clusters around codes 0 and 1: codes 2 and 3 are never chosen.
    feats = F.normalize(torch.cat([torch.tensor([[1.0, 0.2, 0.1]]).repeat(5, 1),
                                   torch.tensor([[0.1, 1.0, 0.2]]).repeat(5, 1)]), dim=1)
    ids = torch.tensor([0] * 5 + [1] * 5)
    before = vq.tokenizer.codebook.clone()
    for _ in range(2):
        usage = vq.update_codebook(feats, ids, dead_code_steps=3)
        assert usage["dead_codes_reinit"].item() == 0 and usage["code_usage"].item() == 0.5
    assert vq.unused_steps.tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(vq.tokenizer.codebook[2:], before[2:])                       # unused: untouched so far
    assert F.cosine_similarity(vq.tokenizer.codebook[0], feats[0], dim=0) > F.cosine_similarity(before[0], feats[0], dim=0)
    usage = vq.update_codebook(feats, ids, dead_code_steps=3)                                 # third unused step
    assert usage["dead_codes_reinit"].item() == 2 and vq.unused_steps.tolist() == [0, 0, 0, 0]
    for code in vq.tokenizer.codebook[2:]:                                                   # now near a batch feature
        assert (feats @ code).max() > 0.99
    torch.testing.assert_close(vq.tokenizer.codebook.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(usage["perplexity"], torch.tensor(2.0))


def test_training_run_learns_uses_codes_and_resumes(trained):
    data, out, first = trained
    assert [r["epoch"] for r in first] == list(range(8))
    rec = [r["train_rec_loss"] for r in first]
    assert rec[-1] < 0.7 * rec[0], rec                                                      # reconstruction improves
    assert first[-1]["train_epoch_perplexity"] > 12 and first[-1]["train_epoch_codes_used"] >= 24  # of 64 codes
    assert sum(r["train_dead_codes_reinit"] for r in first) > 0                               # and dead codes came back
    assert {"train_commit_loss", "train_perplexity", "train_code_usage", "train_psnr", "train_lr",
            "train_skipped_images", "train_steps"} <= set(first[0])
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(10)) and log[:8] == first                  # resumed at epoch 8
    assert log[8]["train_rec_loss"] < 0.8 * rec[0]                                          # from the trained weights
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-3.pth", "checkpoint-7.pth", "checkpoint-9.pth"]
    ckpt = torch.load(out / "checkpoint-9.pth", weights_only=True)
    assert ckpt["epoch"] == 9 and ckpt["global_step"] == 40 and ckpt["args"]["vocab_size"] == 64
    assert ckpt["optimizer"]["state"] and ckpt["tokenizer"]["kind"] == "customized"
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").glob("events.out.tfevents.*"))
    for tag in (b"loss/rec_loss", b"codebook/perplexity", b"codebook/dead_codes_reinit",
                b"reconstruction/epoch_end", b"reconstruction/input_vs_recon",
                b"temperature/vq_logit_scale", b"data/skipped_images", b"memory/rss_peak_gib"):
        assert tag in events, tag


def test_trained_checkpoint_is_a_customized_tokenizer(trained):
    data, out, _ = trained
    ckpt = torch.load(out / "checkpoint-9.pth", weights_only=True)
    args = tok_task.resolve_train_defaults(train_args(data, out))
    model = VQVAETraining(build_vq_tokenizer(args))
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.stack([model.tokenizer.input_transform(torch.rand(3, 32, 32)) for _ in range(2)])
    with torch.no_grad():
        expected = model.tokenizer(x)
    for path in (out / "checkpoint-9.pth", out / "tokenizer.pth", out):
        tok = build_tokenizer("customized", path, image_size=32)
        assert tok.has_decoder and not tok.random_weights and tok.vocab_size == 64
        with torch.no_grad():
            assert torch.equal(tok(x), expected), path
            images = tok.decode(tok(x).argmax(1))
        assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
