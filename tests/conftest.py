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
