"""The command lines: parse the original scripts' flags into a frozen configuration, run the task
through the engine, and turn what stopped it into an exit status (:mod:`mcbeit.errors`).

Nothing below this layer (tasks, engine, models, data) reads command-line arguments; this layer
imports torch only once a run starts, so ``--help`` is fast.
"""
