"""The one exception type for user mistakes, and the two ways every module turns a failure into its one line.

The CLI prints a :class:`UserError`'s message on one line and exits with code 2.
"""
from __future__ import annotations

from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, unreachable model). Message says what and how."""


def brief(error: BaseException | str, limit: int = 300) -> str:
    """``error`` as one short line: whitespace collapsed, cut at ``limit`` characters (its type if it says nothing)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def loading(what: str, fix: str, errors: tuple[type[BaseException], ...] = (Exception,)):
    """Inside, a failure to load ``what`` (``from_pretrained``, a download, a weights file) becomes the UserError
    ``could not load <what> (<the reason, one line>): <fix>``; ``fix`` names the setting to change."""
    try:
        yield
    except UserError:
        raise
    except errors as error:
        raise UserError(f"could not load {what} ({brief(error)}): {fix}") from None
