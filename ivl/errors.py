"""UsageError: what a user asked for cannot be used as given."""


class UsageError(Exception):
    """A missing file or folder, or a setting that cannot work, found before any work starts. The command-line
    entry points print the message as one line (what is wrong, and the command or setting that fixes it) and exit
    with status 2; from Python it raises like any exception."""
