"""Helper for reward error messages: the CLI prints a ``UserError`` on one line."""
from __future__ import annotations


def brief(error: BaseException | str, limit: int = 300) -> str:
    """``error`` as one short line: whitespace collapsed, cut at ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
