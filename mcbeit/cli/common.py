"""What every command line shares: the parser of a configuration class, flags -> configuration, and
running a job under the engine's exit-status mapping."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence, TypeVar

from mcbeit.config.fields import add_arguments, resolve

C = TypeVar("C")
_CONFIG_KEY = "_config_class"  # the parser's configuration class, carried in the namespace


def config_parser(prog: str, config_cls: type, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``config_cls``'s flags (see :func:`mcbeit.config.fields.add_arguments`)."""
    parser = argparse.ArgumentParser(prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, config_cls)
    parser.set_defaults(**{_CONFIG_KEY: config_cls})
    return parser


def to_config(args: argparse.Namespace | dict, config_cls: type[C] | None = None) -> C:
    """The frozen configuration of a parsed namespace (flags the user gave; the rest are defaults);
    values out of range or contradicting each other stop with ``SystemExit(message)`` (status 1)."""
    from mcbeit.errors import InputError

    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    cls = given.pop(_CONFIG_KEY, None) or config_cls
    if cls is None:
        raise TypeError("to_config needs the configuration class (the namespace was not made by config_parser)")
    given.pop("command", None)
    try:
        return resolve(cls, given)
    except InputError as exc:
        raise SystemExit(str(exc)) from None


def run_command(job: Callable[[], Any], dist_timeout: float = 30.0, on_exit: Callable[[], None] | None = None) -> int:
    """Run ``job`` under the engine's mapping of exceptions to exit statuses; wrong input stops with
    ``SystemExit(message)``: status 1, the message without a traceback."""
    from mcbeit.engine.exits import INPUT_ERRORS, run_guarded

    try:
        return run_guarded(job, dist_timeout=dist_timeout, on_exit=on_exit)
    except INPUT_ERRORS as exc:
        raise SystemExit(str(exc)) from None


def parse_and_run(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                  run: Callable[[Any], Any]) -> int:
    """``main``: parse ``argv`` (usage errors exit 2, wrong values 1 with the message), run, exit status.

    A training run (a configuration with ``epochs``, not ``--eval``) catches the stop signals
    (SIGTERM, SIGUSR1, SIGINT) from here on, so a stop while it is being set up ends it cleanly
    (status 75) instead of with a traceback; short jobs (evaluation, ``inspect``) keep the default
    handlers. Under ``mcbeit-torchrun`` the exit status is recorded for the launcher (:mod:`mcbeit.launch`)."""
    config = to_config(parser.parse_args(argv))
    from mcbeit.engine.control import record_exit, record_start, stop_signals

    trains = hasattr(config, "epochs") and not getattr(config, "eval", False)
    record_start()
    status: Any = 1
    if trains:
        stop_signals.install(hard_exit=True)  # a second Ctrl-C ends this process, however the unwinding goes
    try:
        status = run_command(lambda: run(config), dist_timeout=getattr(config, "dist_timeout", 30.0))
    except KeyboardInterrupt:  # a second Ctrl-C while the run was closing (inside the run it is status 130 already)
        from mcbeit.errors import EXIT_INTERRUPTED

        status = EXIT_INTERRUPTED
    except SystemExit as exc:  # wrong input: status 1 with its message
        status = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        if trains:
            stop_signals.uninstall()
            stop_signals.hard_exit = False  # (a command run in-process, by a test: its watchdog goes with it)
        record_exit(status)
    return status


def run_in_process(job: Callable[[Any], Any], args: argparse.Namespace, config_cls: type) -> Any:
    """Run a parsed command line in this process (tests, notebooks): ``job(config)``; wrong input
    stops with ``SystemExit(message)``, every other stop propagates as its exception."""
    from mcbeit.engine.exits import INPUT_ERRORS

    try:
        return job(to_config(args, config_cls))
    except INPUT_ERRORS as exc:
        raise SystemExit(str(exc)) from None


def train_test_presets(argv: Sequence[str] | None, prog: str, doc: str | None, presets: Callable[[], str],
                       get_args_parser: Callable[[str], argparse.ArgumentParser], job: Callable[[Any], Any]) -> int:
    """``PROG train|test|presets ...`` (mcbeit-seg, mcbeit-det): ``presets`` prints the seeds' configs, the others
    parse ``get_args_parser(command)`` and run ``job``; no command (or ``-h``) says what to do."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "test", "presets")
    command = argv.pop(0) if argv and argv[0] in commands else None
    if command is None:
        if argv and argv[0] in ("-h", "--help"):
            print(doc)
            return 0
        raise SystemExit(f"{prog}: say what to do: {' | '.join(commands)} (e.g. {prog} train)")
    if command == "presets":
        print(presets())
        return 0
    return parse_and_run(get_args_parser(command), argv, job)


def settings_in_checkpoint(checkpoint: str, prog: str, checkpoint_format: str, wanted: set[str], hint: str) -> dict:
    """The ``wanted`` settings (flag names) a checkpoint of ``prog`` was trained with (its ``args``) and its config,
    for ``PROG test CHECKPOINT``: what it was built and evaluated as (how this run goes stays this run's). Any other
    file stops with a message naming ``hint`` (how to name its config instead)."""
    from mcbeit.models.checkpoint import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise SystemExit(f"{prog} test: {exc}") from None
    args = ckpt.get("args") if isinstance(ckpt, dict) and ckpt.get("format") == checkpoint_format else None
    if not isinstance(args, dict):
        raise SystemExit(f"{prog} test: {checkpoint} is not a checkpoint of {prog}, so it does not say how it was "
                         f"built: name its config too, {hint}")
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k in wanted}
    out["config"] = args.get("config", "")
    return out
