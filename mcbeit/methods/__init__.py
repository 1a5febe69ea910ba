"""Pre-training methods: what produces the targets, the student's heads, the objective.

``METHODS`` maps a method's name to its class; the pre-training task runs any of them through the
one engine (see ``docs/ADDING_A_METHOD.md`` to add one).
"""
from __future__ import annotations

from typing import Any

from mcbeit.errors import ConfigError
from mcbeit.methods.base import PretrainMethod
from mcbeit.methods.beitv2 import BeitV2Targets
from mcbeit.methods.conmim import ConMIM
from mcbeit.methods.tokenizer_targets import BeitTargets, TokenizerTargets

METHODS: dict[str, type[PretrainMethod]] = {"mcbeit": TokenizerTargets, "beit": BeitTargets, "beitv2": BeitV2Targets,
                                         "conmim": ConMIM}

__all__ = ["METHODS", "PretrainMethod", "build_method"]


def build_method(name: str, config: Any) -> PretrainMethod:
    """The method called ``name``, over ``config``."""
    try:
        return METHODS[name](config)
    except KeyError:
        raise ConfigError(f"unknown pre-training method {name!r}: choose one of {sorted(METHODS)}") from None
