"""The one error type users see: a single line naming the thing that is wrong and how to fix it."""


class DastraError(Exception):
    """Bad input or a mismatched artifact. The CLI prints `error: <message>` and exits with code 2."""


class WorkerDied(DastraError):
    """A rank's process died (killed, out of memory, lost node): the step can be re-run on a rebuilt group."""
