"""With MOAT_TESTS_NO_SKIP=1 (scripts/test.sh sets it, so CI has it), a
test that skips fails the session: the engine tests skip when no engine or
image answers, which on a developer's machine is a convenience and in CI
would be a suite that passes with its subject absent. The skips listed here
are the deliberate ones."""

import os

# Reasons a skip may have even in CI, as substrings of its message.
ALLOWED_SKIPS = (
    # The normal-user test needs Docker's socket group; Podman's API socket
    # has none.
    "needs Docker's socket group",
)


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("MOAT_TESTS_NO_SKIP"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    bad = [r for r in skipped if not any(a in str(r.longrepr) for a in ALLOWED_SKIPS)]
    if bad:
        for r in bad:
            print(f"\nskipped, which MOAT_TESTS_NO_SKIP forbids: {r.nodeid}: {r.longrepr}")
        session.exitstatus = 1
