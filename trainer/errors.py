"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits 2.

The library speaks Python: a bad argument is a :class:`ParamError` (a ``ValueError``) whose
message names the *parameter* (``ratio 0.0 is outside (0, 1); ...``); only the command line
turns the names into its flags (``--ratio 0.0 ...``, :meth:`ParamError.cli_message`).
"""

from __future__ import annotations

import signal

SHOWN_CHARS = 60  # the most of a user's value a message quotes


def shown(value: object, quote: bool = False) -> str:
    """A user's value as a message quotes it: at most SHOWN_CHARS characters of it (a value
    can be a 10,000-character name or a YAML bomb's expansion)."""
    text = repr(value) if quote or not isinstance(value, (int, float)) else str(value)
    if isinstance(value, bool) or value is None:
        text = repr(value)
    if len(text) > SHOWN_CHARS:
        text = f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"
    return text


def cut(text: str, limit: int = 4 * SHOWN_CHARS) -> str:
    """Plain text (not quoted) cut to about ``limit`` characters, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix."""

    exit_code = 2


class ParamError(UserError, ValueError):
    """A bad value of a parameter (or a bad combination of them).

    ``template`` names each parameter as ``{name}``; ``str(exc)`` says it as Python does
    (``min_channels``), :meth:`cli_message` as the command line does (``--min-channels``, or
    the flag ``FLAGS`` gives), followed by ``cli_hint`` (e.g. '; see --help').
    """

    FLAGS: dict[str, str] = {}  # parameter -> flag, where the flag is not --<name-with-dashes>

    def __init__(self, template: str, *params: str, cli_hint: str = "") -> None:
        self.template, self.params, self.cli_hint = template, params, cli_hint
        super().__init__(self._text(cli=False))

    @classmethod
    def value(cls, param: str, value: object, problem: str, *, quote: bool = False,
              cli_hint: str = "") -> ParamError:
        """``{param} <value><problem>``, e.g. ('ratio', 0.0, ' is outside (0, 1)')."""
        text = shown(value, quote).replace("{", "{{").replace("}", "}}")
        return cls("{" + param + "} " + text + problem, param, cli_hint=cli_hint)

    @staticmethod
    def flag(param: str) -> str:
        return ParamError.FLAGS.get(param, "--" + param.replace("_", "-"))

    def _text(self, cli: bool) -> str:
        text = self.template
        for param in self.params:
            text = text.replace("{" + param + "}", self.flag(param) if cli else param)
        return text.replace("{{", "{").replace("}}", "}") + (self.cli_hint if cli else "")

    def cli_message(self) -> str:
        """The message with the command line's flags."""
        return self._text(cli=True)


class CheckpointError(UserError):
    """A checkpoint file that cannot be used (missing, corrupt, refused, mismatched)."""


class DataError(UserError):
    """A dataset that cannot be found, read or matched to the model."""


class ConfigError(UserError):
    """Settings that contradict each other or the machine (said in the command line's
    terms: the launcher and the commands raise it)."""


class TrainingError(UserError):
    """A run that cannot go on (e.g. a non-finite loss); what was saved stays intact."""

    exit_code = 1


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived: the loop stopped at a step boundary on every rank (``epoch``),
    or the run stopped at once outside the loop (``epoch`` None: reading data, building the
    model, between a pipeline's stages)."""

    PREFIX = "stopped by "  # how every stop's message starts (trainer.train.dist.is_stop reads it)

    def __init__(self, signum: int, epoch: int | None = None):
        where = f" in epoch {epoch}" if epoch is not None else " outside the training loop"
        super().__init__(f"{self.PREFIX}{signal.Signals(signum).name}{where}")
        self.signum, self.epoch = signum, epoch
        self.exit_code = 128 + signum
        self.resumable = False  # set when a resume state exists to continue from


class HardStop(KeyboardInterrupt):
    """A second Ctrl-C: the run stops where it is, without finishing the step."""

    MESSAGE = ("stopped hard by a second Ctrl-C: the epoch in progress is lost; every file "
               "already written is whole (--resume continues from the last finished epoch)")

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)
