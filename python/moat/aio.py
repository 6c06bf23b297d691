"""moat for asyncio: runs and proxies that never block the event loop.

    >>> import asyncio, moat
    >>> async def main():
    ...     r = await moat.aio.run("./my-project", command=["pytest", "-q"], timeout=600)
    ...     print(r.exit_code, r.output)
    ...     async with moat.aio.Run.start("./my-project", command=["npm", "start"]) as run:
    ...         async for stream, data in run.logs(follow=True):
    ...             ...
    ...     async with moat.aio.Proxy(credentials=[cred]) as proxy:
    ...         child = await asyncio.create_subprocess_exec("git", "fetch", env={**os.environ, **proxy.env()})
    ...         await child.wait()

Blocking work (starting a run, waiting for it, reading its files, starting
and closing a proxy) runs in worker threads (`asyncio.to_thread`), with the
GIL released in the native code. No call holds a thread for longer than a
fraction of a second while it waits, so many runs can be waited for at once
on one event loop without exhausting the default executor.

What the synchronous API guarantees holds here too: a run that `run` waits
for is never left running behind it. On a timeout it is stopped and
`moat.RunTimeout` raised; when the waiting task is cancelled (or anything
else interrupts the wait) it is stopped before the cancellation goes on. A
run being started when its task is cancelled is stopped once it has
started.
"""

import asyncio
import math
import os
import warnings
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Generator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from moat import _moat
from moat._errors import InvalidArgumentError, RunTimeout

__all__ = ["run", "claude", "Run", "StartingRun", "Proxy"]

_T = TypeVar("_T")
_PathLike = Union[str, "os.PathLike[str]"]
_Network = Union[str, Dict[str, Any], None]

# How long one worker thread waits at a time (seconds): short, so that a
# thread is never held for long while a run or its output is awaited.
_SLICE = 0.25
# Seconds between SIGTERM and SIGKILL when moat stops a run itself.
_STOP_GRACE = 10

def _check_timeout(timeout: Optional[float]) -> None:
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise InvalidArgumentError(
            f"timeout: {timeout} is not a number of seconds (a finite number, 0 or more)"
        )


async def _started(start: Callable[[], _moat.Run]) -> _moat.Run:
    """Runs `start` in a worker thread. If the awaiting task is cancelled (or
    interrupted) meanwhile, the start goes on in its thread: the run it
    makes is stopped once it has started, then the cancellation goes on."""
    future = asyncio.ensure_future(asyncio.to_thread(start))
    try:
        return await asyncio.shield(future)
    except BaseException:
        if not future.cancelled():
            try:
                started: Optional[_moat.Run] = await future
            except BaseException:
                started = None
            if started is not None:
                await _stop_quietly(started)
        raise


async def _stop_quietly(r: _moat.Run) -> None:
    """Stops a run whose wait failed; a failure to stop is a warning, since
    the wait's own error is the one that goes on."""
    try:
        # A worker thread's stop goes on even if this task is cancelled again.
        await asyncio.to_thread(r.stop, _STOP_GRACE)
    except Exception as e:
        warnings.warn(f"run {r.run_id} could not be stopped: {e}", RuntimeWarning, stacklevel=2)


def _wait_slice(r: _moat.Run, timeout: float) -> bool:
    """Waits at most `timeout` seconds; whether the run is over."""
    r.wait(timeout)
    return r.state in ("stopped", "failed")


