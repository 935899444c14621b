"""Errors as users read them: one line."""


def first_line(error: BaseException) -> str:
    """
    An error's message on one line (Hub and loading errors add lines of detail), or its type when it has none.

    Args:
        error (`BaseException`):
            The error.

    Returns:
        `str`
    """
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
