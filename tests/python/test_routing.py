"""Hostname routing with real runs: two agents serving on the same container
port, reached at their own names over HTTP and HTTPS on one port, in
permissive and strict mode; MOAT_URL_* inside; routes gone when a run ends;
a router restart keeps the routes of runs still running; the URLs from
Python."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

import moat
from runhelp import ENGINE

ROOT = Path(__file__).resolve().parents[2]
MOAT = ROOT / "target" / "debug" / "moat"
IMAGE = os.environ.get("MOAT_TEST_IMAGE", "moat-test:bookworm")


def _ready():
    try:
        subprocess.run([ENGINE, "image", "inspect", IMAGE], check=True, capture_output=True, timeout=20)
        return MOAT.exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ready(), reason=f"needs a Docker engine, {IMAGE} and {MOAT}")

SERVER = ("mkdir -p /tmp/s && echo \"hello from $MOAT_RUN_NAME at $MOAT_URL_WEB\" > /tmp/s/index.html"
          " && cd /tmp/s && exec python3 -m http.server 3000")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "MOAT_HOME": str(tmp_path / "home"), "MOAT_PROXY_PORT": str(free_port())}
    yield e
    for run in json.loads(subprocess.run([str(MOAT), "list", "--json"], env=e, capture_output=True,
                                         text=True).stdout or "[]"):
        subprocess.run([str(MOAT), "destroy", run["id"]], env=e, capture_output=True, timeout=60)
    subprocess.run([str(MOAT), "proxy", "stop"], env=e, capture_output=True, timeout=30)


def moat_cli(env, *args, check=True):
    return subprocess.run([str(MOAT), *args], env=env, capture_output=True, text=True, timeout=120,
                          check=check)


def start_agent(env, tmp_path, name, policy="permissive"):
    ws = tmp_path / name
    ws.mkdir()
    (ws / "agent.yaml").write_text(
        f"name: {name}\nports:\n  web: 3000\nnetwork:\n  policy: {policy}\n"
        f"command: [\"sh\", \"-c\", {json.dumps(SERVER)}]\n")
    return moat_cli(env, "run", "-d", "--image", IMAGE, str(ws)).stdout.strip()


def curl(env, url, *extra):
    ca = Path(env["MOAT_HOME"]) / "proxy" / "ca" / "ca.crt"
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-w", "\n%{http_code}",
                          *extra, url], capture_output=True, text=True)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def wait_ok(env, url, timeout=60):
    deadline = time.time() + timeout
    while True:
        code, body = curl(env, url)
        if code == 200 or time.time() > deadline:
            return code, body
        time.sleep(0.2)


@pytest.mark.parametrize("policy", ["permissive", "strict"])
def test_two_agents_on_the_same_port_each_at_its_own_name(env, tmp_path, policy):
    port = env["MOAT_PROXY_PORT"]
    start_agent(env, tmp_path, "dark-mode", policy)
    start_agent(env, tmp_path, "checkout", policy)
    for agent in ("dark-mode", "checkout"):
        for scheme in ("https", "http"):
            code, body = wait_ok(env, f"{scheme}://web.{agent}.localhost:{port}/")
            assert code == 200, body
            # The page was written inside from MOAT_URL_WEB: its own URL.
            assert body.strip() == f"hello from {agent} at https://web.{agent}.localhost:{port}", body
    status = moat_cli(env, "proxy", "status").stdout
    assert f"Port: {port}" in status and "dark-mode" in status and "checkout" in status
    listing = moat_cli(env, "list").stdout
    assert "web" in listing
    # An unknown agent gets the list, never someone else's page.
    code, body = curl(env, f"https://web.nobody.localhost:{port}/")
    assert code == 404 and "web.dark-mode.localhost" in body and "hello from" not in body


def test_routes_go_when_runs_end_and_survive_a_router_restart(env, tmp_path):
    port = env["MOAT_PROXY_PORT"]
    a = start_agent(env, tmp_path, "alpha")
    start_agent(env, tmp_path, "beta")
    assert wait_ok(env, f"http://web.alpha.localhost:{port}/")[0] == 200
    # A restart of the router (by hand this time) keeps the running routes.
    moat_cli(env, "proxy", "stop")
    moat_cli(env, "proxy", "start")
    assert wait_ok(env, f"http://web.beta.localhost:{port}/")[0] == 200
    assert wait_ok(env, f"http://web.alpha.localhost:{port}/")[0] == 200
    moat_cli(env, "stop", a)
    code, _ = curl(env, f"http://web.alpha.localhost:{port}/")
    assert code == 404
    assert wait_ok(env, f"http://web.beta.localhost:{port}/")[0] == 200


def test_a_router_started_for_runs_stops_with_the_last(env, tmp_path):
    port = env["MOAT_PROXY_PORT"]
    a = start_agent(env, tmp_path, "solo")
    assert wait_ok(env, f"http://web.solo.localhost:{port}/")[0] == 200
    assert "Status: running" in moat_cli(env, "proxy", "status").stdout
    moat_cli(env, "stop", a)
    assert "Status: not running" in moat_cli(env, "proxy", "status").stdout


def test_python_sees_the_urls_of_a_run(env, tmp_path, monkeypatch):
    for k in ("MOAT_HOME", "MOAT_PROXY_PORT"):
        monkeypatch.setenv(k, env[k])
    ws = tmp_path / "py-ws"
    ws.mkdir()
    (ws / "agent.yaml").write_text("name: pyweb\nports:\n  web: 3000\n  api: 4000\n")
    r = moat.run(ws, image=IMAGE, command=["sh", "-c", "echo $MOAT_ENDPOINTS $MOAT_URL_API"])
    port = env["MOAT_PROXY_PORT"]
    assert r.output == f"api,web https://api.pyweb.localhost:{port}\n"
    assert r.info()["urls"] == {"web": f"https://web.pyweb.localhost:{port}",
                                "api": f"https://api.pyweb.localhost:{port}"}
    assert r.urls == r.info()["urls"]


def _chromium():
    import shutil
    return shutil.which("chromium") and shutil.which("certutil")


@pytest.mark.skipif(not _chromium(), reason="needs Debian's chromium and libnss3-tools (scripts/setup.sh installs them)")
def test_a_browser_opens_the_agent_over_https_with_the_moat_ca_trusted(env, tmp_path):
    port = env["MOAT_PROXY_PORT"]
    ws = tmp_path / "browser-ws"
    ws.mkdir()
    page = ("<html><body style='background:#1e90ff;color:white;font:48px sans-serif'>"
            "<h1 id=title>Served by browser-agent through moat</h1></body></html>")
    (ws / "agent.yaml").write_text(
        "name: browser-agent\nports:\n  web: 3000\n"
        f"command: [\"sh\", \"-c\", {json.dumps('mkdir -p /tmp/s && cd /tmp/s && printf %s ' + json.dumps(page) + ' > index.html && exec python3 -m http.server 3000')}]\n")
    moat_cli(env, "run", "-d", "--image", IMAGE, str(ws))
    url = f"https://web.browser-agent.localhost:{port}/"
    assert wait_ok(env, url)[0] == 200
    # A profile of the browser's own, trusting the moat CA (as a user would
    # once), in a home of its own.
    browser_home = tmp_path / "browser-home"
    nssdb = browser_home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    ca = Path(env["MOAT_HOME"]) / "proxy" / "ca" / "ca.crt"
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "moat", "-i", str(ca)],
                   check=True)
    benv = {**os.environ, "HOME": str(browser_home)}
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,600"]

    def browse(args, env):
        # Docker adding or removing other runs' interfaces makes Chromium
        # abandon a load with ERR_NETWORK_CHANGED; that is retried.
        for _ in range(5):
            out = subprocess.run(["chromium", *args], env=env, capture_output=True, text=True,
                                 timeout=120)
            if "ERR_NETWORK_CHANGED" not in out.stderr:
                return out
            time.sleep(1)
        return out

    dom = browse([*flags, "--dump-dom", url], benv)
    assert "Served by browser-agent through moat" in dom.stdout, dom.stderr[-2000:]
    # Control: the same browser without the CA trusted does not show it.
    untrusting = tmp_path / "no-ca-home"
    untrusting.mkdir()
    dom = browse([*flags[:-2], f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", url],
                 {**os.environ, "HOME": str(untrusting)})
    assert "Served by browser-agent through moat" not in dom.stdout
    assert "ERR_CERT_AUTHORITY_INVALID" in dom.stderr, dom.stderr[-2000:]
    shot = tmp_path / "screenshot.png"
    browse([*flags, f"--screenshot={shot}", url], benv)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 600)
    # Keep it where a person can look at it.
    out = ROOT / "target" / "routing-screenshot.png"
    out.write_bytes(data)
