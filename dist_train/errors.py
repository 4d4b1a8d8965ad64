"""The exceptions that end a run with one line instead of a traceback.

The CLI prints ``dist-train: error: <message>`` on stderr and exits with the exception's ``exit_code``.
"""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it (exit 2)."""

    exit_code = 2


class RunFailed(UserError):
    """Training itself failed (non-finite loss, disk full, a rank that stopped answering): exit 3.

    Nothing is exported; the message names the last good checkpoint where there is one.
    """

    exit_code = 3


class StopRequested(BaseException):
    """A stop signal arrived before training started: nothing to save, the run ends cleanly.

    A BaseException, like KeyboardInterrupt: code that turns any Exception into a one-line error (a data
    reader, say) must not turn a stop request into one."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 130 if self.signal_name == "SIGINT" else 0
