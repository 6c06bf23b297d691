"""Checks the local Docker test image built by scripts/build-test-image.sh.

These tests run the real image (no mocks) with ``--network none`` so that they
never send traffic anywhere. If Docker or the image is missing they FAIL (not
skip): the Docker tests depend on this image, so its absence is an error.

Build the image with:  bash scripts/build-test-image.sh
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

IMAGE = os.environ.get("MOAT_TEST_IMAGE", "moat-test:bookworm")
HASH_LABEL = "moat.test-image.hash"
BUILD_HINT = "run `bash scripts/build-test-image.sh` to build it"
TIMEOUT = 120


@functools.lru_cache(maxsize=None)
def _preflight_error() -> str | None:
    """Return a description of what is missing, or None if all is well."""
    if shutil.which("docker") is None:
        return (
            "missing: the `docker` command is not installed (a Docker engine is "
            f"required for the test image {IMAGE}); install Docker, then {BUILD_HINT}"
        )
    try:
        info = subprocess.run(
            ["docker", "info"], capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return f"missing: Docker engine did not answer `docker info` within {TIMEOUT}s"
    if info.returncode != 0:
        return (
            "missing: no Docker engine reachable (`docker info` failed: "
            f"{info.stderr.strip()[:300]}); start dockerd, then {BUILD_HINT}"
        )
    inspect = subprocess.run(
        ["docker", "image", "inspect", IMAGE],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if inspect.returncode != 0:
        return f"missing: Docker image {IMAGE} does not exist; {BUILD_HINT}"
    return None


def require_image() -> None:
    error = _preflight_error()
    if error is not None:
        pytest.fail(error, pytrace=False)


def docker_run(
    command: str | list[str], *, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a throwaway container without any network."""
    require_image()
    argv = ["docker", "run", "--rm", "--network", "none"]
    if user is not None:
        argv += ["--user", user]
    argv.append(IMAGE)
    if isinstance(command, str):
        argv += ["sh", "-c", command]
    else:
        argv += command
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args!r} exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout + result.stderr


def test_image_exists_and_is_labelled() -> None:
    require_image()
    result = subprocess.run(
        [
            "docker",
            "image",
            "inspect",
            "--format",
            f'{{{{ index .Config.Labels "{HASH_LABEL}" }}}}',
            IMAGE,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    label = assert_ok(result).strip()
    assert label and label != "<no value>", (
        f"image {IMAGE} has no {HASH_LABEL} label; it was not built by "
        f"scripts/build-test-image.sh; {BUILD_HINT} --force"
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["curl", "--version"], "curl "),
        (["git", "--version"], "git version"),
        (["ssh", "-V"], "OpenSSH"),  # prints its version on stderr
        (["nc", "-h"], "OpenBSD netcat"),  # netcat-openbsd, usage on stderr
        (["ip", "-V"], "iproute2"),
        (["ps", "--version"], "procps"),
        (["iptables", "--version"], "iptables v"),
        (["python3", "-c", "import ssl, urllib.request; print('py-ok')"], "py-ok"),
        (["python3", "-c", "import requests; print('requests-ok')"], "requests-ok"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_tool_works(command: list[str], expected: str) -> None:
    output = assert_ok(docker_run(command))
    assert expected in output, f"{command!r}: expected {expected!r} in {output!r}"


def test_nc_is_on_path() -> None:
    assert assert_ok(docker_run("command -v nc")).strip() == "/usr/bin/nc"


def test_ca_bundle_present_and_loadable() -> None:
    assert_ok(docker_run("test -s /etc/ssl/certs/ca-certificates.crt"))
    script = (
        "import ssl; ctx = ssl.create_default_context(); "
        "print(ctx.cert_store_stats()['x509_ca'])"
    )
    count = int(assert_ok(docker_run(["python3", "-c", script])).strip())
    assert count > 50, f"only {count} CA certificates loaded by Python's ssl"


def test_non_root_uid_can_run_commands() -> None:
    result = docker_run(["id", "-u"], user="1000:1000")
    assert assert_ok(result).strip() == "1000"
    # The tools must also be usable (root dir traversable, libs readable).
    assert_ok(
        docker_run(
            "cd /tmp && git init -q repo && curl --version >/dev/null "
            "&& python3 -c 'import ssl, urllib.request'",
            user="1000:1000",
        )
    )


def test_container_has_no_network_with_network_none() -> None:
    output = assert_ok(docker_run(["ip", "-o", "link", "show"]))
    interfaces = [line.split(":")[1].strip() for line in output.splitlines() if line]
    assert interfaces == ["lo"], f"unexpected interfaces: {interfaces}"
