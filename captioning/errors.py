"""One exception type for problems a user can fix (bad input, bad params).

Stages catch ``CaptioningError`` and print its message without a traceback; anything else
is a bug and keeps its traceback.
"""


class CaptioningError(Exception):
    """A user-facing error: the message names the file (and line) or the parameter at fault."""
