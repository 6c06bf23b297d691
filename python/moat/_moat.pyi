"""Type stubs for the native module moat._moat."""

import os
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, Union

__version__: str

class MoatError(Exception):
    """Base class of every moat error."""

    message: str
    path: Optional[str]
    line: Optional[int]
    column: Optional[int]
    errors: List[str]

class ConfigError(MoatError):
    """An invalid configuration file; path, line and column locate the first problem."""

class MoatIOError(MoatError):
    """Reading or writing a file failed."""

class InvalidArgumentError(MoatError):
    """An argument passed to moat is invalid."""

class InternalError(MoatError):
    """A bug in moat."""

class ContainerRuntimeError(MoatError):
    """The container engine is unreachable or refused, or a run could not be set up."""

class Network:
    @property
    def policy(self) -> str: ...
    @property
    def allow(self) -> List[str]: ...

class Mount:
    @property
    def source(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def read_only(self) -> bool: ...

class Config:
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
    def secrets(self) -> Dict[str, str]: ...
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
    def to_json(self) -> str: ...
    def resolve_secrets(self) -> Dict[str, str]: ...

def load_config(path: Union[str, "os.PathLike[str]"]) -> Config: ...

class Credential:
    """A header the proxy injects on requests to host (default port 443)."""

    def __init__(self, host: str, header: str, value: str, grant: Optional[str] = None) -> None: ...
    @property
    def host(self) -> str: ...
    @property
    def header(self) -> str: ...
    @property
    def grant(self) -> str: ...

class Proxy:
    """A credential-injecting proxy with one client; a context manager."""

    def __init__(
        self,
        credentials: Sequence[Credential] = ...,
        policy: Optional[str] = None,
        allow: Sequence[str] = ...,
        listen: Optional[str] = None,
        upstream_ca: Union[str, "os.PathLike[str]", None] = None,
        resolve: Optional[Mapping[str, str]] = None,
        home: Union[str, "os.PathLike[str]", None] = None,
        name: Optional[str] = None,
        capture_bodies: int = 0,
        grants: Sequence[str] = ...,
        audit_dir: Union[str, "os.PathLike[str]", None] = None,
    ) -> None: ...
    @property
    def url(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def ca_cert_path(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def env(self) -> Dict[str, str]: ...
    def trace(self) -> List[Dict[str, Any]]: ...
    def audit_events(self) -> List[Dict[str, Any]]: ...
    def close(self) -> None: ...
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
    home: Union[str, "os.PathLike[str]", None] = None,
    host: Optional[str] = None,
    key: Optional[str] = None,
    role: Optional[str] = None,
    region: Optional[str] = None,
    session_duration: Optional[int] = None,
    external_id: Optional[str] = None,
) -> Dict[str, Any]: ...
def revoke(provider: str, home: Union[str, "os.PathLike[str]", None] = None) -> bool: ...
def grants(home: Union[str, "os.PathLike[str]", None] = None) -> List[Dict[str, Any]]: ...

class AuditLog:
    """A tamper-evident audit log directory."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], home: Union[str, "os.PathLike[str]", None] = None) -> None: ...
    def verify(self, key: Optional[str] = None) -> Dict[str, Any]: ...
    def export(self, path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]: ...

def verify_bundle(path: Union[str, "os.PathLike[str]"], key: Optional[str] = None) -> Dict[str, Any]: ...
