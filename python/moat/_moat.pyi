"""Type stubs for the native module moat._moat (import ``moat`` instead).

The docstrings here are summaries; the full ones (every argument, return
value and exception) are the objects' own: ``help(moat.run)``.
"""

import os
import pathlib
from types import TracebackType
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union, final, overload

__all__ = [
    "__version__",
    "Config",
    "Network",
    "Mount",
    "Credential",
    "Proxy",
    "load_config",
    "grant",
    "AuditLog",
    "verify_bundle",
    "revoke",
    "grants",
    "Run",
    "LogStream",
    "run",
    "claude",
    "policy_check",
    "policy_suggest",
    "trace_har",
    "runs",
    "clean",
    "promote",
    "system_images",
    "system_containers",
    "deps",
    "_supervise",
    "_router",
]

_PathLike = Union[str, "os.PathLike[str]"]
_Network = Union[str, Dict[str, Any], None]
_Rules = List[Union[str, Dict[str, List[str]]]]

__version__: str

@final
class Network:
    """The ``network`` section of a configuration (read-only)."""

    @property
    def policy(self) -> str:
        """``"permissive"`` or ``"strict"``."""
    @property
    def allow(self) -> List[str]:
        """The allow-list's host patterns."""

@final
class Mount:
    """A bind mount of a configuration (read-only)."""

    @property
    def source(self) -> str:
        """The absolute host path."""
    @property
    def target(self) -> str:
        """The absolute container path."""
    @property
    def read_only(self) -> bool:
        """Whether it is mounted read-only."""

@final
class Config:
    """A validated configuration with defaults filled in; made by `load_config`."""

    @property
    def workspace(self) -> str: ...
    @property
    def config_file(self) -> Optional[str]: ...
    @property
    def name(self) -> Optional[str]: ...
    @property
    def version(self) -> Optional[str]: ...
    @property
    def image(self) -> str: ...
    @property
    def dependencies(self) -> List[str]: ...
    @property
    def grants(self) -> List[str]: ...
    @property
    def env(self) -> Dict[str, str]: ...
    @property
    def secrets(self) -> Dict[str, str]:
        """Secret references (never values), by variable name."""
    @property
    def network(self) -> Network: ...
    @property
    def mounts(self) -> List[Mount]: ...
    @property
    def ports(self) -> Dict[str, int]: ...
    @property
    def command(self) -> Optional[List[str]]: ...
    @property
    def interactive(self) -> bool: ...
    def to_json(self) -> str:
        """The resolved configuration as JSON, as ``moat config --json`` prints it."""
    def resolve_secrets(self) -> Dict[str, str]:
        """Resolves ``secrets:`` on this host; raises ConfigError naming a failed one."""

def load_config(path: _PathLike) -> Config:
    """Loads and validates a workspace's configuration; raises ConfigError, MoatIOError."""

@final
class Credential:
    """A header the proxy injects on requests to `host` (default port 443)."""

    def __new__(cls, host: str, header: str, value: str, grant: Optional[str] = None) -> "Credential": ...
    @property
    def host(self) -> str: ...
    @property
    def header(self) -> str: ...
    @property
    def grant(self) -> str: ...

@final
class Proxy:
    """A credential-injecting proxy with one client; a context manager."""

    def __new__(
        cls,
        credentials: Sequence[Credential] = (),
        policy: Optional[str] = None,
        allow: Sequence[str] = (),
        listen: Optional[str] = None,
        upstream_ca: Optional[_PathLike] = None,
        resolve: Optional[Dict[str, str]] = None,
        home: Optional[_PathLike] = None,
        name: Optional[str] = None,
        capture_bodies: int = 0,
        grants: Sequence[str] = (),
        audit_dir: Optional[_PathLike] = None,
        trace_limit: Optional[int] = None,
        trace_bytes: Optional[int] = None,
        rules: Optional[_Rules] = None,
    ) -> "Proxy": ...
    @property
    def url(self) -> str:
        """The proxy's URL with this client's token."""
    @property
    def address(self) -> str:
        """The listen address, ``host:port``."""
    @property
    def ca_cert_path(self) -> str:
        """The path of the moat CA certificate a client must trust."""
    @property
    def closed(self) -> bool:
        """Whether the proxy has been closed."""
    def env(self) -> Dict[str, str]:
        """The environment variables a child process needs to use the proxy."""
    def trace(self) -> List[Dict[str, Any]]:
        """One dict per request; credential values redacted."""
    def audit_events(self) -> List[Dict[str, Any]]:
        """The policy's decisions and the credentials injected."""
    @property
    def dropped(self) -> Tuple[int, int]:
        """Trace records and audit events dropped from memory: ``(records, events)``."""
    def close(self) -> None:
        """Stops the proxy. Safe to call twice."""
    def __enter__(self) -> "Proxy": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

def grant(
    provider: str,
    token: Optional[str] = None,
    validate: bool = True,
    home: Optional[_PathLike] = None,
    host: Optional[str] = None,
    key: Optional[str] = None,
    role: Optional[str] = None,
    region: Optional[str] = None,
    session_duration: Optional[int] = None,
    external_id: Optional[str] = None,
) -> Dict[str, Any]:
    """Stores a credential for `provider` (never prompts); returns the grant without its token."""

def revoke(provider: str, home: Optional[_PathLike] = None) -> bool:
    """Removes the stored credential of `provider`; whether there was one."""

def grants(home: Optional[_PathLike] = None) -> List[Dict[str, Any]]:
    """The stored grants, never their tokens."""

