"""moat: run AI agents in isolated containers with credentials injected at the
network layer, so the agent never holds a token.

Built so far: loading and validating configuration, and the
credential-injecting proxy on its own (no container):

    >>> import moat, subprocess
    >>> cfg = moat.load_config("./my-project")
    >>> cfg.image
    'node:20'
    >>> cred = moat.Credential(host="api.github.com", header="Authorization",
    ...                        value="Bearer " + token)
    >>> with moat.Proxy(credentials=[cred], policy="strict") as proxy:
    ...     subprocess.run(["curl", "https://api.github.com/user"],
    ...                    env={**os.environ, **proxy.env()})
    ...     print(proxy.trace())
"""

from moat._moat import (
    AuditLog,
    Config,
    ConfigError,
    Credential,
    InternalError,
    ContainerRuntimeError,
    InvalidArgumentError,
    MoatError,
    MoatIOError,
    Mount,
    Network,
    Proxy,
    __version__,
    grant,
    grants,
    load_config,
    revoke,
    verify_bundle,
)

__all__ = [
    "AuditLog",
    "Config",
    "ConfigError",
    "Credential",
    "InternalError",
    "ContainerRuntimeError",
    "InvalidArgumentError",
    "MoatError",
    "MoatIOError",
    "Mount",
    "Network",
    "Proxy",
    "__version__",
    "grant",
    "grants",
    "load_config",
    "revoke",
    "verify_bundle",
]
