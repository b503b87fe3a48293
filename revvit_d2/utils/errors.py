"""How an exception is shown to a user: one line, never a traceback (tools and loggers)."""

__all__ = ["UserError", "one_line"]


class UserError(Exception):
    """An expected failure whose message is written for the user; shown as the message alone."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: a :class:`UserError`'s whole message with whitespace
    collapsed; any other exception as ``TypeName: first line of its message``."""
    if isinstance(e, UserError):
        return " ".join(str(e).split())
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
