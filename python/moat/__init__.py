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
    'node:20-bookworm'
    >>> cred = moat.Credential(host="api.github.com", header="Authorization",
    ...                        value="Bearer " + token)
    >>> with moat.Proxy(credentials=[cred], policy="strict") as proxy:
    ...     subprocess.run(["curl", "https://api.github.com/user"],
    ...                    env={**os.environ, **proxy.env()})
    ...     print(proxy.trace())

Errors are `MoatError`s and also the built-in exception they are a kind of
(`ConfigError` and `InvalidArgumentError` are `ValueError`s, `MoatIOError`
an `OSError`, `ContainerRuntimeError` a `RuntimeError`, `RunTimeout` a
`TimeoutError`); they pickle with their attributes. For asyncio, see
`moat.aio`.
"""

from moat import aio
from moat._errors import (
    ConfigError,
    ContainerRuntimeError,
    Diagnostic,
    InternalError,
    InvalidArgumentError,
    MoatError,
    MoatIOError,
    RunTimeout,
)
from moat._moat import (
    AuditLog,
    Config,
    Credential,
    LogStream,
    Mount,
    Network,
    Proxy,
    Run,
    __version__,
    claude,
    clean,
    deps,
    grant,
    grants,
    load_config,
    policy_check,
    policy_suggest,
    promote,
    revoke,
    run,
    runs,
    system_containers,
    system_images,
    trace_har,
    verify_bundle,
)

__all__ = [
    "AuditLog",
    "Config",
    "ConfigError",
    "ContainerRuntimeError",
    "Credential",
    "Diagnostic",
    "InternalError",
    "InvalidArgumentError",
    "LogStream",
    "MoatError",
    "MoatIOError",
    "Mount",
    "Network",
    "Proxy",
    "Run",
    "RunTimeout",
    "__version__",
    "aio",
    "claude",
    "clean",
    "deps",
    "grant",
    "grants",
    "load_config",
    "policy_check",
    "policy_suggest",
    "promote",
    "revoke",
    "run",
    "runs",
    "system_containers",
    "system_images",
    "trace_har",
    "verify_bundle",
]
