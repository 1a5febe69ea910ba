"""BEiT / mc-BEiT pre-training backbone: a small subclass of timm's ``Beit``.

timm's ``Beit`` already is the BEiT ViT with the released checkpoints' parameter names. The
pre-training model only adds what masked image modelling needs:

* ``mask_token`` (1, 1, D): replaces the embeddings of masked patches before the blocks,
  ``x = x * (1 - w) + mask_token * w`` exactly as the original;
* ``lm_head = Linear(D, vocab_size)``, applied to the masked rows only;
* the original initialisation (truncated normal cut at +-1 std, rescaled residual projections);
* ``no_weight_decay() == {'pos_embed', 'cls_token'}`` (timm's also lists the relative tables).

It is built with ``num_classes=0, global_pool=''`` so that ``norm`` is the final LayerNorm and the
state dict has no ``head``/``fc_norm``: the keys are those of the released pre-training
checkpoints, minus the ``relative_position_index`` buffers (non-persistent in timm).

timm lacks a hook between the patch embedding and the CLS concatenation, so
``forward_features`` is re-stated here (a dozen lines) with the mask replacement in it.

BEiT v2's model, :class:`BeitV2ForMaskedImageModeling`, adds patch aggregation (``cls_pt_layers``) to it;
ConMIM's, :class:`ConMIMForMaskedImageModeling`, a projector MLP on every token.

Registered with timm here: ``beit_{tiny,small,base,large}_patch16_224_8k_vocab`` (this model),
``beit_{tiny,small,base,large}_patch16_224_8k_vocab_cls_pt`` (BEiT v2's),
``conmim_{tiny,small,base,large}_patch16_224`` (ConMIM's) and the
classification sizes timm lacks, ``beit_{tiny,small}_patch16_224`` (plain ``Beit``). Their weights
load through the BEiT family's one conversion, :mod:`mcbeit.models.beit_weights`:
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` gives the tensors
``--finetune`` and ``mcbeit.models.load_pretrained(model, file)`` give. timm's own names
(``beit_base_patch16_224``, ...) keep timm's loader; that module's doc says what it does differently.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, Optional, Set, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.beit import Beit, Block

from mcbeit.models.beit_weights import build_beit

try:  # timm >= 1.0.2x exports its use_reentrant=False wrapper
    from timm.models import checkpoint as _checkpoint
except ImportError:  # pragma: no cover - older timm
    import torch.utils.checkpoint

    def _checkpoint(function, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

__all__ = ['BeitForMaskedImageModeling', 'BeitV2ForMaskedImageModeling', 'ConMIMForMaskedImageModeling', 'patch_size_of']

_logger = logging.getLogger(__name__)


def patch_size_of(model_name: str) -> Optional[int]:
    """The patch size a BEiT model name builds, read from the name without building the model
    (``beit_base_patch16_224`` -> 16); None when the name does not say (every BEiT name of timm and
    of this package does)."""
    match = re.search(r'_patch(\d+)', str(model_name))
    return int(match.group(1)) if match else None


def _check_original_arguments(qk_scale, attn_head_dim, global_pool, drop_block_rate) -> None:
    """Arguments of the original constructor that timm's ``Beit`` cannot honour: an error, or (drop block) ignored."""
    if qk_scale is not None:
        raise ValueError('qk_scale is not supported: timm scales attention by head_dim ** -0.5')
    if attn_head_dim is not None:
        raise ValueError('attn_head_dim is not supported by timm.models.beit.Beit')
    if global_pool not in (None, ''):
        raise ValueError(
            f"global_pool={global_pool!r}: the pre-training model has no pooling/head; "
            "build a classification Beit (e.g. beit_base_patch16_224) for that")
    if drop_block_rate:
        _logger.debug('drop_block_rate=%s ignored (not used by BEiT)', drop_block_rate)


