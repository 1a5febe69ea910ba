"""VQ-KD: unilm's released key set, files in unilm / mmpretrain / our layout, wrong files, and teachers
built from files written here (a tiny CLIP visual tower in OpenAI's names, a DINO-layout ViT)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcbeit.errors import InputError
from mcbeit.tokenizers import VQKD, VQKD_LOGIT_SCALE, build_tokenizer, build_vqkd_tokenizer, parse_vqkd_name
from mcbeit.tokenizers.teachers import build_teacher, clip_visual_model, dino_model

TINY = "vqkd_encoder_tiny_decoder_1x192x3_clip"


def released_3x768x12_clip_keys() -> dict[str, tuple[int, ...]]:
    """The 220 keys of unilm's vqkd_encoder_base_decoder_3x768x12_clip (reference notes, section 1)."""
    def block(prefix: str) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.norm1.weight": (768,), f"{prefix}.norm1.bias": (768,),
                f"{prefix}.attn.q_bias": (768,), f"{prefix}.attn.v_bias": (768,),
                f"{prefix}.attn.qkv.weight": (2304, 768),
                f"{prefix}.attn.proj.weight": (768, 768), f"{prefix}.attn.proj.bias": (768,),
                f"{prefix}.norm2.weight": (768,), f"{prefix}.norm2.bias": (768,),
                f"{prefix}.mlp.fc1.weight": (3072, 768), f"{prefix}.mlp.fc1.bias": (3072,),
                f"{prefix}.mlp.fc2.weight": (768, 3072), f"{prefix}.mlp.fc2.bias": (768,)}

    keys = {"encoder.cls_token": (1, 1, 768), "encoder.pos_embed": (1, 197, 768),
            "encoder.patch_embed.proj.weight": (768, 3, 16, 16), "encoder.patch_embed.proj.bias": (768,)}
    for i in range(12):
        keys.update(block(f"encoder.blocks.{i}"))
    keys.update({"encoder.fc_norm.weight": (768,), "encoder.fc_norm.bias": (768,),
                 "decoder.cls_token": (1, 1, 768), "decoder.pos_embed": (1, 197, 768),
                 "decoder.patch_embed.proj.weight": (768, 32, 1, 1), "decoder.patch_embed.proj.bias": (768,)})
    for i in range(3):
        keys.update(block(f"decoder.blocks.{i}"))
    keys.update({"decoder.fc_norm.weight": (768,), "decoder.fc_norm.bias": (768,),
                 "quantize.cluster_size": (8192,), "quantize.embedding.weight": (8192, 32),
                 "quantize.embedding.cluster_size": (8192,), "quantize.embedding.embed_avg": (8192, 32),
                 "quantize.embedding.initted": (1,),
                 "encode_task_layer.0.weight": (768, 768), "encode_task_layer.0.bias": (768,),
                 "encode_task_layer.2.weight": (32, 768), "encode_task_layer.2.bias": (32,),
                 "decode_task_layer.0.weight": (768, 768), "decode_task_layer.0.bias": (768,),
                 "decode_task_layer.2.weight": (512, 768), "decode_task_layer.2.bias": (512,)})
    return keys


