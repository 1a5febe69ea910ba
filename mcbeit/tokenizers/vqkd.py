"""BEiT v2's VQ-KD tokenizer (vector-quantised knowledge distillation), trainable and as a frozen target.

The model (unilm ``beit2/modeling_vqkd.py``), for images x in [-1, 1] (B, 3, H, W):

    encoder     timm ``Beit`` (abs. position embedding, no relative bias, no layer scale, mean-pool
                norm ``fc_norm``): f = fc_norm(forward_features(x)[:, 1:])        (B, N, D), N = (H/16)(W/16)
    to codes    z = Linear(D,D) -> Tanh -> Linear(D,c)(f), float32 with autocast off        (B, N, c), c = 32
    quantize    z <- l2norm(z); id = nearest of V unit codes (cosine); z_q = code[id]; straight-through
                z + sg(z_q - z); quant_loss = mse(sg(z_q), z) (commitment, weight 1); the codebook moves
                by EMA (:mod:`mcbeit.objectives.codebook`), not by gradients
    decoder     another ``Beit`` over the (B, c, h, w) code map with patch size 1, depth 3 or 1, then
                Linear(W,W) -> Tanh -> Linear(W, teacher width)                    (B, N, C)
    loss        quant_loss + mean(1 - cos(rec, teacher's patch features)), 1 : 1

The state dict is unilm's, name for name (``encoder.*`` = timm ``Beit`` names: ``cls_token, pos_embed,
patch_embed.proj, blocks.N.{norm1, attn.q_bias, attn.v_bias, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
fc_norm``; ``decoder.*`` likewise; ``quantize.cluster_size``, ``quantize.embedding.{weight, cluster_size,
embed_avg, initted}``; ``encode_task_layer.{0,2}``, ``decode_task_layer.{0,2}``), so the released files load
strictly and our checkpoints load in the original code.

Architectures are named ``vqkd_encoder_{tiny,small,base,large}_decoder_{depth}x{width}x{heads}[_{teacher}]``
(base = the released ViT-B/16, large ViT-L/16, small 384-d/6 heads, tiny 192-d/3 heads; encoder depth 12,
24 for large). Initialisation as the original: timm's ``Beit`` init (= unilm's VisionTransformer: trunc
normal 0.02 for Linear, cls and pos, zero bias, the depth rescaling of attn.proj / fc2, the patch conv at its
PyTorch default), trunc normal 0.02 / zero bias for the task layers.

As a pre-training target, :class:`VQKDTokenizer` (kind ``vqkd``) holds the encoder, task layer and codebook
only. Its logits are ``VQKD_LOGIT_SCALE * cos(z, code_v)``: hard ids are their argmax (= the original's
``get_codebook_indices``), soft targets their softmax. Files are read by :func:`build_vqkd_tokenizer`.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from mcbeit.errors import InputError
from mcbeit.objectives.codebook import kmeans_init, l2norm, nearest_codes

from .base import Normalize, Tokenizer

log = logging.getLogger(__name__)

#: soft logits = VQKD_LOGIT_SCALE * cosine(z, code_v). 100 makes softmax(logits / T) exactly as sharp as the
#: ``customized`` VQ tokenizer's (its logits -50 ||z - e||^2 = 100 cos - 100 differ by a constant, which a
#: softmax ignores) and the random cosine tokenizer's (100 cos), so mc-BEiT's temperature T = 4 means the same
#: thing over every codebook tokenizer of this package.
VQKD_LOGIT_SCALE = 100.0
VQKD_DEFAULT_MODEL = "vqkd_encoder_base_decoder_3x768x12_clip"
VQKD_RANDOM_MODEL = "vqkd_encoder_tiny_decoder_1x192x3"
#: encoder sizes: (width, depth, heads)
ENCODER_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
#: teacher output widths the name's suffix implies (other teachers: the teacher's own width)
TEACHER_WIDTHS = {"clip": 512, "dino": 768}
PATCH_SIZE = 16
_NAME = re.compile(r"^vqkd_encoder_(tiny|small|base|large)_decoder_(\d+)x(\d+)x(\d+)(?:_([A-Za-z0-9_.\-]+))?$")
#: keys of a unilm file that are not part of the model: the original drops them before loading
DROPPED_PREFIXES = ("teacher", "scaling", "loss")


@dataclass(frozen=True)
class VQKDArch:
    """A parsed architecture name."""

    encoder: str
    decoder_depth: int
    decoder_width: int
    decoder_heads: int
    teacher: Optional[str]

    @property
    def encoder_width(self) -> int:
        return ENCODER_SIZES[self.encoder][0]

    @property
    def encoder_depth(self) -> int:
        return ENCODER_SIZES[self.encoder][1]

    @property
    def encoder_heads(self) -> int:
        return ENCODER_SIZES[self.encoder][2]

    @property
    def name(self) -> str:
        tail = f"_{self.teacher}" if self.teacher else ""
        return (f"vqkd_encoder_{self.encoder}_decoder_{self.decoder_depth}x{self.decoder_width}x{self.decoder_heads}"
                f"{tail}")


def parse_vqkd_name(name: str) -> VQKDArch:
    """``vqkd_encoder_base_decoder_3x768x12_clip`` -> its parts; a clear error for anything else."""
    m = _NAME.match(str(name).strip())
    if not m:
        raise InputError(f"--model {name!r} is not a VQ-KD architecture: use vqkd_encoder_{{tiny,small,base,large}}_"
                         f"decoder_{{depth}}x{{width}}x{{heads}}[_{{teacher}}], e.g. {VQKD_DEFAULT_MODEL} or "
                         f"vqkd_encoder_base_decoder_1x768x12_dino")
    enc, depth, width, heads, teacher = m.groups()
    depth, width, heads = int(depth), int(width), int(heads)
    if depth < 1 or heads < 1 or width % heads:
        raise InputError(f"--model {name!r}: the decoder needs depth >= 1 and a width divisible by its heads")
    return VQKDArch(enc, depth, width, heads, teacher)


def _vit(img_size: int, patch_size: int, in_chans: int, width: int, depth: int, heads: int) -> Beit:
    """The original's VisionTransformer as timm's ``Beit``: abs. pos, no rel. bias, no layer scale, fc_norm."""
    return Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="avg",
                embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True, init_values=None,
                use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False)


def _task_layer(width: int, out: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out))
    for m in layer:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


def patch_tokens(vit: Beit, x: torch.Tensor) -> torch.Tensor:
    """fc_norm of a ViT's patch tokens (CLS dropped): (B, N, D)."""
    return vit.fc_norm(vit.forward_features(x)[:, 1:])