@final
class AuditLog:
    """A tamper-evident audit log directory."""

    def __new__(cls, path: _PathLike, home: Optional[_PathLike] = None) -> "AuditLog": ...
    def verify(self, key: Optional[str] = None) -> Dict[str, Any]:
        """Verifies chain, tree and signatures; the report, or ConfigError."""
    def export(self, path: _PathLike) -> Dict[str, Any]:
        """Writes a self-contained proof bundle to `path`."""

def verify_bundle(path: _PathLike, key: Optional[str] = None) -> Dict[str, Any]:
    """Verifies an exported proof bundle offline; the report, or ConfigError."""

@final
class LogStream:
    """Output chunks ``(stream, bytes)`` as they arrive, until the run ends."""

    def __iter__(self) -> "LogStream": ...
    def __next__(self) -> Tuple[str, bytes]: ...
    def _poll(self, timeout: float) -> Tuple[bool, List[Tuple[str, bytes]]]:
        """Chunks within `timeout` seconds, and whether the stream has ended."""

@final
class Run:
    """One container execution and its artifacts; a context manager that stops it."""

    def __new__(cls, reference: Optional[str] = None, home: Optional[_PathLike] = None) -> "Run": ...
    @staticmethod
    def start(
        workspace: _PathLike = ".",
        command: Optional[Sequence[str]] = None,
        grants: Sequence[str] = (),
        image: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        name: Optional[str] = None,
        network: _Network = None,
        home: Optional[_PathLike] = None,
        runtime: Optional[str] = None,
    ) -> "Run":
        """Starts a run; returns once its container has started."""
    @property
    def run_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def state(self) -> str:
        """``"starting"``, ``"running"``, ``"stopped"`` or ``"failed"``, read afresh."""
    @property
    def exit_code(self) -> Optional[int]: ...
    @property
    def error(self) -> Optional[str]: ...
    @property
    def urls(self) -> Dict[str, str]: ...
    @property
    def dir(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    def info(self) -> Dict[str, Any]: ...
    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Waits for the run to end; its exit code, or None after `timeout`."""
    def stop(self, grace: int = 10) -> Optional[int]:
        """SIGTERM, SIGKILL after `grace` seconds; the exit code."""
    def destroy(self) -> None:
        """Removes the run and its files (stopping it first)."""
    @overload
    def logs(self, follow: Literal[False] = False) -> List[Tuple[str, bytes]]: ...
    @overload
    def logs(self, follow: Literal[True]) -> LogStream: ...
    @overload
    def logs(self, follow: bool) -> Union[List[Tuple[str, bytes]], LogStream]: ...
    def trace(self) -> List[Dict[str, Any]]:
        """The network trace: one dict per request through the run's proxy."""
    def audit(self) -> AuditLog:
        """The run's audit log."""
    def __enter__(self) -> "Run": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    def __reduce__(self) -> Tuple[Type["Run"], Tuple[str, pathlib.Path]]:
        """Pickles as ``Run(run_id, home)``."""

def run(
    workspace: _PathLike = ".",
    command: Optional[Sequence[str]] = None,
    grants: Sequence[str] = (),
    image: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    name: Optional[str] = None,
    network: _Network = None,
    detach: bool = False,
    timeout: Optional[float] = None,
    home: Optional[_PathLike] = None,
    runtime: Optional[str] = None,
) -> Run:
    """Runs a command in a container and waits for it; RunTimeout after `timeout`."""

def claude(
    workspace: _PathLike = ".",
    prompt: Optional[str] = None,
    args: Sequence[str] = (),
    grants: Sequence[str] = (),
    image: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    name: Optional[str] = None,
    network: _Network = None,
    detach: bool = False,
    timeout: Optional[float] = None,
    home: Optional[_PathLike] = None,
    runtime: Optional[str] = None,
    version: Optional[str] = None,
) -> Run:
    """Runs Claude Code in a sealed run; like `run`."""

def policy_check(run: Optional[str] = None, home: Optional[_PathLike] = None) -> Dict[str, Any]:
    """A run's requests replayed against its workspace's current policy."""

def policy_suggest(run: Optional[str] = None, home: Optional[_PathLike] = None) -> str:
    """A strict network policy (YAML) that allows what a run did."""

def trace_har(run: Optional[str], path: _PathLike, home: Optional[_PathLike] = None) -> int:
    """Writes a run's trace as HAR 1.2; the number of requests written."""

def runs(home: Optional[_PathLike] = None) -> List[Dict[str, Any]]:
    """Every run, newest first."""

def clean(
    home: Optional[_PathLike] = None, *, dry_run: bool = False, keep_images: bool = False
) -> Dict[str, Any]:
    """Removes stopped runs and what moat left behind; what was removed."""

def promote(
    run: Optional[str] = None,
    to: Optional[_PathLike] = None,
    home: Optional[_PathLike] = None,
) -> Dict[str, Any]:
    """Copies a run that is over to where destroy and clean leave it."""

def system_images(all_homes: bool = False, home: Optional[_PathLike] = None) -> List[Dict[str, Any]]:
    """The images moat built (``moat system images --json``)."""

def system_containers(
    all_homes: bool = False, home: Optional[_PathLike] = None
) -> List[Dict[str, Any]]:
    """The containers moat made (``moat system containers --json``)."""

def deps(name: Optional[str] = None) -> Any:
    """Every known dependency, or the one ``name`` names."""

def _supervise() -> int:
    """The supervisor's entry point (``python -m moat._supervise``)."""

def _router(port: int, manual: bool) -> int:
    """The routing proxy's entry point (``python -m moat._router``)."""
