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
