"""Pre-training configuration: the flags of the original `run_mcbeit_pretraining.py` and
`run_beit_pretraining.py`, each with its original's defaults.

With no ``--data_path`` the run is the embedded demonstration (``EMBEDDED`` values: a tiny model
at 112 px for 4 epochs, minutes on a CPU); with it, every default is the original script's, except
``--model``, whose original default (``deit_base_patch16_224``) has no masked-image-modelling head:
it stays ``beit_tiny_patch16_224_8k_vocab`` (the seeds' commands pass ``--model`` explicitly).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mcbeit.config.fields import Group, bool_flag, flag
from mcbeit.config.run import CompileConfig, ImageFolderData, OptimConfig, RunConfig, at_least
from mcbeit.errors import ConfigError

TOKENIZER_KINDS = ("dall-e", "vqgan", "vqgan_gumbel_f8_8192", "vqgan_ema", "customized", "vqkd")
RECOMPUTE_MODES = ("selective", "full", "none")  # mcbeit.models.recompute (kept torch-free here)


@dataclass(frozen=True)
class PretrainDataConfig(ImageFolderData):
    EMBEDDED: ClassVar[dict[str, Any]] = {"input_size": 112, "second_input_size": 56}

    input_size: int = flag(224, "image size for the ViT")
    second_input_size: int = flag(112, "image size for the tokenizer (the ViT's patch grid x its downsampling)")
    train_interpolation: str = flag("bicubic", "resize filter of the ViT's view (random, bilinear, bicubic, lanczos)")
    second_interpolation: str = flag("lanczos", "resize filter of the tokenizer's view")
    imagenet_default_mean_and_std: bool = flag(False, "normalise the ViT's view with ImageNet's mean/std (else 0.5/0.5)")
    color_jitter: float = flag(0.0, "brightness / contrast / saturation jitter of the whole image before the flip and "
                                    "the crop (0: off; unilm's BEiT hard-codes 0.4, mc-BEiT has none)")


@dataclass(frozen=True)
class TokenizerChoice(Group):
    TITLE: ClassVar[str] = "tokenizer"
    #: the tokenizer kind when weights are given and --discrete_vae_type is not (the entry point's original)
    DEFAULT_TOKENIZER: ClassVar[str] = "vqgan"

    discrete_vae_weight_path: str | None = flag(
        None, "tokenizer weights: a VQGAN log folder (model.yaml + last.ckpt), a DALL-E folder (encoder.pkl), a "
              "customized tokenizer file, or a VQ-KD file (BEiT v2's tokenizer: unilm's vqkd_encoder_*.pth, "
              "mmpretrain's vqkd_encoder.pth, a checkpoint of mcbeit-vqkd)",
        show_default="none: a RANDOM tokenizer (smoke runs only)")
    discrete_vae_type: str | None = flag(
        None, f"one of {', '.join(TOKENIZER_KINDS)} (vqkd: soft targets softmax(100 cos / --temp) over the VQ-KD "
              "codebook; --second_input_size = --input_size, VQ-KD sees 16-pixel patches)",
        aliases=("--tokenizer_type",),
        show_default="the original's with --discrete_vae_weight_path, else 'customized' (a small random tokenizer "
                     "that keeps the no-argument run fast)")


@dataclass(frozen=True)
class PretrainModelConfig(Group):
    TITLE: ClassVar[str] = "model"

    model: str = flag("beit_tiny_patch16_224_8k_vocab",
                      "beit_{tiny,small,base,large}_patch16_224_8k_vocab (the original's default deit_base_patch16_224 "
                      "has no masked-image-modelling head)")
    rel_pos_bias: bool = flag(True, "one relative position bias shared by all blocks",
                              negation="--disable_rel_pos_bias", negation_help="no shared relative position bias")
    abs_pos_emb: bool = flag(False, "absolute position embedding")
    layer_scale_init_value: float = flag(0.1, "layer scale initial value: 0.1 for base, 1e-5 for large; 0 disables it")
    drop_path: float = flag(0.0, "stochastic depth rate")
    recompute: str = flag("selective", "activations backward recomputes: selective keeps matrix-product outputs and "
                                       "recomputes norms, GELU and softmax (a third less memory, ~3% slower on a "
                                       "CPU); full recomputes whole blocks; none keeps everything",
                          choices=RECOMPUTE_MODES, experiment=False)


@dataclass(frozen=True)
class MaskConfig(Group):
    TITLE: ClassVar[str] = "masking"
    EMBEDDED: ClassVar[dict[str, Any]] = {"num_mask_patches": 19}

    mask_type: str = flag("block", "block: BEiT's block-wise masking; random: --mask_ratio of the patches; "
                                   "random_mps32: --mask_ratio of 32-pixel cells (2x2 patches; ConMIM's recipe; "
                                   "--input_size a multiple of 32)", choices=("block", "random", "random_mps32"))
    num_mask_patches: int = flag(75, "patches masked per image (block masking)")
    max_mask_patches_per_block: int | None = flag(None, "largest block (block masking)", type=int,
                                                  show_default="--num_mask_patches")
    min_mask_patches_per_block: int = flag(16, "smallest block (block masking)")
    mask_ratio: float = flag(0.75, "fraction of the patches (random) or of the 2x2-patch cells (random_mps32, "
                                   "rounded up) masked")


@dataclass(frozen=True)
class ObjectiveConfig(Group):
    TITLE: ClassVar[str] = "objective"

    omega: float = flag(0.2, "weight of the inter-patch refined target (mc-BEiT)")
    temp: float = flag(4.0, "tokenizer softmax temperature (mc-BEiT)")
    temp_warmup: float = flag(4.0, "temperature at epoch 0, warmed linearly to --temp (mc-BEiT)")
    temp_warmup_epochs: int = flag(30, "length of the temperature warm-up, in epochs (the original's constant)")
    hard_targets: bool = flag(False, "BEiT's loss: cross-entropy on the tokenizer's hard token ids")
    detach_similarity: bool = flag(False, "stop the gradient through the inter-patch similarity (the reference lets "
                                          "it flow)")
    no_loss_masked: bool = flag(False, "accepted for compatibility; the original never reads it", experiment=False)


@dataclass(frozen=True)
class MonitorConfig(Group):
    """The k-NN monitor (mcbeit.evaluation.monitor): how good the student's frozen features are, while it trains."""

    TITLE: ClassVar[str] = "evaluation"
    EMBEDDED: ClassVar[dict[str, Any]] = {"eval_freq": 1}

    eval_data_path: str | None = flag(
        None, "labelled val split for the k-NN monitor: class folders, or a root with val/ or val_map.txt; the train "
              "split is --data_path's class folders", show_default="detected: <data_path>/val or val_map.txt, else a "
              "sibling ../val; the monitor is off (said once) when there is no labelled split", experiment=False)
    eval_freq: int = flag(10, "measure weighted k-NN on the frozen features every N epochs and after the last "
                              "(0: never)", experiment=False)
    eval_block: int | None = flag(None, "the intermediate block whose features are also measured, 0-based (as "
                                        "mcbeit-knn --block; mcbeit-linprobe --probe_layer B+1)", type=int,
                                  show_default="three quarters deep: 8 of 0..11", experiment=False)
    eval_linear: bool = flag(False, "also fit a quick linear probe on the same features (seconds on a CPU for "
                                    "thousands of images)", experiment=False)
    nb_knn: tuple[int, ...] = flag((20,), "k of the k-NN (DINO's protocol); the first is the headline's", nargs="+",
                                   type=int, experiment=False)
    knn_temperature: float = flag(0.07, "k-NN vote weights exp(cosine / T)", experiment=False)
    knn_images_per_class: int = flag(100, "train images per class the monitor's classifiers fit on, drawn once "
                                          "(0: all; ImageNet at 100 is 100,000 images)", experiment=False)

    def check_monitor(self) -> None:
        if self.eval_freq < 0 or self.knn_images_per_class < 0:
            raise ConfigError("--eval_freq and --knn_images_per_class must be at least 0")
        if not self.nb_knn or min(self.nb_knn) < 1:
            raise ConfigError(f"--nb_knn {' '.join(map(str, self.nb_knn))}: every k must be at least 1")
        if self.knn_temperature <= 0:
            raise ConfigError(f"--knn_temperature {self.knn_temperature}: must be positive")
        if self.eval_block is not None and self.eval_block < 0:
            raise ConfigError(f"--eval_block {self.eval_block}: blocks are numbered from 0")