class CodebookEMA(nn.Module):
    """unilm's ``EmbeddingEMA`` buffers: ``weight`` (V, c) unit codes, ``cluster_size`` (the k-means bins),
    ``embed_avg`` (saved, never used, as the original), ``initted`` ([1.] once initialised)."""

    def __init__(self, vocab: int, dim: int, kmeans: bool):
        super().__init__()
        weight = torch.zeros(vocab, dim) if kmeans else l2norm(torch.randn(vocab, dim))
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(vocab))
        self.register_buffer("embed_avg", weight.clone())
        self.register_buffer("initted", torch.tensor([0.0 if kmeans else 1.0]))


class NormEMAQuantizer(nn.Module):
    """The l2-normalised EMA vector quantiser (``quantize.*``): see the module doc and
    :mod:`mcbeit.objectives.codebook`. ``cluster_size`` is the EMA of the global hits per code (unilm's usage
    statistic; the task resets it every epoch as the original)."""

    def __init__(self, vocab: int, dim: int, decay: float = 0.99, kmeans: bool = True, beta: float = 1.0):
        super().__init__()
        self.vocab, self.dim, self.decay, self.beta = int(vocab), int(dim), float(decay), float(beta)
        self.embedding = CodebookEMA(self.vocab, self.dim, kmeans)
        self.register_buffer("cluster_size", torch.zeros(self.vocab))
        self._initted_known = False

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """k-means initialisation from the unit features ``z`` (N, c), once (rank 0's, broadcast). The buffer
        ``initted`` is read from the device once, not at every training step (a host sync on a GPU)."""
        if self._initted_known:
            return
        if bool(self.embedding.initted.item()):
            self._initted_known = True
            return
        log.info("VQ-KD codebook: k-means initialisation (10 iterations, cosine) of %d codes from %d features",
                 self.vocab, z.shape[0])
        means, bins = kmeans_init(z, self.vocab, 10)
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(bins.float())
        self.embedding.initted.fill_(1.0)
        self._initted_known = True

    def _load_from_state_dict(self, *args, **kwargs):
        self._initted_known = False  # the loaded ``initted`` decides again
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, N, c) -> straight-through codes (B, N, c), commitment loss, ids (B, N), unit z (B*N, c)."""
        with torch.autocast(z.device.type, enabled=False):
            z = l2norm(z.float())
            flat = z.reshape(-1, self.dim)                                          # (B*N, c)
            if self.training:
                self.init_codebook(flat.detach())
            ids = nearest_codes(flat.detach(), self.codebook)                      # (B*N,)
            z_q = F.embedding(ids, self.codebook).view_as(z).float()
            loss = self.beta * F.mse_loss(z_q.detach(), z)
            z_q = z + (z_q - z).detach()                                           # straight-through
        return z_q, loss, ids.view(z.shape[:-1]), flat.detach()


class _Encoding(nn.Module):
    """What the trainable model and the frozen tokenizer share: images -> codes."""

    encoder: Beit
    encode_task_layer: nn.Sequential
    quantize: NormEMAQuantizer

    def quantizer_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> unnormalised code-space features (B, N, c), float32."""
        f = patch_tokens(self.encoder, x)                                           # (B, N, D)
        with torch.autocast(x.device.type, enabled=False):
            return self.encode_task_layer(f.float())


