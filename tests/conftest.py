import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_mcbeit_logger():
    """Tasks configure the `mcbeit` logger for a console run (own handler, no propagation); undo that
    after each test so later tests' `caplog` sees records again."""
    yield
    logger = logging.getLogger("mcbeit")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and does not collapse when other processes share the CPU.
    Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: The longest test files (minutes each, several processes), run first: under pytest-xdist (the README's ``-n 2``,
#: with pyproject's ``--dist loadfile --no-loadscope-reorder``) each starts on a worker at once instead of ending
#: the run alone on one of them.
SLOW_FILES_FIRST = ("tests/test_readme.py", "tests/tasks/test_demo.py", "tests/tasks/test_distributed_faults.py",
                    "tests/test_readme_sequences.py", "tests/bench/test_bench_quick.py", "tests/tasks/test_detection.py",
                    "tests/tasks/test_resume.py", "tests/tasks/test_group_signals.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: file order kept