def test_base_model_has_unilms_released_keys_and_shapes():
    expected = released_3x768x12_clip_keys()
    assert len(expected) == 220
    sd = VQKD("vqkd_encoder_base_decoder_3x768x12_clip").state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_names_parse():
    a = parse_vqkd_name("vqkd_encoder_base_decoder_1x768x12_dino")
    assert (a.encoder_width, a.encoder_depth, a.decoder_depth, a.decoder_width, a.decoder_heads, a.teacher) == \
        (768, 12, 1, 768, 12, "dino")
    assert parse_vqkd_name("vqkd_encoder_small_decoder_3x384x6").encoder_heads == 6
    with pytest.raises(InputError, match="vqkd_encoder_"):
        parse_vqkd_name("beit_base_patch16_224")


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny VQ-KD after one training forward (k-means initialised codebook) and a few EMA steps."""
    torch.manual_seed(0)
    m = VQKD(TINY, image_size=64, codebook_size=64).train()
    for _ in range(3):
        out = m(torch.rand(4, 3, 64, 64) * 2 - 1, torch.randn(4, 16, 512))
        from mcbeit.objectives.codebook import code_statistics, ema_update_
        counts, sums = code_statistics(out["features"], out["ids"], 64)
        ema_update_(m.quantize.codebook, counts, sums, 0.99)
    return m.eval()


def ids_of(m: VQKD, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.quantize(m.quantizer_input(x))[2]


def test_unilm_layout_file_loads_with_the_same_tokens(trained_tiny, tmp_path):
    sd = dict(trained_tiny.state_dict())
    extra = {"teacher_model.visual.proj": torch.zeros(2), "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
             "loss_fn.x": torch.zeros(1)}
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    for key in ("model", "state_dict"):
        path = tmp_path / f"unilm_{key}.pth"
        torch.save({key: {**sd, **extra}}, path)
        tok = build_vqkd_tokenizer(str(path), 64, codebook_size=64)
        assert not tok.random_weights and tok.vocab_size == 64 and tok.downsample == 16
        assert torch.equal(tok.token_ids(x), ids_of(trained_tiny, x))
        logits = tok(x)
        assert logits.shape == (3, 64, 4, 4) and logits.dtype == torch.float32
        assert torch.equal(logits.argmax(dim=1).flatten(1), tok.token_ids(x))
        assert float(logits.abs().max()) <= VQKD_LOGIT_SCALE + 1e-3           # scale x cosine
    tok = build_tokenizer("vqkd", str(path), 96)                               # another grid: pos_embed resized
    assert tok(torch.zeros(1, 3, 96, 96)).shape == (1, 64, 6, 6)


def test_a_checkpoint_trained_on_imagenet_normalised_input_keeps_that_input(trained_tiny, tmp_path):
    """mcbeit-vqkd --process_type imagenet_norm: the tokenizer built from its checkpoint normalises its input the
    same way (the [-1, 1] map would feed it other numbers than it was trained on)."""
    from mcbeit.tokenizers.base import Normalize
    from mcbeit.tokenizers.teachers import IMAGENET_MEAN, IMAGENET_STD

    for process, expected in (("imagenet_norm", Normalize(IMAGENET_MEAN, IMAGENET_STD)),
                              ("default", Normalize((0.5,) * 3, (0.5,) * 3))):
        path = tmp_path / f"{process}.pth"
        torch.save({"model": dict(trained_tiny.state_dict()), "args": {"process_type": process}}, path)
        assert build_vqkd_tokenizer(str(path), 64, codebook_size=64).input_transform == expected


def to_mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpretrain's encoder-only vqkd_encoder.pth names, written by inverting its renames literally."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(("encoder.", "quantize.", "encode_task_layer.")):
            continue                                                          # encoder-only file
        if k in ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg"):
            continue                                                          # mmpretrain's EmbeddingEMA lacks them
        k = (k.replace("encoder.blocks.", "encoder.layers.").replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
             .replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
             .replace("encoder.patch_embed.proj.", "encoder.patch_embed.projection.")
             .replace("encoder.fc_norm.", "encoder.ln1."))
        out[k] = v
    return out


def test_mmpretrain_encoder_only_file_loads_with_the_same_tokens(trained_tiny, tmp_path):
    mm = to_mmpretrain(trained_tiny.state_dict())
    assert "encoder.layers.0.ffn.layers.0.0.weight" in mm and "encoder.ln1.weight" in mm
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for name, payload in (("bare", {"state_dict": mm}),
                          ("prefixed", {"state_dict": {f"target_generator.{k}": v for k, v in mm.items()}})):
        path = tmp_path / f"mm_{name}.pth"
        torch.save(payload, path)
        tok = build_vqkd_tokenizer(str(path), 64, codebook_size=64)
        assert torch.equal(tok.token_ids(x), ids_of(trained_tiny, x))


def test_wrong_files_are_clear_errors(trained_tiny, tmp_path):
    sd = dict(trained_tiny.state_dict())
    cases = {
        "unexpected": ({"model": {**sd, "head.weight": torch.zeros(3)}}, "unexpected keys \\['head.weight'\\]"),
        "no_codebook": ({"model": {k: v for k, v in sd.items() if k != "quantize.embedding.weight"}},
                        "quantize.embedding.weight"),
        "missing_block_key": ({"model": {k: v for k, v in sd.items() if k != "encoder.blocks.3.attn.qkv.weight"}},
                              "missing .*encoder.blocks.3.attn.qkv.weight"),
        "not_vqkd": ({"optimizer": {"lr": 1.0}}, "no VQ-KD weights"),
    }
    for name, (payload, match) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(payload, path)
        with pytest.raises(InputError, match=match):
            build_vqkd_tokenizer(str(path), 64, codebook_size=64)
    good = tmp_path / "good.pth"
    torch.save({"model": sd}, good)
    with pytest.raises(InputError, match="64 codes of dimension 32, but 8192"):
        build_vqkd_tokenizer(str(good), 64)
    with pytest.raises(InputError, match="names a 12-block 768-d"):
        build_vqkd_tokenizer(str(good), 64, model="vqkd_encoder_base_decoder_3x768x12_clip", codebook_size=64)
    with pytest.raises(InputError, match="does not exist"):
        build_vqkd_tokenizer(str(tmp_path / "absent.pth"), 64)


def test_random_tokenizer_warns_and_works(caplog):
    tok = build_tokenizer("vqkd", None, 32)
    assert tok.random_weights and tok.vocab_size == 8192 and "RANDOM" in caplog.text
    assert tok.token_ids(tok.input_transform(torch.rand(2, 3, 32, 32))).shape == (2, 4)


# ---------------------------------------------------------------- teachers
def to_openai_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm CLIP tower names -> OpenAI's visual.* names: timm's _convert_openai_clip inverted, literally."""
    out = {}
    for k, v in sd.items():
        if k == "head.bias":
            continue                                                          # OpenAI's proj has no bias
        if k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
            continue
        k = (k.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre").replace("blocks.", "transformer.resblocks.")
             .replace("attn.qkv.", "attn.in_proj_").replace("attn.proj", "attn.out_proj")
             .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
             .replace("norm1", "ln_1").replace("norm2", "ln_2"))
        k = "ln_post" + k[len("norm"):] if k.startswith("norm.") else k
        out["visual." + k] = v
    return out