class VQKD(_Encoding):
    """The trainable VQ-KD (encoder, quantiser, decoder); the teacher lives outside (its keys are not ours).

    ``forward(x, target)``: x in [-1, 1] (B, 3, H, W), target the teacher's patch features (B, N, C).
    """

    def __init__(self, arch: VQKDArch | str, image_size: int = 224, codebook_size: int = 8192,
                 codebook_dim: int = 32, decay: float = 0.99, kmeans_init: bool = True, teacher_dim: int | None = None,
                 rec_loss_type: str = "cosine"):
        super().__init__()
        self.arch = parse_vqkd_name(arch) if isinstance(arch, str) else arch
        a = self.arch
        if image_size % PATCH_SIZE:
            raise InputError(f"--input_size {image_size}: VQ-KD's encoder has {PATCH_SIZE}-px patches; use a multiple "
                             f"of {PATCH_SIZE}")
        if rec_loss_type != "cosine":
            raise InputError(f"--rec_loss_type {rec_loss_type!r}: the original (and this package) has 'cosine' only")
        out = teacher_dim or TEACHER_WIDTHS.get(a.teacher or "")
        if not out:
            raise InputError(f"{a.name}: give the teacher's width (teacher_dim) for teacher {a.teacher!r}")
        grid = image_size // PATCH_SIZE
        self.image_size, self.grid, self.teacher_dim = int(image_size), grid, int(out)
        self.encoder = _vit(image_size, PATCH_SIZE, 3, a.encoder_width, a.encoder_depth, a.encoder_heads)
        self.decoder = _vit(grid, 1, codebook_dim, a.decoder_width, a.decoder_depth, a.decoder_heads)
        self.quantize = NormEMAQuantizer(codebook_size, codebook_dim, decay, kmeans_init)
        self.encode_task_layer = _task_layer(a.encoder_width, codebook_dim)
        self.decode_task_layer = _task_layer(a.decoder_width, self.teacher_dim)

    def no_weight_decay(self) -> set[str]:
        """As the original (the codebook is a buffer here, so only the tokens and positions matter)."""
        return {"quantize.embedding.weight", "decoder.cls_token", "decoder.pos_embed", "encoder.cls_token",
                "encoder.pos_embed"}

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Codes (B, N, c) -> reconstructed teacher features (B, N, C)."""
        b, n, c = z_q.shape
        side = math.isqrt(n)
        grid = z_q.transpose(1, 2).reshape(b, c, side, n // side)                   # (B, c, h, w)
        return self.decode_task_layer(patch_tokens(self.decoder, grid))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        z_q, quant_loss, ids, flat = self.quantize(self.quantizer_input(x))
        rec = self.decode(z_q).float()
        cos = F.cosine_similarity(rec, target.float(), dim=-1, eps=0.0)           # (B, N)
        rec_loss = (1.0 - cos).mean()
        loss = quant_loss + rec_loss
        return {"loss": loss, "quant_loss": quant_loss.detach(), "rec_loss": rec_loss.detach(),
                "rec_cosine": cos.detach().mean(), "ids": ids, "features": flat}


class VQKDTokenizer(_Encoding, Tokenizer):
    """Frozen VQ-KD target (kind ``vqkd``): encoder + task layer + codebook.

    ``input_transform`` maps [0, 1] to [-1, 1] (the original's ``process_type='default'``). ``forward``
    gives float32 logits (B, V, h, w) = ``VQKD_LOGIT_SCALE * cos``; :meth:`token_ids` the nearest codes
    (B, h*w) int64, row-major, as the original's ``get_codebook_indices``. Unlike the original, the frozen
    tokenizer does not update its ``quantize.cluster_size`` statistic in eval mode."""

    kind = "vqkd"

    def __init__(self, arch: VQKDArch | str = VQKD_RANDOM_MODEL, image_size: int = 224, codebook_size: int = 8192,
                 codebook_dim: int = 32):
        Tokenizer.__init__(self, vocab_size=codebook_size, downsample=PATCH_SIZE, image_size=image_size,
                           input_transform=Normalize((0.5,) * 3, (0.5,) * 3))
        self.arch = parse_vqkd_name(arch) if isinstance(arch, str) else arch
        a = self.arch
        self.codebook_dim = int(codebook_dim)
        self.encoder = _vit(image_size, PATCH_SIZE, 3, a.encoder_width, a.encoder_depth, a.encoder_heads)
        self.encode_task_layer = _task_layer(a.encoder_width, codebook_dim)
        self.quantize = NormEMAQuantizer(codebook_size, codebook_dim, kmeans=False)

    def unit_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> unit code-space features (B, N, c), float32."""
        return l2norm(self.quantizer_input(images).float())

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        b, _, height, width = images.shape
        h, w = height // PATCH_SIZE, width // PATCH_SIZE
        z = self.unit_features(images)                                              # (B, N, c)
        with torch.autocast(images.device.type, enabled=False):
            cos = torch.einsum("bnc,vc->bvn", z, self.quantize.codebook.float())     # (B, V, N)
        return (VQKD_LOGIT_SCALE * cos).reshape(b, self.vocab_size, h, w)

    @torch.no_grad()
    def token_ids(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> code ids (B, h*w) int64."""
        self.check_input_size(images.shape[-2], images.shape[-1])
        z = self.unit_features(images)
        return nearest_codes(z.reshape(-1, self.codebook_dim), self.quantize.codebook).view(z.shape[:2])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, arch={self.arch.name!r}"


# ---------------------------------------------------------------------- building and files
def build_vqkd_tokenizer(weight_path: str | None, image_size: int, model: str | None = None,
                         codebook_size: int | None = 8192, codebook_dim: int | None = 32) -> VQKDTokenizer:
    """A frozen :class:`VQKDTokenizer` for ``image_size`` inputs.

    ``weight_path``: a unilm VQ-KD file (weights under ``'model'`` or ``'state_dict'``), mmpretrain's
    encoder-only ``vqkd_encoder.pth``, or a checkpoint of ``mcbeit-vqkd`` (whose ``'model'`` is the unilm
    layout); None gives random weights (``model`` None: the tiny encoder) with a loud warning. ``model``
    names the architecture when the file does not say it (the file's shapes decide the encoder; a
    conflicting name is an error, as are a codebook of another size or dimension than asked for; None takes
    the file's, 8192 x 32 for random weights).
    """
    if weight_path is None or os.fspath(weight_path) == "":
        tok = VQKDTokenizer(model or VQKD_RANDOM_MODEL, image_size, codebook_size or 8192, codebook_dim or 32)
        tok.random_weights = True
        log.warning("VQ-KD tokenizer %s has RANDOM weights: its targets carry no visual meaning (fine for tests and "
                    "smoke runs, useless for real pre-training). Pass a trained tokenizer with --tokenizer_weight: a "
                    "unilm vqkd_encoder_*.pth, mmpretrain's vqkd_encoder.pth or a checkpoint of mcbeit-vqkd.",
                    tok.arch.name)
        return tok.freeze()
    path = os.fspath(weight_path)
    info: dict[str, Any] = {}
    state, arch, dropped, notes = read_vqkd_file(path, model, info)
    vocab, dim = state["quantize.embedding.weight"].shape
    codebook_size, codebook_dim = codebook_size or vocab, codebook_dim or dim
    if (vocab, dim) != (codebook_size, codebook_dim):
        raise InputError(f"{path}: its codebook has {vocab} codes of dimension {dim}, but {codebook_size} x "
                         f"{codebook_dim} were asked for (--codebook_size / --codebook_dim): pass the file's sizes")
    tok = VQKDTokenizer(arch, image_size, codebook_size, codebook_dim)
    fit_to_model(state, tok, path, notes)
    tok.load_state_dict(state, strict=True)
    tok.random_weights = False
    if info.get("process_type") == "imagenet_norm":  # trained by mcbeit-vqkd --process_type imagenet_norm
        from mcbeit.tokenizers.teachers import IMAGENET_MEAN, IMAGENET_STD

        tok.input_transform = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        notes.append("trained with --process_type imagenet_norm: its input is normalised with ImageNet's mean/std")
    if dropped:
        log.info("VQ-KD file %s: not needed for tokenizing, not loaded: %s", path, _summary(dropped))
    for note in notes:
        log.info("VQ-KD file %s: %s", path, note)
    log.info("Loaded VQ-KD tokenizer %s (%d codes x %d) from %s", arch.name, codebook_size, codebook_dim, path)
    return tok.freeze()


def _unwrap(ckpt: Mapping[str, Any], path: str) -> Mapping[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise InputError(f"{path}: no VQ-KD weights found: expected a state dict under 'model' (unilm, mcbeit-vqkd) or "
                     f"'state_dict' (mmpretrain), got the keys {sorted(ckpt)[:10]}")


def _from_mmpretrain(sd: Mapping[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """mmpretrain's VQKD names (``encoder.layers.N.ln1``, ``encoder.ln1``, ``target_generator.*``, ...) -> unilm's,
    through the package's one map (:func:`mcbeit.models.key_maps.from_mmpretrain`); the keys of a whole
    pre-training file that are not the tokenizer are noted and left out."""
    from mcbeit.models.key_maps import from_mmpretrain, split_notes

    out, mapped = from_mmpretrain(sd, tokenizer=True)
    _, dropped = split_notes(mapped)
    if dropped:
        notes.append(f"not the tokenizer, not loaded: {_summary(sorted(dropped))}")
    weight = out.get("quantize.embedding.weight")
    if weight is not None:  # mmpretrain's EmbeddingEMA has no statistics (unused for tokenizing): as a fresh model's
        out.setdefault("quantize.embedding.cluster_size", torch.zeros(weight.shape[0]))
        out.setdefault("quantize.embedding.embed_avg", weight.clone())
        notes.append("quantize.embedding.cluster_size / embed_avg are not in mmpretrain's file (training statistics, "
                     "unused for tokenizing): set to zeros / the codebook")
    notes.append("mmpretrain layout: encoder.layers.N.* / encoder.ln1 read as encoder.blocks.N.* / encoder.fc_norm")
    return out


def read_vqkd_file(path: str, model: str | None = None, info: dict[str, Any] | None = None
                   ) -> tuple[dict[str, torch.Tensor], VQKDArch, list[str], list[str]]:
    """A VQ-KD file's tokenizer weights in unilm names, its architecture, the keys it holds that the tokenizer
    does not use (decoder, teacher, ...) and notes on what was converted. Other keys are an error. ``info``
    receives the ``process_type`` the file's training flags record (a checkpoint of mcbeit-vqkd), if any."""
    from mcbeit.models.checkpoint import read_checkpoint, resolve_source
    from mcbeit.models.key_maps import is_mmpretrain

    ckpt = read_checkpoint(resolve_source(path, "--tokenizer_weight"))
    args = ckpt.get("args")
    if info is not None and isinstance(args, Mapping) and args.get("process_type"):
        info["process_type"] = args["process_type"]
    raw = _unwrap(ckpt, path)
    raw = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    notes: list[str] = []
    sd = _from_mmpretrain(raw, notes) if is_mmpretrain(raw) else dict(raw)
    keep = ("encoder.", "encode_task_layer.", "quantize.")
    unused = ("decoder.", "decode_task_layer.") + DROPPED_PREFIXES
    state = {k: v for k, v in sd.items() if k.startswith(keep)}
    dropped = sorted(k for k in sd if k.startswith(unused))
    unknown = sorted(set(sd) - set(state) - set(dropped))
    if unknown:
        raise InputError(f"{path} is not a VQ-KD tokenizer file: unexpected keys {unknown[:20]}"
                         f"{' ...' if len(unknown) > 20 else ''} (expected encoder.*, encode_task_layer.*, quantize.*, "
                         f"and optionally decoder.*, decode_task_layer.*, teacher*, scaling*, loss*)")
    for need in ("encoder.cls_token", "quantize.embedding.weight", "encode_task_layer.2.weight"):
        if need not in state:
            raise InputError(f"{path} is not a VQ-KD tokenizer file: it has no {need} (keys: {_summary(list(sd))})")
    width = state["encoder.cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    named = parse_vqkd_name(model) if model else None
    sizes = [n for n, (w, d, _) in ENCODER_SIZES.items() if (w, d) == (width, depth)]
    if named is not None:
        if (named.encoder_width, named.encoder_depth) != (width, depth):
            raise InputError(f"{path} holds a {depth}-block {width}-d encoder, but --tokenizer_model {model} names a "
                             f"{named.encoder_depth}-block {named.encoder_width}-d one: pass the file's architecture")
        arch = named
    elif sizes:
        dec = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.blocks.")})
        dw = sd["decoder.cls_token"].shape[-1] if "decoder.cls_token" in sd else 768
        arch = VQKDArch(sizes[0], len(dec) or 1, dw, max(1, dw // 64), None)
    else:
        raise InputError(f"{path}: a {depth}-block {width}-d encoder is none of the VQ-KD sizes "
                         f"{ {n: (w, d) for n, (w, d, _) in ENCODER_SIZES.items()} }")
    return state, arch, dropped, notes


def fit_to_model(state: dict[str, torch.Tensor], model: nn.Module, path: str, notes: list[str]) -> None:
    """Resize ``encoder.pos_embed`` to the model's grid; then every key must match by name and shape, or an
    :class:`InputError` lists what does not."""
    from mcbeit.models.checkpoint import compare_state_dict
    from mcbeit.models.position_resize import interpolate_pos_embed

    own = model.state_dict()
    pe = state.get("encoder.pos_embed")
    if pe is not None and pe.shape != own["encoder.pos_embed"].shape:
        grid = model.encoder.patch_embed.grid_size
        state["encoder.pos_embed"] = interpolate_pos_embed(pe, grid)
        notes.append(f"encoder.pos_embed resized from {pe.shape[1] - 1} to {grid[0]}x{grid[1]} positions (bicubic)")
    report = compare_state_dict(model, state)
    if report:
        raise InputError(f"{path} does not fit the VQ-KD tokenizer {getattr(model, 'arch', None)}:\n{report.describe()}")


def _summary(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{g}.* ({n} keys)" for g, n in sorted(groups.items()))