class BeitForMaskedImageModeling(Beit):
    """BEiT ViT with a mask token and a visual-token prediction head (``lm_head``).

    Constructor arguments follow the original ``VisionTransformerForMaskedImageModeling``
    (``vocab_size``, ``drop_rate``, ``drop_path_rate``, ``init_values``, ``use_abs_pos_emb``,
    ``use_rel_pos_bias``, ``use_shared_rel_pos_bias``, ``init_std``); ``num_classes`` and
    ``drop_block_rate`` (passed by the original scripts / timm's factory) are accepted and ignored.
    Any further keyword goes to timm's ``Beit`` unchanged.
    """

    def __init__(
            self,
            img_size=224,
            patch_size=16,
            in_chans: int = 3,
            vocab_size: int = 8192,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True, qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[type] = None,
            init_values: Optional[float] = None,
            attn_head_dim: Optional[int] = None,
            use_abs_pos_emb: bool = True,
            use_rel_pos_bias: bool = False,
            use_shared_rel_pos_bias: bool = False,
            init_std: float = 0.02,
            num_classes: Optional[int] = None,  # tolerated, dropped (the original pops it)
            global_pool: Optional[str] = None,
            drop_block_rate: Optional[float] = None,  # tolerated, dropped (timm 0.3 factory arg)
            device=None, dtype=None,
            **kwargs: Any,
    ):
        _check_original_arguments(qk_scale, attn_head_dim, global_pool, drop_block_rate)
        if norm_layer is not None:
            kwargs['norm_layer'] = norm_layer  # default: timm LayerNorm, eps 1e-6 as the original
        if device is not None or dtype is not None:  # only newer timm takes these
            kwargs.update(device=device, dtype=dtype)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool='',
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            drop_rate=0.,
            pos_drop_rate=drop_rate,  # the original's drop_rate: after pos embed and in the blocks
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            init_values=init_values,
            use_abs_pos_emb=use_abs_pos_emb,
            use_rel_pos_bias=use_rel_pos_bias,
            use_shared_rel_pos_bias=use_shared_rel_pos_bias,
            use_fc_norm=False,
            **kwargs,
        )
        dd = {'device': device, 'dtype': dtype}
        self.vocab_size, self.init_std = vocab_size, init_std
        # what a further block of this model is built with (BEiT v2's cls_pt_layers)
        self._block_kwargs = dict(
            dim=embed_dim, num_heads=num_heads, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio,
            scale_mlp=kwargs.get('scale_mlp', False), swiglu_mlp=kwargs.get('swiglu_mlp', False),
            proj_drop=drop_rate, attn_drop=attn_drop_rate, init_values=init_values,
            norm_layer=kwargs.get('norm_layer', LayerNorm),
            window_size=self.patch_embed.grid_size if use_rel_pos_bias else None, **dd)
        self._drop_path_rate = drop_path_rate
        self.mask_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))  # (1,1,D)
        self.lm_head = nn.Linear(embed_dim, vocab_size, **dd)  # D -> V
        self.init_weights(needs_reset=False)

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, needs_reset: bool = True) -> None:
        """The original pre-training initialisation (replaces timm's).

        ``trunc_normal_(std, a=-std, b=std)`` for pos_embed, cls_token, mask_token, every Linear
        weight (lm_head included) and the patch-embedding conv; biases 0; LayerNorm 1/0; then
        ``fix_init_weight`` divides blocks[i].attn.proj / mlp.fc2 weights by sqrt(2 (i+1)).
        Relative position tables, q_bias/v_bias start at 0 and layer scales at ``init_values``
        (set by timm's modules; re-done here when ``needs_reset``).
        """
        if not hasattr(self, 'lm_head'):
            return  # called from Beit.__init__ before our parameters exist: done once at the end
        std = self.init_std
        keep = {id(m) for m in self._default_init_modules()}
        for m in self.modules():
            if id(m) not in keep:
                self._init_module(m, needs_reset)
        for p in (self.pos_embed, self.cls_token, self.mask_token):
            if p is not None:
                trunc_normal_(p, std=std, a=-std, b=std)
        self.fix_init_weight()

    def _init_module(self, m: nn.Module, needs_reset: bool) -> None:
        """The original's ``_init_weights`` of one module."""
        std = self.init_std
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std, a=-std, b=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif needs_reset and hasattr(m, 'reset_parameters'):
            m.reset_parameters()  # Attention (q/v bias, tables), Block (gammas), RelativePositionBias

    def _default_init_modules(self) -> Tuple[nn.Module, ...]:
        """Modules the original builds after its initialisation ran (PyTorch's default init): none here."""
        return ()

    # ------------------------------------------------------------------ optimiser helpers
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """As the original: only these two (mask_token, lm_head and the tables DO get decay)."""
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|^mask_token|^pos_embed|^patch_embed|^rel_pos_bias',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,)), (r'^lm_head', (99999,))],
        )

    def get_num_layers(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B,3,H,W), bool_masked_pos (B,N) bool or None -> tokens (B,1+N,D) after the final norm."""
        x, rel_pos_bias = self._embed(x, bool_masked_pos)
        for blk in self.blocks:
            x = self._block(blk, x, rel_pos_bias)
        return self.norm(x)  # (B,1+N,D)

    def _embed(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokens (B,1+N,D) entering the first block (masked patches replaced by the mask token) and the
        shared relative position bias (heads,1+N,1+N) or None."""
        x = self.patch_embed(x)  # (B,N,D)
        B, N, _ = x.shape
        if bool_masked_pos is not None:
            w = bool_masked_pos.reshape(B, N, 1).type_as(self.mask_token)  # (B,N,1) 1 = masked
            x = x * (1 - w) + self.mask_token.expand(B, N, -1) * w  # (B,N,D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B,1+N,D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)

        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (heads,1+N,1+N)
        return x, rel_pos_bias

    def _block(self, blk: nn.Module, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """One block (recomputed in backward under ``set_grad_checkpointing``)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return _checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias)
        return blk(x, shared_rel_pos_bias=rel_pos_bias)

    def _check_mask(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """bool_masked_pos (B,N) or (B,h,w), any dtype -> (B,N) bool; a wrong patch count is a ValueError."""
        mask = bool_masked_pos.reshape(x.shape[0], -1)  # (B,N)
        if mask.dtype != torch.bool:
            mask = mask.bool()
        if mask.shape[1] != self.patch_embed.num_patches:
            raise ValueError(
                f'bool_masked_pos has {mask.shape[1]} positions per image, the model has '
                f'{self.patch_embed.num_patches} patches')
        return mask

    def extract_feat(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The features the method reads (mmpretrain's name): x (B,3,H,W), an optional mask (B,N) or (B,h,w) ->
        tokens (B,1+N,D) after the final norm, CLS first (what ``lm_head`` / ConMIM's projector take)."""
        mask = None if bool_masked_pos is None else self._check_mask(x, bool_masked_pos)
        return self.forward_features(x, mask)  # (B,1+N,D)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W); bool_masked_pos (B,N) (or (B,h,w)) bool.

        Returns features (B,N,D) after the final norm without CLS, and masked_logits (M,V) =
        lm_head(features[bool_masked_pos]), rows in the order of ``bool_masked_pos.nonzero()``.
        """
        mask = self._check_mask(x, bool_masked_pos)  # (B,N)
        features = self.forward_features(x, mask)[:, self.num_prefix_tokens:]  # (B,N,D)
        masked_logits = self.lm_head(features[mask])  # (M,D) -> (M,V)
        return features, masked_logits



class BeitV2ForMaskedImageModeling(BeitForMaskedImageModeling):
    """BEiT v2's pre-training model: BEiT's MIM model plus patch aggregation (unilm's
    ``VisionTransformerForMaskedImageModelingCLS``, beit2/modeling_pretrain.py).

    The patch tokens after block ``early_layers`` (1-based: the output of ``blocks[early_layers - 1]``,
    before any norm) and the CLS token after the last block (before the norm) form a second sequence
    that goes through ``head_layers`` more blocks, ``cls_pt_layers``, which use the shared relative
    position bias. Both sequences go through the final ``norm`` and ``lm_head`` (``shared_lm_head``;
    otherwise the second one has its own ``cls_pt_norm`` and ``cls_pt_lm_head``). The CLS token can
    only help the second sequence's masked patches through what it gathered in the last block, so the
    pre-training pushes the image's summary into it.

    Drop path of ``cls_pt_layers[i]``: ``linspace(0, drop_path_rate, max(depth, early + head))[early + i]``.
    Initialisation, as the original: the original builds ``cls_pt_layers`` *after* its initialisation
    has run, so their Linear layers keep PyTorch's default init (kaiming-uniform weights, uniform
    biases; not the truncated normal of the other blocks), q/v biases 0, layer scales ``init_values``;
    then their ``attn.proj`` and ``mlp.fc2`` weights are divided by ``sqrt(2 (early + i + 1))``.
    :meth:`init_weights` redoes exactly that (it never gives them the truncated normal).
    ``cls_pt_norm`` / ``cls_pt_lm_head`` (non-shared head) get the original's ``_init_weights``.

    The state dict has unilm's keys: BEiT's plus ``cls_pt_layers.{i}.*`` (the blocks' names).
    ``forward_features`` is the main stream only (as timm's meaning: what k-NN and export read).
    """

    def __init__(self, *args: Any, early_layers: int = 6, head_layers: int = 2, shared_lm_head: bool = True,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        depth = len(self.blocks)
        if not 1 <= early_layers <= depth:
            raise ValueError(f'early_layers={early_layers}: the patch tokens are taken after one of blocks 1..{depth}')
        if head_layers < 0:
            raise ValueError(f'head_layers={head_layers} must be at least 0')
        self.early_layers, self.head_layers, self.shared_lm_head = int(early_layers), int(head_layers), bool(shared_lm_head)
        dpr = [v.item() for v in torch.linspace(0, self._drop_path_rate, max(depth, early_layers + head_layers))]
        self.cls_pt_layers = nn.ModuleList([
            Block(drop_path=dpr[i], **self._block_kwargs) for i in range(early_layers, early_layers + head_layers)])
        self.fix_init_cls_pt_weight()
        if not shared_lm_head:
            dim = self.embed_dim
            dd = {k: self._block_kwargs[k] for k in ('device', 'dtype')}
            self.cls_pt_norm = self._block_kwargs['norm_layer'](dim, **dd)
            self.cls_pt_lm_head = nn.Linear(dim, self.vocab_size, **dd)
            for m in (self.cls_pt_norm, self.cls_pt_lm_head):
                self._init_module(m, needs_reset=False)

    def _default_init_modules(self) -> Tuple[nn.Module, ...]:
        return tuple(self.cls_pt_layers.modules()) if hasattr(self, 'cls_pt_layers') else ()

    def init_weights(self, needs_reset: bool = True) -> None:
        """BEiT's initialisation for everything but ``cls_pt_layers``; those get PyTorch's defaults
        (``reset_parameters`` of each module) and :meth:`fix_init_cls_pt_weight`, as the original."""
        super().init_weights(needs_reset)
        if needs_reset and hasattr(self, 'cls_pt_layers'):
            for m in self.cls_pt_layers.modules():
                if hasattr(m, 'reset_parameters'):
                    m.reset_parameters()
            self.fix_init_cls_pt_weight()

    @torch.no_grad()
    def fix_init_cls_pt_weight(self) -> None:
        """``cls_pt_layers[i]``: attn.proj and mlp.fc2 weights divided by sqrt(2 (early_layers + i + 1))."""
        for i, blk in enumerate(self.cls_pt_layers):
            scale = math.sqrt(2.0 * (self.early_layers + i + 1))
            blk.attn.proj.weight.div_(scale)
            blk.mlp.fc2.weight.div_(scale)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        groups = super().group_matcher(coarse)
        groups['blocks'] = [*groups['blocks'], (r'^cls_pt_', (99999,))]
        return groups

    def _trunk(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The blocks: (last block's tokens (B,1+N,D) before the norm, block ``early_layers``' (B,1+N,D), the
        shared relative position bias)."""
        x, rel_pos_bias = self._embed(x, bool_masked_pos)
        early = x
        for i, blk in enumerate(self.blocks):
            x = self._block(blk, x, rel_pos_bias)
            if i + 1 == self.early_layers:
                early = x  # (B,1+N,D) before any norm
        return x, early, rel_pos_bias

    def extract_feat(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """What patch aggregation reads: x (B,3,H,W), an optional mask -> (early, last): the tokens (B,1+N,D) after
        block ``early_layers`` (before any norm) and after the last block and the final norm. (mmpretrain's BEiT
        v2 backbone returns the same two blocks' outputs, the last without the norm, which sits in its neck.)"""
        mask = None if bool_masked_pos is None else self._check_mask(x, bool_masked_pos)
        last, early, _ = self._trunk(x, mask)
        return early, self.norm(last)

    def forward_streams(self, x: torch.Tensor, bool_masked_pos: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W), bool_masked_pos (B,N) bool -> (main, aggregated): the main stream's tokens
        (B,1+N,D) after ``norm``, and the aggregated stream's (B,1+N,D) after ``norm`` (or ``cls_pt_norm``)."""
        x, early, rel_pos_bias = self._trunk(x, bool_masked_pos)
        x_cls_pt = torch.cat([x[:, :1], early[:, self.num_prefix_tokens:]], dim=1)  # (B,1+N,D): CLS + early patches
        for blk in self.cls_pt_layers:
            x_cls_pt = self._block(blk, x_cls_pt, rel_pos_bias)
        norm = self.norm if self.shared_lm_head else self.cls_pt_norm
        return self.norm(x), norm(x_cls_pt)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,3,H,W); bool_masked_pos (B,N) (or (B,h,w)) bool.

        Returns features (B,N,D) of the main stream after ``norm`` without CLS, masked_logits (M,V) =
        lm_head(features[mask]) and masked_logits_cls_pt (M,V) of the aggregated stream (the original's
        ``[lm_head(x[mask]), lm_head(x_cls_pt[mask])]``), rows in the order of ``mask.nonzero()``.
        """
        mask = self._check_mask(x, bool_masked_pos)  # (B,N)
        main, cls_pt = self.forward_streams(x, mask)
        features = main[:, self.num_prefix_tokens:]  # (B,N,D)
        head = self.lm_head if self.shared_lm_head else self.cls_pt_lm_head
        return features, self.lm_head(features[mask]), head(cls_pt[:, self.num_prefix_tokens:][mask])


class ConMIMForMaskedImageModeling(BeitForMaskedImageModeling):
    """ConMIM's pre-training model (TencentARC/ConMIM ``modeling_pretrain.py``, built there with
    ``use_mlp_projectors=True``): BEiT's MIM model plus ``projectors``, an MLP applied to every token
    after the final norm::

        Linear(D, 4096, bias=False) BN ReLU Linear(4096, 4096, bias=False) BN ReLU
        Linear(4096, 256, bias=False) BN(affine=False)

    Plain ``BatchNorm1d`` over the (B * (1+N)) rows of a process's batch, CLS included (as the
    original: no SyncBN). ``lm_head`` exists (the original builds it, so released files have it) but
    ConMIM never uses it; the method freezes it. The projector's Linear weights get the original's
    truncated normal (its ``_init_weights`` runs over them), the BatchNorms PyTorch's 1 / 0.
    The state dict has the original's keys: BEiT's plus ``projectors.{0,1,3,4,6,7}.*``.
    """

    def __init__(self, *args: Any, proj_dim: int = 256, proj_hidden_dim: int = 4096, **kwargs: Any):
        self._proj = (int(proj_hidden_dim), int(proj_dim))
        super().__init__(*args, **kwargs)

    def init_weights(self, needs_reset: bool = True) -> None:
        if not hasattr(self, 'lm_head'):
            return
        if not hasattr(self, 'projectors'):  # built here, before the original initialisation runs over it
            hidden, out = self._proj
            dd = {'device': self.mask_token.device, 'dtype': self.mask_token.dtype}
            self.projectors = nn.Sequential(
                nn.Linear(self.embed_dim, hidden, bias=False, **dd), nn.BatchNorm1d(hidden, **dd), nn.ReLU(inplace=True),
                nn.Linear(hidden, hidden, bias=False, **dd), nn.BatchNorm1d(hidden, **dd), nn.ReLU(inplace=True),
                nn.Linear(hidden, out, bias=False, **dd), nn.BatchNorm1d(out, affine=False, **dd))
        super().init_weights(needs_reset)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        groups = super().group_matcher(coarse)
        groups['blocks'] = [*groups['blocks'], (r'^projectors', (99999,))]
        return groups

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,1+N,D) after the final norm -> (B,N,P) projected patch tokens (CLS projected, then dropped)."""
        B, L, D = tokens.shape
        z = self.projectors(tokens.reshape(B * L, D)).reshape(B, L, -1)  # (B,1+N,P): BN over all B*(1+N) rows
        return z[:, self.num_prefix_tokens:]  # (B,N,P)

    def forward(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W); bool_masked_pos (B,N) bool, or None for an unmasked view (the teacher's).

        Returns features (B,N,D) after the final norm without CLS, and projected (B,N,P) (not normalised)."""
        mask = None if bool_masked_pos is None else self._check_mask(x, bool_masked_pos)
        tokens = self.forward_features(x, mask)  # (B,1+N,D)
        return tokens[:, self.num_prefix_tokens:], self.project(tokens)


# ---------------------------------------------------------------------- registry
def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',  # nothing is downloaded: weights come from files (mcbeit.models.beit_weights)
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'beit_tiny_patch16_224_8k_vocab': _cfg(num_classes=0, classifier='lm_head'),
    'beit_small_patch16_224_8k_vocab': _cfg(num_classes=0, classifier='lm_head'),
    'beit_base_patch16_224_8k_vocab': _cfg(num_classes=0, classifier='lm_head'),
    'beit_large_patch16_224_8k_vocab': _cfg(num_classes=0, classifier='lm_head'),
    'beit_tiny_patch16_224_8k_vocab_cls_pt': _cfg(num_classes=0, classifier='lm_head'),
    'beit_small_patch16_224_8k_vocab_cls_pt': _cfg(num_classes=0, classifier='lm_head'),
    'beit_base_patch16_224_8k_vocab_cls_pt': _cfg(num_classes=0, classifier='lm_head'),
    'beit_large_patch16_224_8k_vocab_cls_pt': _cfg(num_classes=0, classifier='lm_head'),
    'conmim_tiny_patch16_224': _cfg(num_classes=0, classifier='lm_head'),
    'conmim_small_patch16_224': _cfg(num_classes=0, classifier='lm_head'),
    'conmim_base_patch16_224': _cfg(num_classes=0, classifier='lm_head'),
    'conmim_large_patch16_224': _cfg(num_classes=0, classifier='lm_head'),
    'beit_tiny_patch16_224': _cfg(),
    'beit_small_patch16_224': _cfg(),
})


def _create_mim(variant: str, pretrained: bool = False, **kwargs) -> BeitForMaskedImageModeling:
    """``pretrained=True`` loads only a file the caller names (``pretrained_cfg_overlay=dict(file=...)``),
    through :mod:`mcbeit.models.beit_weights` (the conversion of ``--finetune``)."""
    return build_beit(BeitForMaskedImageModeling, variant, pretrained, **kwargs)


_MIM_DEFAULTS = dict(
    patch_size=16, mlp_ratio=4, qkv_bias=True, vocab_size=8192,
    use_abs_pos_emb=False, use_shared_rel_pos_bias=True, use_rel_pos_bias=False, init_values=0.1)


@register_model
def beit_tiny_patch16_224_8k_vocab(pretrained: bool = False, **kwargs) -> BeitForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, embed_dim=192, depth=12, num_heads=3)
    return _create_mim('beit_tiny_patch16_224_8k_vocab', pretrained, **dict(args, **kwargs))


@register_model
def beit_small_patch16_224_8k_vocab(pretrained: bool = False, **kwargs) -> BeitForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, embed_dim=384, depth=12, num_heads=6)
    return _create_mim('beit_small_patch16_224_8k_vocab', pretrained, **dict(args, **kwargs))


@register_model
def beit_base_patch16_224_8k_vocab(pretrained: bool = False, **kwargs) -> BeitForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, embed_dim=768, depth=12, num_heads=12)
    return _create_mim('beit_base_patch16_224_8k_vocab', pretrained, **dict(args, **kwargs))


@register_model
def beit_large_patch16_224_8k_vocab(pretrained: bool = False, **kwargs) -> BeitForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, embed_dim=1024, depth=24, num_heads=16)
    return _create_mim('beit_large_patch16_224_8k_vocab', pretrained, **dict(args, **kwargs))


def _create_mim_v2(variant: str, pretrained: bool = False, **kwargs) -> BeitV2ForMaskedImageModeling:
    return build_beit(BeitV2ForMaskedImageModeling, variant, pretrained, **kwargs)


# BEiT v2 (unilm beit2/run_beitv2_pretraining.py): early_layers 9 (base; 21 for large), head_layers 2, shared head
_V2_DEFAULTS = dict(early_layers=9, head_layers=2, shared_lm_head=True)


@register_model
def beit_tiny_patch16_224_8k_vocab_cls_pt(pretrained: bool = False, **kwargs) -> BeitV2ForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, **_V2_DEFAULTS, embed_dim=192, depth=12, num_heads=3)
    return _create_mim_v2('beit_tiny_patch16_224_8k_vocab_cls_pt', pretrained, **dict(args, **kwargs))


@register_model
def beit_small_patch16_224_8k_vocab_cls_pt(pretrained: bool = False, **kwargs) -> BeitV2ForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, **_V2_DEFAULTS, embed_dim=384, depth=12, num_heads=6)
    return _create_mim_v2('beit_small_patch16_224_8k_vocab_cls_pt', pretrained, **dict(args, **kwargs))


@register_model
def beit_base_patch16_224_8k_vocab_cls_pt(pretrained: bool = False, **kwargs) -> BeitV2ForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, **_V2_DEFAULTS, embed_dim=768, depth=12, num_heads=12)
    return _create_mim_v2('beit_base_patch16_224_8k_vocab_cls_pt', pretrained, **dict(args, **kwargs))


@register_model
def beit_large_patch16_224_8k_vocab_cls_pt(pretrained: bool = False, **kwargs) -> BeitV2ForMaskedImageModeling:
    args = dict(_MIM_DEFAULTS, **dict(_V2_DEFAULTS, early_layers=21), embed_dim=1024, depth=24, num_heads=16)
    return _create_mim_v2('beit_large_patch16_224_8k_vocab_cls_pt', pretrained, **dict(args, **kwargs))


def _create_conmim(variant: str, pretrained: bool = False, **kwargs) -> ConMIMForMaskedImageModeling:
    return build_beit(ConMIMForMaskedImageModeling, variant, pretrained, **kwargs)


# ConMIM (modeling_pretrain.py): BEiT's pre-training arguments, projector 4096 -> 256; tiny is ours (not in the original)
_CONMIM_DEFAULTS = dict(_MIM_DEFAULTS, proj_dim=256, proj_hidden_dim=4096)


@register_model
def conmim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ConMIMForMaskedImageModeling:
    args = dict(_CONMIM_DEFAULTS, embed_dim=192, depth=12, num_heads=3)
    return _create_conmim('conmim_tiny_patch16_224', pretrained, **dict(args, **kwargs))


@register_model
def conmim_small_patch16_224(pretrained: bool = False, **kwargs) -> ConMIMForMaskedImageModeling:
    args = dict(_CONMIM_DEFAULTS, embed_dim=384, depth=12, num_heads=6)
    return _create_conmim('conmim_small_patch16_224', pretrained, **dict(args, **kwargs))


@register_model
def conmim_base_patch16_224(pretrained: bool = False, **kwargs) -> ConMIMForMaskedImageModeling:
    args = dict(_CONMIM_DEFAULTS, embed_dim=768, depth=12, num_heads=12)
    return _create_conmim('conmim_base_patch16_224', pretrained, **dict(args, **kwargs))


@register_model
def conmim_large_patch16_224(pretrained: bool = False, **kwargs) -> ConMIMForMaskedImageModeling:
    args = dict(_CONMIM_DEFAULTS, embed_dim=1024, depth=24, num_heads=16)
    return _create_conmim('conmim_large_patch16_224', pretrained, **dict(args, **kwargs))


def _create_classifier(variant: str, pretrained: bool = False, **kwargs) -> Beit:
    """Plain timm ``Beit`` (same builder arguments as timm's own BEiT entrypoints).

    ``pretrained=True`` loads only weights the caller names on this machine
    (``pretrained_cfg_overlay=dict(file=...)``, ``'local-dir:DIR'``), through
    :mod:`mcbeit.models.beit_weights`: the same tensors as ``--finetune`` gives from that file.
    """
    out_indices = kwargs.pop('out_indices', 3)
    return build_beit(Beit, variant, pretrained, feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
                      **kwargs)


_CLS_DEFAULTS = dict(patch_size=16, mlp_ratio=4, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)


def beit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Beit:
    """BEiT tiny (D192, 12 blocks, 3 heads) classification model, timm's plain ``Beit``."""
    args = dict(_CLS_DEFAULTS, embed_dim=192, depth=12, num_heads=3)
    return _create_classifier('beit_tiny_patch16_224', pretrained, **dict(args, **kwargs))


def beit_small_patch16_224(pretrained: bool = False, **kwargs) -> Beit:
    """BEiT small (D384, 12 blocks, 6 heads) classification model, timm's plain ``Beit``."""
    args = dict(_CLS_DEFAULTS, embed_dim=384, depth=12, num_heads=6)
    return _create_classifier('beit_small_patch16_224', pretrained, **dict(args, **kwargs))


# Register the classification sizes only where timm lacks them: never shadow one of timm's names.
for _fn in (beit_tiny_patch16_224, beit_small_patch16_224):
    if not timm.list_models(_fn.__name__):
        register_model(_fn)
del _fn
