"""moat's exceptions, defined in Python so that they pickle with their
attributes and subclass the built-in exceptions they are kinds of. The
native module raises them (it imports this module); import them from
`moat`, where they live (their ``__module__`` is ``"moat"``).

Every error moat raises is a `MoatError`, and also the built-in exception a
caller would expect:

=======================  ==================================  =========================
moat                     also a                              raised when
=======================  ==================================  =========================
`ConfigError`            `ValueError`                        a configuration (or an audit
                                                             log, a proof bundle, a
                                                             secret, a grant it needs)
                                                             is invalid or missing
`InvalidArgumentError`   `ValueError`                        an argument is invalid
`MoatIOError`            `OSError`                           reading or writing a file
                                                             failed
`ContainerRuntimeError`  `RuntimeError`                      the container engine is
                                                             unreachable or refused, or
                                                             a run could not be set up
`InternalError`          `RuntimeError`                      a bug in moat
`RunTimeout`             `TimeoutError` (an `OSError`)       a run outlived the
                                                             ``timeout`` it was given
                                                             (it has been stopped)
=======================  ==================================  =========================
"""

from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence

if TYPE_CHECKING:
    from moat._moat import Run

__all__ = [
    "Diagnostic",
    "MoatError",
    "ConfigError",
    "InvalidArgumentError",
    "MoatIOError",
    "ContainerRuntimeError",
    "InternalError",
    "RunTimeout",
]


class Diagnostic(NamedTuple):
    """One problem moat found: its message and, when it is in a file, where.

    ``str(d)`` is ``"path:line:column: message"`` (just the message when the
    problem has no location), as moat prints it.

    Attributes:
        path: The file, as the caller named it, or None.
        line: The 1-based line in `path`, or None.
        column: The 1-based column in `path`, or None.
        message: What is wrong, without the location.
    """

    path: Optional[str]
    line: Optional[int]
    column: Optional[int]
    message: str

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class MoatError(Exception):
    """Base class of every error moat raises.

    ``str(err)`` is the first problem with its location
    (``"agent.yaml:2:1: unknown field ..."``).

    Args:
        text: The error's text, as ``str(err)`` shows it.
        errors: Every problem found (`Diagnostic`), the headline first; by
            default one problem with `text` as its message.

    Attributes:
        errors: Every problem found, in file order (a configuration file's
            validation reports them all at once; other errors have one).
        message: The first problem's message, without its location.
        path: The first problem's file, or None.
        line: The first problem's line (1-based), or None.
        column: The first problem's column (1-based), or None.
    """

    errors: List[Diagnostic]

    def __init__(self, text: str, *, errors: Sequence[Diagnostic] = ()) -> None:
        super().__init__(text)
        self.errors = list(errors) or [Diagnostic(None, None, None, text)]

    @property
    def message(self) -> str:
        """The first problem's message, without its location."""
        return self.errors[0].message

    @property
    def path(self) -> Optional[str]:
        """The first problem's file, or None."""
        return self.errors[0].path

    @property
    def line(self) -> Optional[int]:
        """The first problem's line (1-based), or None."""
        return self.errors[0].line

    @property
    def column(self) -> Optional[int]:
        """The first problem's column (1-based), or None."""
        return self.errors[0].column

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> Any:
        # (class, (text,), state): pickles every subclass with its attributes,
        # OSError's subclasses included (their own reduce would drop none
        # either, but this keeps one rule for all).
        return (type(self), (str(self),), dict(self.__dict__))

    def __setstate__(self, state: Optional[Dict[str, Any]]) -> None:
        self.__dict__.update(state or {})


class ConfigError(MoatError, ValueError):
    """A configuration is invalid or incomplete: an agent.yaml or moat.yaml
    (`path`, `line` and `column` locate the first problem, `errors` lists
    them all), a secret that cannot be resolved, a grant a run needs but is
    not stored, an audit log or proof bundle that does not verify.
    """


class InvalidArgumentError(MoatError, ValueError):
    """An argument given to moat is invalid (the message names it and why)."""


class MoatIOError(MoatError, OSError):
    """Reading or writing a file failed (the message names the file)."""


class ContainerRuntimeError(MoatError, RuntimeError):
    """The container engine is unreachable or refused what moat asked, or a
    run could not be set up or managed on this host."""


class InternalError(MoatError, RuntimeError):
    """A bug in moat: an internal invariant failed. Please report it."""


class RunTimeout(MoatError, TimeoutError):
    """A run waited for with a ``timeout`` was still running then: moat has
    stopped it (SIGTERM, then SIGKILL after its grace period) before raising.
    Like `subprocess.TimeoutExpired`, but a `TimeoutError`.

    Args:
        text: The error's text.
        run: The stopped run (its ``exit_code``, ``output`` and ``trace()``
            are there to read).
        timeout: The timeout it was given, in seconds.

    Attributes:
        run: The stopped run (a `moat.Run`).
        timeout: The timeout, in seconds.
    """

    run: "Run"
    timeout: float

    def __init__(
        self,
        text: str,
        *,
        run: "Run",
        timeout: float,
        errors: Sequence[Diagnostic] = (),
    ) -> None:
        super().__init__(text, errors=errors)
        self.run = run
        self.timeout = timeout

    def __reduce__(self) -> Any:
        state = dict(self.__dict__)
        return (_rebuild_timeout, (str(self), state["run"], state["timeout"]), state)


def _rebuild_timeout(text: str, run: "Run", timeout: float) -> RunTimeout:
    """Unpickles a `RunTimeout` (its constructor takes keywords)."""
    return RunTimeout(text, run=run, timeout=timeout)


# They live in `moat` (where pickle finds them, and tracebacks name them).
for _public in (
    Diagnostic,
    MoatError,
    ConfigError,
    InvalidArgumentError,
    MoatIOError,
    ContainerRuntimeError,
    InternalError,
    RunTimeout,
):
    _public.__module__ = "moat"
del _public
