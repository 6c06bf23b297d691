"""moat: run AI agents in isolated containers with credentials injected at the
network layer, so the agent never holds a token.

Run a command in a container, with credentials injected by the run's
proxy:

    >>> import moat
    >>> r = moat.run("./my-project", command=["curl", "-s", "https://api.github.com/user"],
    ...              grants=["github"], image="node:20")
    >>> r.exit_code, r.output
    (0, '{"login": ...}')
    >>> r.trace()[0]["url"]
    'https://api.github.com/user'

Or use the credential-injecting proxy on its own (no container):

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
    Run,
    LogStream,
    __version__,
    clean,
    run,
    runs,
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
    "Run",
    "LogStream",
    "__version__",
    "clean",
    "run",
    "runs",
    "grant",
    "grants",
    "load_config",
    "revoke",
    "verify_bundle",
]
