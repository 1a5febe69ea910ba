"""`import mcbeit`: registers the model names with timm, exposes the public names, and stays light
(no torch) so that every command's --help is quick."""
from __future__ import annotations

import subprocess
import sys

import pytest

import mcbeit


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("order", ["import mcbeit, timm", "import timm, mcbeit", "import mcbeit, timm.models"])
def test_import_mcbeit_registers_every_name_with_timm(order):
    out = _python(f"{order}\nimport timm\n"
                  "names = ['beit_tiny_patch16_224_8k_vocab', 'beit_small_patch16_224_8k_vocab', "
                  "'beit_base_patch16_224_8k_vocab', 'beit_large_patch16_224_8k_vocab', 'beit_tiny_patch16_224', "
                  "'beit_small_patch16_224']\n"
                  "print(all(timm.is_model(n) for n in names))\n"
                  "print(type(timm.create_model('beit_tiny_patch16_224_8k_vocab', img_size=32)).__name__)")
    assert out.split() == ["True", "BeitForMaskedImageModeling"]


def test_the_package_and_the_command_lines_import_without_torch():
    """What --help needs: the parsers and configurations import neither torch nor timm."""
    out = _python("import sys, mcbeit, mcbeit.cli.pretrain, mcbeit.cli.finetune, mcbeit.cli.tokenizer, mcbeit.cli.export, "
                  "mcbeit.cli.knn, mcbeit.cli.predict\n"
                  "for p in (mcbeit.cli.pretrain.get_args_parser(), mcbeit.cli.pretrain.get_beit_args_parser(),\n"
                  "          mcbeit.cli.finetune.get_args_parser(), mcbeit.cli.finetune.get_linprobe_parser(),\n"
                  "          mcbeit.cli.tokenizer.get_args_parser(), mcbeit.cli.export.get_args_parser(),\n"
                  "          mcbeit.cli.knn.get_args_parser(), mcbeit.cli.predict.get_args_parser()):\n"
                  "    p.format_help()\n"
                  "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    assert out.strip() == "[]"


def test_public_names_resolve():
    for name in mcbeit.__all__:
        assert getattr(mcbeit, name) is not None, name
    assert mcbeit.build_objective(hard_targets=True).__class__ is mcbeit.HardTokenLoss
    with pytest.raises(AttributeError):
        mcbeit.no_such_name  # noqa: B018


def test_the_torch_free_copies_in_config_match_their_sources():
    """config/ repeats a few constants so that --help needs no torch: they must not drift."""
    from mcbeit.config import pretrain as pc, tokenizer as tc
    from mcbeit.models.recompute import RECOMPUTE_MODES
    from mcbeit.tokenizers import TOKENIZER_ALIASES, TOKENIZER_KINDS
    from mcbeit.tokenizers.custom import VQ_DEFAULT_EMBED_DIM, VQ_DEFAULT_LOGIT_SCALE

    assert pc.RECOMPUTE_MODES == RECOMPUTE_MODES
    assert set(pc.TOKENIZER_KINDS) == set(TOKENIZER_KINDS) | set(TOKENIZER_ALIASES)  # what --help names
    assert (tc.VQ_DEFAULT_EMBED_DIM, tc.VQ_DEFAULT_LOGIT_SCALE) == (VQ_DEFAULT_EMBED_DIM, VQ_DEFAULT_LOGIT_SCALE)
