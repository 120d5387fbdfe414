"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits 2."""

import signal


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint file that cannot be used (missing, corrupt, refused, mismatched)."""


class DataError(UserError):
    """A dataset that cannot be found, read or matched to the model."""


class ConfigError(UserError):
    """Settings that contradict each other or the machine."""


class TrainingError(UserError):
    """A run that cannot go on (e.g. a non-finite loss); what was saved stays intact."""

    exit_code = 1


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; the loop stopped at a step boundary on every rank."""

    PREFIX = "stopped by "  # how every stop's message starts (trainer.dist.is_stop reads it)

    def __init__(self, signum: int, epoch: int):
        super().__init__(f"{self.PREFIX}{signal.Signals(signum).name} in epoch {epoch}")
        self.signum = signum
        self.exit_code = 128 + signum
        self.resumable = False  # set when a resume state exists to continue from
