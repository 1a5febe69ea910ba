"""The bad-data policy (``mcbeit.engine.bad_data``): --max_bad_fraction of the files read may be
unreadable, exactly at the threshold included."""
import pytest

from mcbeit.engine.bad_data import TooManyBadImagesError, check_bad_fraction


def test_check_bad_fraction_at_below_and_above_the_threshold():
    check_bad_fraction(29, 71, 0.29)  # 29 of 100 read: exactly at the threshold
    check_bad_fraction(28, 72, 0.29)
    with pytest.raises(TooManyBadImagesError) as error:
        check_bad_fraction(30, 70, 0.29, where="in epoch 3")
    assert str(error.value).startswith("30 of 100 images in epoch 3 (30%) were unreadable, more than "
                                       "--max_bad_fraction 0.29; the skipped files are listed")
    assert isinstance(error.value, RuntimeError)
    check_bad_fraction(0, 0, 0.0)  # nothing read
    check_bad_fraction(0, 10, 0.0)
    with pytest.raises(TooManyBadImagesError, match="1 of 11 images in this epoch"):
        check_bad_fraction(1, 10, 0.0)  # 0: no bad file accepted
    check_bad_fraction(10, 0, 1.0)  # 1 disables the check, even when nothing could be read
    with pytest.raises(TooManyBadImagesError, match="10 of 10"):
        check_bad_fraction(10, 0, 0.99)
    for wrong in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--max_bad_fraction must be between 0 and 1"):
            check_bad_fraction(1, 1, wrong)
    with pytest.raises(ValueError, match="negative"):
        check_bad_fraction(-1, 1, 0.5)