@dataclass(frozen=True)
class PretrainConfig(MonitorConfig, ObjectiveConfig, MaskConfig, PretrainModelConfig, TokenizerChoice, PretrainDataConfig,
                     CompileConfig, OptimConfig, RunConfig):
    """mc-BEiT pre-training (`run_mcbeit_pretraining.py`, `mcbeit-pretrain`)."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"epochs": 4, "warmup_epochs": 1, "save_ckpt_freq": 2, "batch_size": 32}
    #: the pre-training method (mcbeit.methods) this entry point runs
    METHOD: ClassVar[str] = "mcbeit"

    output_dir: str = flag("./output/mcbeit_pretrained", "where checkpoints, log.txt and tensorboard/ go; '' writes "
                                                         "nothing", experiment=False)

    def derive(self, given: set[str]) -> "PretrainConfig":
        """Fill the values that follow from others."""
        kind = self.discrete_vae_type
        if kind is None:
            kind = self.DEFAULT_TOKENIZER if self.discrete_vae_weight_path else "customized"
        return dataclasses.replace(self, discrete_vae_type=kind, weight_decay_end=self.final_weight_decay,
                                   log_dir=self.tensorboard_dir)

    def check(self) -> None:
        self.check_run()
        self.check_optim()
        self.check_monitor()
        at_least(self, 1, ("input_size", "second_input_size", "temp_warmup_epochs"))
        if not 0.0 <= self.color_jitter:
            raise ConfigError(f"--color_jitter must be at least 0, got {self.color_jitter}")


@dataclass(frozen=True)
class BeitPretrainConfig(PretrainConfig):
    """BEiT pre-training (`run_beit_pretraining.py`, `mcbeit-pretrain-beit`): hard visual-token targets
    and the DALL-E tokenizer, with the defaults of unilm's `beit/run_beit_pretraining.py` and
    `beit/datasets.py` (at their newest commit, unchanged since 2022-01) where they differ from
    mc-BEiT's: drop path 0.1, AdamW betas (0.9, 0.999), ColorJitter(0.4, 0.4, 0.4) before the flip,
    `beit_base_patch16_224_8k_vocab` (the embedded run keeps the tiny model), and its own output folder."""

    DEFAULT_TOKENIZER: ClassVar[str] = "dall-e"
    METHOD: ClassVar[str] = "beit"
    EMBEDDED: ClassVar[dict[str, Any]] = {"model": "beit_tiny_patch16_224_8k_vocab"}

    output_dir: str = flag("./output/beit_pretrained", "where checkpoints, log.txt and tensorboard/ go (not mc-BEiT's "
                                                       "folder: another experiment); '' writes nothing",
                           experiment=False)
    model: str = flag("beit_base_patch16_224_8k_vocab", "beit_{tiny,small,base,large}_patch16_224_8k_vocab")
    drop_path: float = flag(0.1, "stochastic depth rate")
    opt_betas: tuple[float, ...] | None = flag((0.9, 0.999), "optimizer betas", nargs="+", type=float)
    color_jitter: float = flag(0.4, "brightness / contrast / saturation jitter of the whole image before the flip and "
                                    "the crop, as unilm's BEiT (which hard-codes it); 0 turns it off")
    hard_targets: bool = flag(True, "BEiT's loss: cross-entropy on the tokenizer's hard token ids (always on here)")


#: the random VQ-KD tokenizer of runs without --tokenizer_weight when --tokenizer_model is not given (fast)
RANDOM_VQKD_MODEL = "vqkd_encoder_tiny_decoder_1x192x3"
V2_MODEL_SUFFIX = "_cls_pt"




@dataclass(frozen=True)
class VQKDTokenizerFlags(Group):
    TITLE: ClassVar[str] = "tokenizer"

    tokenizer_weight: str | None = flag(
        None, "the VQ-KD tokenizer: unilm's vqkd_encoder_*.pth (weights under 'model' or 'state_dict'), mmpretrain's "
              "vqkd_encoder.pth, or a checkpoint / export of mcbeit-vqkd",
        show_default="none: a RANDOM tokenizer (smoke runs only)")
    tokenizer_model: str | None = flag(
        None, "VQ-KD architecture, vqkd_encoder_{tiny,small,base,large}_decoder_{depth}x{width}x{heads}[_{teacher}]; "
              "with --tokenizer_weight it must be the file's (its shapes say it)", type=str,
        show_default=f"the file's (unilm's vqkd_encoder_base_decoder_3x768x12_clip, which its released files are); "
                     f"without --tokenizer_weight {RANDOM_VQKD_MODEL}")
    codebook_size: int | None = flag(None, "codes in the tokenizer's codebook (= the student's vocabulary); must be the "
                                           "file's", type=int, show_default="the file's (unilm: 8192); 8192 when random")
    codebook_dim: int | None = flag(None, "dimension of a code; must be the file's", type=int,
                                    show_default="the file's (unilm: 32); 32 when random")


@dataclass(frozen=True)
class PatchAggregationFlags(Group):
    TITLE: ClassVar[str] = "model"

    early_layers: int = flag(9, "patch aggregation: the patch tokens after this many blocks (9 for base, 21 for large) "
                                "join the last block's CLS in the head layers (models *_cls_pt)")
    head_layers: int = flag(2, "patch aggregation: blocks of the aggregation head (models *_cls_pt)")
    shared_lm_head: bool = flag(True, "the aggregated stream uses the main stream's norm and lm_head (True/False, as "
                                      "unilm's bool_flag)", type=bool_flag)


@dataclass(frozen=True)
class BeitV2PretrainConfig(VQKDTokenizerFlags, PatchAggregationFlags, PretrainConfig):
    """BEiT v2 pre-training (`run_beitv2_pretraining.py`, `mcbeit-pretrain-beitv2`): hard VQ-KD code ids as
    targets, patch aggregation for the *_cls_pt models (loss = CE(main) + CE(aggregated), 1 : 1), block
    masking of exactly --num_mask_patches, with the defaults of unilm's `beit2/run_beitv2_pretraining.py`:
    `beit_base_patch16_224_8k_vocab` (as there: a model without _cls_pt trains BEiT's single loss on VQ-KD
    targets; the released recipe passes `beit_base_patch16_224_8k_vocab_cls_pt`), drop path 0.1, AdamW's own
    betas (0.9, 0.999), lr 5e-4 not scaled by the batch, ColorJitter(0.4, 0.4, 0.4) before the flip and the
    crop, crop scale (--min_crop_scale, 1), --second_input_size 224, its own output folder. The embedded run:
    the tiny *_cls_pt model at 112 px with a random tiny VQ-KD tokenizer, 2 epochs (the tokenizer is a
    12-block ViT, so an epoch costs about twice mc-BEiT's)."""

    METHOD: ClassVar[str] = "beitv2"
    EMBEDDED: ClassVar[dict[str, Any]] = {"model": "beit_tiny_patch16_224_8k_vocab_cls_pt", "second_input_size": 112,
                                          "epochs": 2}

    output_dir: str = flag("./output/beitv2_pretrained", "where checkpoints, log.txt and tensorboard/ go (not "
                                                         "mc-BEiT's folder: another experiment); '' writes nothing",
                           experiment=False)
    model: str = flag("beit_base_patch16_224_8k_vocab",
                      "beit_{tiny,small,base,large}_patch16_224_8k_vocab_cls_pt (BEiT v2: patch aggregation, two "
                      "losses), or beit_*_patch16_224_8k_vocab (one loss, BEiT's model on VQ-KD targets)")
    second_input_size: int = flag(224, "image size for the tokenizer (= --input_size: VQ-KD has 16-pixel patches)")
    drop_path: float = flag(0.1, "stochastic depth rate")
    opt_betas: tuple[float, ...] | None = flag(None, "optimizer betas", nargs="+", type=float,
                                               show_default="the optimizer's own: (0.9, 0.999) for AdamW")
    color_jitter: float = flag(0.4, "brightness / contrast / saturation jitter of the whole image before the flip and "
                                    "the crop, as unilm's BEiT v2 (which hard-codes 0.4); 0 turns it off")
    min_crop_scale: float = flag(0.08, "smallest area fraction of the random-resized crop (unilm's recipe: 0.2)")
    decoupling_aug: bool = flag(False, "accepted for compatibility (True/False); unilm parses it and never reads it, "
                                       "True is refused here", type=bool_flag)
    hard_targets: bool = flag(True, "hard VQ-KD code ids as targets (always on here)")

    def derive(self, given: set[str]) -> "BeitV2PretrainConfig":
        config = super().derive(given)
        if "discrete_vae_type" not in given:  # v2's tokenizer is VQ-KD (recorded so in checkpoints' args)
            config = dataclasses.replace(config, discrete_vae_type="vqkd")
        if not self.tokenizer_weight and "tokenizer_model" not in given:
            config = dataclasses.replace(config, tokenizer_model=RANDOM_VQKD_MODEL)
        return config

    def check(self) -> None:
        super().check()
        if self.decoupling_aug:
            raise ConfigError("--decoupling_aug True is not implemented (unilm's script parses it but never uses it): "
                              "leave it out or pass --decoupling_aug False")
        if self.discrete_vae_weight_path:
            both = " and --tokenizer_weight" if self.tokenizer_weight else ""
            raise ConfigError(f"--discrete_vae_weight_path{both}: BEiT v2 reads its VQ-KD tokenizer from "
                              "--tokenizer_weight only; for mc-BEiT's soft targets over a VQ-KD codebook run "
                              "mcbeit-pretrain --discrete_vae_type vqkd --discrete_vae_weight_path FILE")
        if self.discrete_vae_type != "vqkd":
            raise ConfigError(f"--discrete_vae_type {self.discrete_vae_type}: BEiT v2's targets come from a VQ-KD "
                              "tokenizer (--tokenizer_weight); leave --discrete_vae_type out")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ConfigError(f"--min_crop_scale must lie in (0, 1], got {self.min_crop_scale}")
        at_least(self, 1, ("codebook_size", "codebook_dim"))
        at_least(self, 0, ("head_layers",))
        if self.model.endswith(V2_MODEL_SUFFIX) and self.early_layers < 1:
            raise ConfigError(f"--early_layers must be at least 1, got {self.early_layers}")


@dataclass(frozen=True)
class ConMIMObjective(Group):
    TITLE: ClassVar[str] = "objective"

    temp: float = flag(0.1, "temperature of the patch contrast (logits = cosine / temp)")
    t_momentum: float = flag(0.996, "teacher momentum at the first update, raised to 1 on a cosine over the run")
    no_loss_masked: bool = flag(False, "accepted for compatibility; the original never reads it (the loss is over the "
                                       "masked patches)", experiment=False)


@dataclass(frozen=True)
class UnusedTokenizerFlags(Group):
    TITLE: ClassVar[str] = "tokenizer"

    discrete_vae_weight_path: str | None = flag(None, "accepted for compatibility: ConMIM has no tokenizer (the "
                                                      "original parses the flag and never reads it)", experiment=False)
    discrete_vae_type: str = flag("dall-e", "accepted for compatibility, unused", experiment=False)


@dataclass(frozen=True)
class ProjectorFlags(Group):
    TITLE: ClassVar[str] = "model"

    proj_hidden_dim: int = flag(4096, "hidden width of the projector MLP (the original's constant; ours as a flag)")
    proj_dim: int = flag(256, "output width of the projector MLP (the original's constant; ours as a flag)")


@dataclass(frozen=True)
class ConMIMPretrainConfig(MonitorConfig, ConMIMObjective, MaskConfig, ProjectorFlags, PretrainModelConfig,
                           UnusedTokenizerFlags, PretrainDataConfig, CompileConfig, OptimConfig, RunConfig):
    """ConMIM pre-training (`run_conmim_pretraining.py`, `mcbeit-pretrain-conmim`): denoising patch contrast
    against an EMA teacher (TencentARC/ConMIM), with the original script's defaults: block masking of 75
    patches (its README recipe passes --mask_type random_mps32 --mask_ratio 0.75), layer scale 0.1, drop path
    0, AdamW betas (0.9, 0.98), lr 5e-4 not scaled by the batch, warm-up 5 epochs, 300 epochs, --temp 0.1,
    --t_momentum 0.996. --model conmim_{tiny,small,base,large}_patch16_224 (the original's default,
    deit_base_patch16_224, has no projector; tiny is ours). The embedded run: the tiny model at 128 px with the
    recipe's random_mps32 masks (4x4 cells) and a 1024-wide projector (4096 triples its step on a CPU), 4 epochs."""

    TITLE: ClassVar[str] = "run"
    EMBEDDED: ClassVar[dict[str, Any]] = {"epochs": 4, "warmup_epochs": 1, "save_ckpt_freq": 2, "batch_size": 32,
                                          "model": "conmim_tiny_patch16_224", "input_size": 128,
                                          "mask_type": "random_mps32", "proj_hidden_dim": 1024}
    METHOD: ClassVar[str] = "conmim"

    output_dir: str = flag("./output/conmim_pretrained", "where checkpoints (checkpoint-<epoch>.pth: student, "
                                                         "teacher, optimizer; checkpoint_copy-<epoch>.pth: the "
                                                         "teacher alone, the file to fine-tune), log.txt and "
                                                         "tensorboard/ go; '' writes nothing", experiment=False)
    model: str = flag("conmim_base_patch16_224", "conmim_{tiny,small,base,large}_patch16_224")
    resume_copy: str = flag("", "the EMA teacher's checkpoint_copy-<epoch>.pth to start or resume with (the "
                                "original's flag)", show_default="the teacher inside the resumed "
                            "checkpoint-<epoch>.pth, or the checkpoint_copy-<epoch>.pth beside it", experiment=False)
    color_jitter: float = flag(0.0, "not used by ConMIM (the teacher's view has the original's fixed perturbation); "
                                    "must stay 0")
    second_input_size: int = flag(112, "accepted for compatibility: the original resizes a second view it never "
                                       "uses; nothing is resized here", experiment=False)

    def derive(self, given: set[str]) -> "ConMIMPretrainConfig":
        return dataclasses.replace(self, weight_decay_end=self.final_weight_decay, log_dir=self.tensorboard_dir)

    def check(self) -> None:
        self.check_run()
        self.check_optim()
        self.check_monitor()
        at_least(self, 1, ("input_size", "proj_dim", "proj_hidden_dim"))
        if self.color_jitter:
            raise ConfigError(f"--color_jitter {self.color_jitter}: ConMIM perturbs the teacher's view with the "
                              "original's fixed jitter / grayscale / blur / solarize; leave --color_jitter out")
        if self.temp <= 0:
            raise ConfigError(f"--temp must be positive, got {self.temp}")
        if not 0.0 <= self.t_momentum <= 1.0:
            raise ConfigError(f"--t_momentum must lie in [0, 1], got {self.t_momentum}")


def changed_defaults(cls: type, base: type = PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose default ``cls`` changes from ``base``: name -> (base's, cls's)."""
    mine = {f.name: f.default for f in dataclasses.fields(cls)}
    return {f.name: (f.default, mine[f.name]) for f in dataclasses.fields(base) if mine[f.name] != f.default}
