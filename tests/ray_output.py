"""What a command printed itself, without the lines Ray forwards from its actors.

Ray forwards its workers' and actors' output to the driver (`log_to_driver`), each line
prefixed `(Name pid=N)` or `(Name pid=N, ip=A)`. In a test process that shares one Ray
instance across tests, an actor left by an earlier test (Ray Train's placement group
cleaner, say) can print while a later command runs; these helpers drop such lines."""

import re

_FORWARDED = re.compile(r"^\s*(\x1b\[[0-9;]*m)*\([^()]* pid=\d+(, ip=[^)]*)?\)")


def driver_lines(text: str) -> list[str]:
    """The lines of `text` that Ray did not forward from an actor or worker."""
    return [line for line in text.splitlines() if not _FORWARDED.match(line)]
