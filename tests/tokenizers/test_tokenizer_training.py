"""The VQ head of the customized tokenizer and its training (`mcbeit-tokenizer train`) on real images."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mcbeit.tasks import tokenizer as tok_task
from mcbeit.tokenizers import CustomTokenizer, build_tokenizer, save_custom_tokenizer
from mcbeit.tokenizers.custom import CUSTOM_FORMAT_VERSION
from tests.tasks.conftest import make_image_folder

TINY = dict(image_size=32, head="vq", vocab_size=64, n_hid=8, embed_dim=8)
# 64 images of 4 classes, 32 px crops, 64 codes: 4 steps per epoch.
TRAIN_FLAGS = ["--device", "cpu", "--input_size", "32", "--vocab_size", "64", "--embed_dim", "8", "--hidden", "8",
               "--batch_size", "16", "--num_workers", "0", "--print_freq", "2", "--lr", "3e-3", "--min_lr", "1e-4",
               "--warmup_epochs", "0", "--dead_code_steps", "4", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and does not collapse when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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
    tok_task.run_train(train_args(data, out, "--epochs", "10", "--save_ckpt_freq", "4"))  # --auto_resume: continues
    return data, out, first


def test_vq_head_logits_are_negative_scaled_squared_distances():
    torch.manual_seed(0)
    tok = CustomTokenizer(**TINY).eval()
    assert tok.has_decoder and tok.config["head"] == "vq" and tok.codebook.shape == (64, 8)
    x = torch.stack([tok.input_transform(torch.rand(3, 32, 32)) for _ in range(3)])
    with torch.no_grad():
        logits = tok(x)
        z = tok.encode(x)
    assert logits.shape == (3, 64, 4, 4) and logits.dtype == torch.float32
    dist2 = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), tok.codebook).pow(2)          # (B*h*w, V)
    torch.testing.assert_close(logits.permute(0, 2, 3, 1).reshape(-1, 64), -tok.logit_scale * dist2, atol=1e-3, rtol=1e-4)
    assert (logits <= 1e-4).all()
    ids = logits.argmax(1)
    assert torch.equal(ids.flatten(), dist2.argmin(1))                                       # argmax = nearest code
    images = tok.decode(ids)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="token ids"):
        tok.decode(torch.full((1, 4, 4), 64))
    plain = CustomTokenizer(image_size=32, n_hid=8, vocab_size=64)
    assert not plain.has_decoder and "head" not in plain.config
    with pytest.raises(NotImplementedError):
        plain.decode(ids)
    with pytest.raises(ValueError, match="cosine_scale"):
        CustomTokenizer(head="vq", cosine_scale=10.0)
    with pytest.raises(ValueError, match="head"):
        CustomTokenizer(head="gumbel")


def test_version_2_file_round_trip_and_version_1_files_still_load(tmp_path):
    torch.manual_seed(0)
    vq = CustomTokenizer(**TINY).eval()
    save_custom_tokenizer(vq, tmp_path / "vq.pth")
    payload = torch.load(tmp_path / "vq.pth", weights_only=True)
    assert payload["format_version"] == CUSTOM_FORMAT_VERSION == 2
    assert payload["config"]["head"] == "vq" and "codebook" in payload["state_dict"]
    assert any(k.startswith("decoder.") for k in payload["state_dict"])
    loaded = build_tokenizer("customized", tmp_path / "vq.pth", image_size=32)
    assert loaded.has_decoder and not loaded.random_weights and loaded.config == vq.config
    x = torch.stack([vq.input_transform(torch.rand(3, 32, 32)) for _ in range(2)])
    ids = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        assert torch.equal(loaded(x), vq(x)) and torch.equal(loaded.decode(ids), vq.decode(ids))

    # A version-1 file as the previous release wrote it: no 'head' in the config.
    for cosine in (0.0, 100.0):
        old = CustomTokenizer(image_size=32, n_hid=8, vocab_size=64, cosine_scale=cosine).eval()
        v1 = {"kind": "customized", "format_version": 1,
              "config": dict(group_count=4, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=64,
                             cosine_scale=cosine),
              "state_dict": {k: v.clone() for k, v in old.state_dict().items()}}
        torch.save(v1, tmp_path / "v1.pth")
        back = build_tokenizer("customized", tmp_path / "v1.pth", image_size=32)
        assert not back.has_decoder and back.config == old.config
        with torch.no_grad():
            assert torch.equal(back(x), old(x))

    payload["format_version"] = 3
    torch.save(payload, tmp_path / "future.pth")
    with pytest.raises(ValueError, match="format_version 3"):
        build_tokenizer("customized", tmp_path / "future.pth")


def test_dead_code_is_reinitialised_from_batch_features():
    torch.manual_seed(0)
    vq = tok_task.VQVAETraining(CustomTokenizer(image_size=32, head="vq", vocab_size=4, n_hid=8, embed_dim=3))
    vq.initialised.fill_(True)
    with torch.no_grad():
        vq.tokenizer.codebook.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, -1.0]]))
    # Features in two clusters around codes 0 and 1: codes 2 and 3 are never chosen.
    feats = F.normalize(torch.cat([torch.tensor([[1.0, 0.2, 0.1]]).repeat(5, 1),
                                   torch.tensor([[0.1, 1.0, 0.2]]).repeat(5, 1)]), dim=1)
    ids = torch.tensor([0] * 5 + [1] * 5)
    before = vq.tokenizer.codebook.clone()
    for step in range(2):
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
                b"reconstruction/epoch_end", b"reconstruction/input_vs_recon"):
        assert tag in events, tag


def test_trained_checkpoint_is_a_customized_tokenizer(trained):
    data, out, _ = trained
    ckpt = torch.load(out / "checkpoint-9.pth", weights_only=True)
    args = tok_task.resolve_train_defaults(train_args(data, out))
    model = tok_task.VQVAETraining(tok_task.build_vq_tokenizer(args))
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


def test_one_view_transform_and_single_output_dataset_items(tmp_path):
    import numpy as np
    from PIL import Image

    from mcbeit.data.datasets import build_pretraining_dataset
    from mcbeit.data.transforms import OneViewTransform
    from mcbeit.tokenizers import Normalize

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    train = OneViewTransform(32, scale=(0.35, 1.0), output_transform=Normalize())
    a, b = train(image, np.random.default_rng([0, 1, 2])), train(image, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and -1 <= a.min() and a.max() <= 1  # a function of the rng
    centre = OneViewTransform(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, interpolation="bicubic")
    crop = centre(image, np.random.default_rng(0))                                            # the middle 40x40
    expected = torch.from_numpy(np.asarray(image)[:, 10:50].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(crop, expected)
    make_image_folder(tmp_path, n_per_class=1, size=48)
    item = build_pretraining_dataset(tmp_path, None, train)[(0, 3)]
    assert len(item) == 2 and item[0].shape == (3, 32, 32) and item[1] == 0                   # (view, n_skipped)
