"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""


class ArbqError(Exception):
    """A problem with the user's input or environment (bad path, bad shape, corrupt file...).

    Raised anywhere in arbq; `arbq.cli` turns it into `error: <message>` and exit code 2,
    never a traceback.
    """
