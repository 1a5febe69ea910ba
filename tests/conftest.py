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
