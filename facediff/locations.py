"""What a location string names: a Hub repo id, or a folder that `datasets.Dataset.save_to_disk` wrote."""

import os
from pathlib import Path


def looks_like_hub_id(location: str) -> bool:
    """
    Whether `location` can be a Hub repo id (`name` or `user/name`), rather than a path: not absolute, not starting
    with `.`, and at most one `/`.

    Args:
        location (`str`):
            What the user passed.

    Returns:
        `bool`
    """
    return not os.path.isabs(location) and not location.startswith(".") and location.count("/") <= 1


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """
    Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`, which only
    `datasets.load_from_disk` reads.

    Args:
        path (`str` or `os.PathLike`):
            A local path.

    Returns:
        `bool`
    """
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )
