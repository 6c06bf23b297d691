"""Type stubs for the native module moat._moat."""

import os
from typing import Dict, List, Optional, Union

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

def load_config(path: Union[str, "os.PathLike[str]"]) -> Config: ...
