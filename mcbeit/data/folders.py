"""Data folders named by flags: the checks, and the errors that say what to pass instead."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torchvision.datasets.folder import IMG_EXTENSIONS

from mcbeit.errors import InputError

LIST_FILE = "train_map.txt"


class BadListFileError(InputError, ValueError):
    """A list file (``train_map.txt``, ``<split>_map.txt``) of which no line is usable."""


class DataPathError(InputError, FileNotFoundError):
    """A data folder flag (``--data_path``, ``--eval_data_path``) names no folder, or one without images.
    The message names the flag and its value and says what to pass instead."""


PRETRAINING_LAYOUTS = (f"a folder holding an ImageFolder tree (class sub-folders), or train/ plus {LIST_FILE}; "
                       "omit --data_path to use the embedded dataset")
CLASSIFICATION_LAYOUTS = ("a folder holding train/ and val/ (class sub-folders, or <split>_map.txt lists), or one "
                          "folder of class sub-folders with --eval_data_path; omit --data_path to use the embedded "
                          "dataset")


def check_data_folder(path: str | os.PathLike, flag: str = "--data_path", expected: str = PRETRAINING_LAYOUTS) -> Path:
    """``path`` as a Path when it names an existing folder; else :class:`DataPathError` naming ``flag``,
    the value and ``expected`` (what to pass)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataPathError(f"{flag} {folder} does not exist: pass {expected}")
    if not folder.is_dir():
        raise DataPathError(f"{flag} {folder} is a file, not a folder: pass {expected}")
    return folder


def no_images_error(flag: str, value, root: Path, what: str, classes: Sequence[str] | None,
               list_file: Path | None = None) -> DataPathError:
    """The error for ``flag value`` when its images folder ``root`` holds no image files (``what``: the
    layout or split looked for; ``list_file``: the list the images were read from, which named none)."""
    where = f"{flag} {value}" + (f" ({root})" if value is not None and Path(value) != root else "")
    if list_file is not None:
        return DataPathError(f"{where}: no images found for {what}: {list_file} lists none; add "
                             f"'<path relative to {root}/> <label>' lines to it, or pass a folder of class sub-folders")
    found = ""
    if classes and any(classes):
        shown = ", ".join(classes[:5]) + (f" and {len(classes) - 5} more" if len(classes) > 5 else "")
        many = len(classes) > 1
        found = (f": its {len(classes)} class folder{'s' if many else ''} ({shown}) {'hold' if many else 'holds'} "
                 "no image files")
    return DataPathError(
        f"{where}: no images found for {what}{found} (extensions: {', '.join(IMG_EXTENSIONS)}); put the "
        f"images in class sub-folders of {root}, or pass the folder that holds them")


EVAL_LAYOUT = "a folder of evaluation images in class sub-folders, or --disable_eval_during_finetuning"