def openai_clip_patch_features(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenAI's VisionTransformer forward written out (return_all_tokens, then @ proj, CLS dropped)."""
    p = {k[len("visual."):]: v for k, v in sd.items()}
    w = p["conv1.weight"]
    d = w.shape[0]
    t = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)        # (B, N, D)
    t = torch.cat([p["class_embedding"].expand(x.shape[0], 1, d), t], dim=1) + p["positional_embedding"]
    ln = lambda t, n: F.layer_norm(t, (d,), p[f"{n}.weight"], p[f"{n}.bias"], eps=1e-5)  # noqa: E731
    t = ln(t, "ln_pre")
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in p:
        r = f"transformer.resblocks.{i}."
        h = ln(t, r + "ln_1")
        q, k, v = F.linear(h, p[r + "attn.in_proj_weight"], p[r + "attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ split(v)
        t = t + F.linear(a.transpose(1, 2).reshape(t.shape), p[r + "attn.out_proj.weight"], p[r + "attn.out_proj.bias"])
        h = F.linear(ln(t, r + "ln_2"), p[r + "mlp.c_fc.weight"], p[r + "mlp.c_fc.bias"])
        t = t + F.linear(h * torch.sigmoid(1.702 * h), p[r + "mlp.c_proj.weight"], p[r + "mlp.c_proj.bias"])
        i += 1
    return ln(t, "ln_post")[:, 1:] @ p["proj"]


def test_clip_teacher_from_openai_names_is_ln_post_times_proj(tmp_path):
    torch.manual_seed(1)
    timm_tower = clip_visual_model(128, 2, 2, 16, 24, 64)                     # OpenAI's heads = width / 64
    openai = {k: v + 0.3 * torch.randn_like(v) for k, v in to_openai_clip(timm_tower.state_dict()).items()}
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in openai and openai["visual.proj"].shape == (128, 24)
    text = {"token_embedding.weight": torch.zeros(5, 8), "ln_final.weight": torch.ones(8), "logit_scale": torch.ones(())}
    path = tmp_path / "clip.pt"
    torch.save({**openai, **text}, path)
    teacher = build_teacher("clip", str(path), 64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected = openai_clip_patch_features(openai, (((x + 1) * 127.5).clamp(0, 255) / 255 - mean) / std, 2)
    out = teacher(x)
    assert out.shape == (2, 16, 24) and teacher.out_dim == 24
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    one_head = openai_clip_patch_features(openai, (((x + 1) * 127.5).clamp(0, 255) / 255 - mean) / std, 1)
    assert not torch.allclose(one_head, expected, rtol=1e-2, atol=1e-2)       # the check sees the attention
    bare = tmp_path / "visual_only.pth"                                       # no visual. prefix, under 'state_dict'
    torch.save({"state_dict": {k[len("visual."):]: v for k, v in openai.items()}}, bare)
    torch.testing.assert_close(build_teacher("clip", str(bare), 64)(x), out, rtol=0, atol=0)
    small = build_teacher("clip", str(path), 32)                              # --teacher_input_size 32: images resized
    assert small(x).shape == (2, 4, 24)
    archive = tmp_path / "ViT-B-16.pt"                                        # OpenAI's release: a TorchScript archive
    torch.jit.script(_TorchScriptHolder({**openai, **text})).save(str(archive))
    torch.testing.assert_close(build_teacher("clip", str(archive), 64)(x), out, rtol=0, atol=0)


class _TorchScriptHolder(torch.nn.Module):
    """Parameters under OpenAI CLIP's names in a scriptable module (the layout of OpenAI's ViT-B-16.pt archive)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        for name, value in sd.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_dino_teacher_and_missing_weights(tmp_path):
    torch.manual_seed(2)
    vit = dino_model(128, 2, 2, 16, 64).eval()                                # DINO's heads = width / 64
    path = tmp_path / "dino.pth"
    torch.save(vit.state_dict(), path)
    teacher = build_teacher("dino", str(path), 64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = vit.forward_features((((x + 1) * 127.5).clamp(0, 255) / 255 - mean) / std)[:, 1:]
    torch.testing.assert_close(teacher(x), expected, rtol=0, atol=1e-5)
    for kind in ("clip", "dino", "vit_small_patch16_224"):
        with pytest.raises(InputError, match="--teacher_weight"):
            build_teacher(kind, None, 64)
    with pytest.raises(InputError, match="not an OpenAI CLIP"):
        build_teacher("clip", str(path), 64)
