"""User-facing errors. The CLI prints these as one line, without a traceback."""


class MetaRecError(Exception):
    """Base class of every error metarec reports to a user."""


class DataError(MetaRecError):
    """Malformed or unusable input data; the message names the file and line/row."""


class ConfigError(MetaRecError):
    """Invalid configuration; the message names the key."""


class CheckpointError(MetaRecError):
    """A missing, torn or incompatible checkpoint."""


class NonFiniteError(MetaRecError):
    """A NaN/inf loss or gradient; the message names the tensor and the iteration."""


QUOTE_LIMIT = 80


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to at most `limit` characters (ending in '…'), for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def printable(text: str) -> str:
    """`text` with every non-printable character (terminal escapes, NUL, ...) written as its
    Python escape (`\\x1b`), so that no input can act on the terminal an error is printed to."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def bounded(message: str, limit: int = 1000) -> str:
    """A whole error message on one line of printable characters, cut to `limit` characters:
    no input can make an error line huge or reach the terminal raw."""
    message = printable(" ".join(str(message).splitlines()))
    return message if len(message) <= limit else message[: limit - 1] + "…"


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: what went wrong and on which path (disk full said plainly)."""
    import errno

    where = " ".join(repr(str(f)) for f in (err.filename, err.filename2) if f)
    if err.errno == errno.ENOSPC:
        return f"disk full (no space left on device) while writing {where or 'output'}; nothing was half-written, free space and retry"
    if err.errno == errno.EFBIG:
        return f"file too large (over the file system's or the process's file size limit) while writing {where or 'output'}; nothing was half-written"
    text = err.strerror or str(err) or type(err).__name__
    return f"{where}: {text}" if where else text