async def _wait(r: _moat.Run, timeout: Optional[float]) -> bool:
    """Waits for the run, `timeout` seconds at most (None: as long as it
    takes), a slice at a time; whether it is over."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        left = _SLICE if deadline is None else max(0.0, min(_SLICE, deadline - loop.time()))
        if await asyncio.to_thread(_wait_slice, r, left):
            return True
        if deadline is not None and loop.time() >= deadline:
            return False


async def _finish(r: _moat.Run, timeout: Optional[float]) -> _moat.Run:
    """Waits for a run `run` or `claude` started: stopped on a timeout (then
    RunTimeout), or when the wait is cancelled or fails (then that error)."""
    try:
        over = await _wait(r, timeout)
    except BaseException:
        await _stop_quietly(r)
        raise
    if over:
        return r
    code = await asyncio.to_thread(r.stop, _STOP_GRACE)
    text = f"run {r.run_id} was still running after {timeout} s; stopped"
    if code is not None:
        text += f" (exit code {code})"
    raise RunTimeout(text, run=r, timeout=float(timeout or 0))


async def run(
    workspace: _PathLike = ".",
    command: Optional[Sequence[str]] = None,
    grants: Sequence[str] = (),
    image: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    name: Optional[str] = None,
    network: _Network = None,
    detach: bool = False,
    timeout: Optional[float] = None,
    home: Optional[_PathLike] = None,
    runtime: Optional[str] = None,
) -> _moat.Run:
    """Runs a command in a container and waits for it to end, without
    blocking the event loop: `moat.run` for asyncio.

    Args:
        workspace: The workspace directory (mounted at /workspace), or the
            path of its agent.yaml / moat.yaml.
        command: The command and its arguments; default the configuration's
            ``command``, else the image's.
        grants: Grants to bind, added to the configuration's.
        image: The image; default the configuration's.
        env: Environment variables, added to the configuration's.
        name: The run's name; default the configuration's, else one made up.
        network: ``"strict"``, ``"permissive"``, or ``{"policy": ...,
            "allow": [host patterns]}``; default the configuration's.
        detach: Return once the container has started, without waiting.
        timeout: Seconds to wait at most; None waits as long as it takes.
        home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
        runtime: ``"docker"`` or ``"podman"``; default as for `moat.run`.

    Returns:
        moat.Run: The run, ended unless `detach`.

    Raises:
        moat.RunTimeout: The run was still going after `timeout` seconds;
            it has been stopped.
        asyncio.CancelledError: The task was cancelled; the run has been
            stopped.
        moat.ConfigError, moat.InvalidArgumentError, moat.MoatIOError,
        moat.ContainerRuntimeError: As `moat.run` raises them.
    """
    _check_timeout(timeout)
    r = await _started(
        lambda: _moat.Run.start(
            workspace,
            command=None if command is None else list(command),
            grants=list(grants),
            image=image,
            env=None if env is None else dict(env),
            name=name,
            network=network,
            home=home,
            runtime=runtime,
        )
    )
    if detach:
        return r
    return await _finish(r, timeout)


async def claude(
    workspace: _PathLike = ".",
    prompt: Optional[str] = None,
    args: Sequence[str] = (),
    grants: Sequence[str] = (),
    image: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    name: Optional[str] = None,
    network: _Network = None,
    detach: bool = False,
    timeout: Optional[float] = None,
    home: Optional[_PathLike] = None,
    runtime: Optional[str] = None,
    version: Optional[str] = None,
) -> _moat.Run:
    """Runs Claude Code in a sealed run without blocking the event loop:
    `moat.claude` for asyncio (the same arguments; a timeout and a
    cancellation stop the run as in `run`).

    Args:
        workspace: The workspace directory, or its agent.yaml / moat.yaml.
        prompt: The prompt for ``claude -p``; None: an interactive session
            (needs ``detach=True``).
        args: More arguments for ``claude``.
        grants: More grants to bind, besides ``anthropic``.
        image: The base image; default the configuration's, else moat's.
        env: Environment variables, added to the configuration's.
        name: The run's name.
        network: ``"strict"``, ``"permissive"``, or ``{"policy": ...,
            "allow": [...]}``.
        detach: Return once the container has started, without waiting.
        timeout: Seconds to wait at most; None waits as long as it takes.
        home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
        runtime: ``"docker"`` or ``"podman"``.
        version: The Claude Code version; default the one moat pins.

    Returns:
        moat.Run: The run, ended unless `detach`.

    Raises:
        moat.RunTimeout: The run was still going after `timeout` seconds;
            it has been stopped.
        asyncio.CancelledError: The task was cancelled; the run has been
            stopped.
        moat.ConfigError, moat.InvalidArgumentError, moat.MoatIOError,
        moat.ContainerRuntimeError: As `moat.claude` raises them.
    """
    _check_timeout(timeout)
    if prompt is None and not detach:
        # As moat.claude says it (it is started detached here, then waited for).
        raise InvalidArgumentError(
            "prompt: an interactive Claude Code session needs a terminal; give prompt=..., "
            "or detach=True and `moat attach` to it (or use `moat claude`)"
        )
    r = await _started(
        lambda: _moat.claude(
            workspace,
            prompt=prompt,
            args=list(args),
            grants=list(grants),
            image=image,
            env=None if env is None else dict(env),
            name=name,
            network=network,
            detach=True,
            home=home,
            runtime=runtime,
            version=version,
        )
    )
    if detach:
        return r
    return await _finish(r, timeout)


class Run:
    """A run, for asyncio: the awaitable counterpart of `moat.Run`.

    Start one with ``await Run.start(...)`` or ``async with Run.start(...)
    as run:`` (the run is stopped at the block's end if it still runs), or
    open one with ``await Run.open(reference)``.

    Args:
        run: The `moat.Run` to wrap.
    """

    def __init__(self, run: _moat.Run) -> None:
        self._run = run

    @staticmethod
    def start(
        workspace: _PathLike = ".",
        command: Optional[Sequence[str]] = None,
        grants: Sequence[str] = (),
        image: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        name: Optional[str] = None,
        network: _Network = None,
        home: Optional[_PathLike] = None,
        runtime: Optional[str] = None,
    ) -> "StartingRun":
        """Starts a run; `moat.Run.start` for asyncio.

        The result is both awaitable (``run = await Run.start(...)``) and an
        async context manager (``async with Run.start(...) as run:``, which
        stops the run at the block's end if it still runs).

        Args:
            workspace: The workspace directory, or its agent.yaml / moat.yaml.
            command: The command and its arguments; default the
                configuration's ``command``, else the image's.
            grants: Grants to bind, added to the configuration's.
            image: The image; default the configuration's.
            env: Environment variables, added to the configuration's.
            name: The run's name.
            network: ``"strict"``, ``"permissive"``, or ``{"policy": ...,
                "allow": [...]}``.
            home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
            runtime: ``"docker"`` or ``"podman"``.

        Returns:
            StartingRun: Await it, or enter it, for the running `Run`.

        Raises:
            moat.ConfigError, moat.InvalidArgumentError, moat.MoatIOError,
            moat.ContainerRuntimeError: As `moat.Run.start` raises them (when
                awaited or entered).
        """
        return StartingRun(
            lambda: _moat.Run.start(
                workspace,
                command=None if command is None else list(command),
                grants=list(grants),
                image=image,
                env=None if env is None else dict(env),
                name=name,
                network=network,
                home=home,
                runtime=runtime,
            )
        )

    @staticmethod
    async def open(reference: Optional[str] = None, home: Optional[_PathLike] = None) -> "Run":
        """Opens an existing run; ``moat.Run(reference, home)`` for asyncio.

        Args:
            reference: The run's id, id prefix or name; None: the most recent.
            home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.

        Returns:
            Run: The run.

        Raises:
            moat.InvalidArgumentError: No run matches `reference`.
            moat.MoatIOError: The runs cannot be read.
        """
        return Run(await asyncio.to_thread(_moat.Run, reference, home))

    @property
    def sync(self) -> _moat.Run:
        """The `moat.Run` this wraps (its calls block)."""
        return self._run

    @property
    def run_id(self) -> str:
        """The run's id: ``run_`` and 12 hex digits."""
        return self._run.run_id

    @property
    def name(self) -> str:
        """The run's name."""
        return self._run.name

    @property
    def dir(self) -> str:
        """The directory of the run's files."""
        return self._run.dir

    @property
    def urls(self) -> Dict[str, str]:
        """Endpoint name → URL through the routing proxy."""
        return self._run.urls

    async def state(self) -> str:
        """The run's state, read afresh: ``"starting"``, ``"running"``,
        ``"stopped"`` or ``"failed"``."""
        return await asyncio.to_thread(lambda: self._run.state)

    async def exit_code(self) -> Optional[int]:
        """The command's exit code once it has exited, else None."""
        return await asyncio.to_thread(lambda: self._run.exit_code)

    async def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Waits for the run to end without blocking the event loop (the run
        goes on if the task is cancelled: use ``async with`` or `stop`).

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            The exit code, or None if the run still runs after `timeout`.

        Raises:
            moat.InvalidArgumentError: `timeout` is negative or not finite.
            moat.MoatIOError: run.json cannot be read.
        """
        _check_timeout(timeout)
        if await _wait(self._run, timeout):
            return await self.exit_code()
        return None

    async def stop(self, grace: int = 10) -> Optional[int]:
        """Stops the run: SIGTERM, then SIGKILL after `grace` seconds.

        Args:
            grace: Seconds between SIGTERM and SIGKILL.

        Returns:
            The exit code.

        Raises:
            moat.ContainerRuntimeError: The engine refused to stop it.
            moat.MoatIOError: run.json cannot be read.
        """
        return await asyncio.to_thread(self._run.stop, grace)

    async def destroy(self) -> None:
        """Removes the run and its files (stopping it first).

        Raises:
            moat.ContainerRuntimeError: It did not stop within 30 s.
            moat.MoatIOError: Its files could not be removed.
        """
        await asyncio.to_thread(self._run.destroy)

    async def info(self) -> Dict[str, Any]:
        """Everything known about the run (its run.json), read afresh."""
        return await asyncio.to_thread(self._run.info)

    async def output(self) -> str:
        """The command's standard output so far, as text."""
        return await asyncio.to_thread(lambda: self._run.output)

    async def stderr(self) -> str:
        """The command's standard error so far, as text."""
        return await asyncio.to_thread(lambda: self._run.stderr)

    async def trace(self) -> List[Dict[str, Any]]:
        """The network trace: one dict per request through the run's proxy."""
        return await asyncio.to_thread(self._run.trace)

    async def logs(self, follow: bool = False) -> AsyncIterator[Tuple[str, bytes]]:
        """The run's output as ``(stream, data)`` chunks, for ``async for``.

        Args:
            follow: Go on yielding chunks as they arrive until the run ends
                (else only those written so far).

        Yields:
            ``(stream, data)``: `stream` is ``"stdout"``, ``"stderr"`` or
            ``"moat"``; `data` is bytes.

        Raises:
            moat.MoatIOError: logs.jsonl cannot be read.
        """
        if not follow:
            for chunk in await asyncio.to_thread(self._run.logs):
                yield chunk
            return
        stream = self._run.logs(follow=True)
        while True:
            ended, chunks = await asyncio.to_thread(stream._poll, _SLICE)
            for chunk in chunks:
                yield chunk
            if ended:
                return

    async def __aenter__(self) -> "Run":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Stops the run if it still runs; exceptions propagate."""
        await asyncio.to_thread(self._run.__exit__, None, None, None)

    def __repr__(self) -> str:
        return f"moat.aio.Run(run_id={self.run_id!r}, name={self.name!r})"


class StartingRun:
    """A run being started by `Run.start`: await it for the `Run`, or use it
    as an async context manager (the run is stopped at the block's end if it
    still runs). If the task is cancelled while the run starts, the run is
    stopped once it has started.

    Args:
        start: What starts the run (a blocking call, made in a worker
            thread); `Run.start` makes it.
    """

    def __init__(self, start: Callable[[], _moat.Run]) -> None:
        self._start = start
        self._run: Optional[Run] = None

    async def _open(self) -> Run:
        return Run(await _started(self._start))

    def __await__(self) -> Generator[Any, None, Run]:
        return self._open().__await__()

    async def __aenter__(self) -> Run:
        self._run = await self._open()
        return self._run

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._run is not None:
            await self._run.__aexit__(exc_type, exc, tb)


class Proxy:
    """A credential-injecting proxy for asyncio: ``async with
    Proxy(...) as proxy:`` starts a `moat.Proxy` in a worker thread and
    closes it (in one too) at the block's end. The arguments are
    `moat.Proxy`'s.

    Args:
        credentials: `moat.Credential` objects to inject.
        policy: ``"permissive"`` (default) or ``"strict"``.
        allow: Host patterns strict mode allows.
        listen: The address to listen on; default ``127.0.0.1:0``.
        upstream_ca: A PEM file of extra CA certificates to trust upstream.
        resolve: Host → address overrides, as ``MOAT_RESOLVE``.
        home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
        name: The client's name in traces.
        capture_bodies: Bytes of text bodies to keep in trace records.
        grants: Stored grants to inject.
        audit_dir: A directory for a tamper-evident audit log.
        trace_limit: At most this many trace records in memory.
        trace_bytes: At most this many bytes of them in memory.
        rules: Request rules, as ``network.rules`` in agent.yaml.

    Raises:
        moat.InvalidArgumentError, moat.ConfigError, moat.MoatIOError: As
            `moat.Proxy` raises them, when the block is entered.
    """

    def __init__(
        self,
        credentials: Sequence[_moat.Credential] = (),
        policy: Optional[str] = None,
        allow: Sequence[str] = (),
        listen: Optional[str] = None,
        upstream_ca: Optional[_PathLike] = None,
        resolve: Optional[Mapping[str, str]] = None,
        home: Optional[_PathLike] = None,
        name: Optional[str] = None,
        capture_bodies: int = 0,
        grants: Sequence[str] = (),
        audit_dir: Optional[_PathLike] = None,
        trace_limit: Optional[int] = None,
        trace_bytes: Optional[int] = None,
        rules: Optional[List[Union[str, Dict[str, List[str]]]]] = None,
    ) -> None:
        self._make: Callable[[], _moat.Proxy] = lambda: _moat.Proxy(
            credentials=list(credentials),
            policy=policy,
            allow=list(allow),
            listen=listen,
            upstream_ca=upstream_ca,
            resolve=None if resolve is None else dict(resolve),
            home=home,
            name=name,
            capture_bodies=capture_bodies,
            grants=list(grants),
            audit_dir=audit_dir,
            trace_limit=trace_limit,
            trace_bytes=trace_bytes,
            rules=rules,
        )
        self._proxy: Optional[_moat.Proxy] = None

    async def __aenter__(self) -> _moat.Proxy:
        """Starts the proxy; returns the running `moat.Proxy`."""
        future = asyncio.ensure_future(asyncio.to_thread(self._make))
        try:
            self._proxy = await asyncio.shield(future)
        except BaseException:
            # Cancelled while it started: close it once it has.
            if not future.cancelled():
                try:
                    proxy = await future
                except BaseException:
                    proxy = None
                if proxy is not None:
                    await asyncio.to_thread(proxy.close)
            raise
        return self._proxy

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Closes the proxy; exceptions propagate."""
        if self._proxy is not None:
            await asyncio.to_thread(self._proxy.close)
