"""Typed, frozen configurations of the long runs, built from the original scripts' flags
(:mod:`mcbeit.config.fields`); torch-free, so that ``--help`` is fast."""
from mcbeit.config.fields import add_arguments, as_flags, flag, resolve
from mcbeit.config.run import CompileConfig, OptimConfig, RunConfig

__all__ = ["CompileConfig", "OptimConfig", "RunConfig", "add_arguments", "as_flags", "flag", "resolve"]
