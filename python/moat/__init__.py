"""moat: run AI agents in isolated containers with credentials injected at the
network layer, so the agent never holds a token.

Built so far: loading and validating configuration.

    >>> import moat
    >>> cfg = moat.load_config("./my-project")
    >>> cfg.image
    'node:20'
"""

from moat._moat import (
    Config,
    ConfigError,
    InternalError,
    InvalidArgumentError,
    MoatError,
    MoatIOError,
    Mount,
    Network,
    __version__,
    load_config,
)

__all__ = [
    "Config",
    "ConfigError",
    "InternalError",
    "InvalidArgumentError",
    "MoatError",
    "MoatIOError",
    "Mount",
    "Network",
    "__version__",
    "load_config",
]
