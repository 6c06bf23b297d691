"""The first hour of a new user (issue 17's dead ends), through the real CLI
on the real engine: a root user's `mktemp -d` workspace, the reason a run
failed in `list`, `logs` and `status`, exit status 125 for moat's own
failures, endpoint URLs where a user looks, interactive runs without a
terminal, an image that cannot be had, a taken routing port, and the STATE
column."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from runhelp import MOAT, Moat, require_docker, sh

require_docker()

IMAGE = "moat-test:bookworm"
# An image that cannot be had without leaving this host: its registry is a
# closed port on loopback.
MISSING = "127.0.0.1:9/moat-no-such-image:1"


@pytest.fixture
def m(tmp_path):
    return Moat(tmp_path)


def cleanup(m):
    for run in m.runs():
        m("destroy", run["id"], timeout=60)


# A root user's workspace ----------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="run as root (CI does)")
def test_a_root_users_mktemp_workspace_is_readable_and_writable_and_stays_roots(m):
    ws = Path(tempfile.mkdtemp(dir=m.tmp))  # 0700, root's: what `mktemp -d` gives root
    assert (os.stat(ws).st_mode & 0o777, os.stat(ws).st_uid) == (0o700, 0)
    (ws / "index.html").write_text("hello from the workspace\n")
    os.chmod(ws / "index.html", 0o600)
    out = m("run", ws, "--image", IMAGE, "--", "sh", "-c",
            "ls /workspace && cat /workspace/index.html && echo made > /workspace/new && "
            "id -u && grep -i '^CapEff' /proc/self/status && grep -i NoNewPrivs /proc/self/status")
    try:
        assert out.returncode == 0, out.stderr
        assert "index.html" in out.stdout and "hello from the workspace" in out.stdout
        # No warning that the agent cannot write: it can.
        assert "cannot write" not in out.stderr
        st = os.stat(ws / "new")
        assert (st.st_uid, st.st_gid) == (0, 0), "what the agent writes is the owner's"
        assert (ws / "new").read_text() == "made\n"
        # Root in the container without a single capability, for good.
        assert re.search(r"CapEff:\s+0000000000000000", out.stdout), out.stdout
        assert re.search(r"NoNewPrivs:\s+1", out.stdout), out.stdout
        assert m.latest()["user"] == "0:0"
    finally:
        cleanup(m)


@pytest.mark.skipif(os.geteuid() != 0, reason="run as root (CI does)")
def test_a_root_agent_leaves_no_set_user_id_file_nor_an_opened_workspace(m):
    """Root in the container may set the set-user-ID bit on its own files
    and open its workspace to others; at the run's end moat undoes both and
    says so, so no root-owned set-user-ID file is left for other users."""
    ws = Path(tempfile.mkdtemp(dir=m.tmp))
    (ws / "mine").write_text("the user's own\n")
    os.chmod(ws / "mine", 0o4755)  # the user's own, from before the run: kept
    out = m("run", ws, "--image", IMAGE, "--", "sh", "-c",
            "cp /bin/sh /workspace/rootshell && chmod 4755 /workspace/rootshell && "
            "mkdir -p /workspace/d && cp /bin/true /workspace/d/g && chmod 2755 /workspace/d/g && "
            "chmod 755 /workspace && stat -c %a /workspace/rootshell")
    try:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "4755", "the agent could set the bit (root, no capability)"
        assert os.stat(ws / "rootshell").st_mode & 0o7777 == 0o755
        assert os.stat(ws / "d" / "g").st_mode & 0o7777 == 0o755
        assert os.stat(ws).st_mode & 0o777 == 0o700, oct(os.stat(ws).st_mode)
        assert os.stat(ws / "mine").st_mode & 0o7777 == 0o4755
        logs = m("logs", m.latest()["id"]).stderr + out.stderr
        assert "rootshell" in logs and "cleared" in logs, logs
        assert "mode" in logs, logs
    finally:
        cleanup(m)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_normal_user_runs_as_themself_in_their_own_workspace():
    """moat started by a normal user (in the engine's group): the agent has
    that user's uid, reads their 0700 workspace and what it writes is
    theirs."""
    docker_gid = subprocess.run(["getent", "group", "docker"], capture_output=True,
                                text=True).stdout.split(":")
    if len(docker_gid) < 3 or os.environ.get("MOAT_RUNTIME", "docker") != "docker":
        pytest.skip("needs Docker's socket group to run moat as a normal user")
    uid = 4321
    # Outside pytest's 0700 directory, which the user could not enter.
    base = Path(tempfile.mkdtemp(prefix="moat-user-"))
    os.chown(base, uid, uid)
    ws, home = base / "ws", base / "home"
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}",
               f"--groups={docker_gid[2]}", "--"]
    env = {k: v for k, v in os.environ.items() if k not in ("MOAT_HOME", "DOCKER_HOST")}
    env.update(MOAT_HOME=str(home), HOME=str(base), MOAT_KEYRING_BACKEND="file")
    subprocess.run(setpriv + ["sh", "-c", f"mkdir -m 700 {ws} && echo mine > {ws}/f && chmod 600 {ws}/f"],
                   check=True, env=env)
    try:
        out = subprocess.run(setpriv + [str(MOAT), "run", str(ws), "--image", IMAGE, "--",
                                        "sh", "-c", "cat /workspace/f && id -u && touch /workspace/g"],
                             capture_output=True, text=True, timeout=120, env=env,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["mine", str(uid)]
        assert os.stat(ws / "g").st_uid == uid
    finally:
        runs = subprocess.run(setpriv + [str(MOAT), "list", "--json"], capture_output=True,
                              text=True, env=env).stdout
        for run in json.loads(runs or "[]"):
            subprocess.run(setpriv + [str(MOAT), "destroy", run["id"]], env=env,
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# Failures: said where the user looks, and told apart by exit status ---------

def test_a_run_moat_could_not_start_exits_125_and_says_why_everywhere(m):
    ws = m.workspace()
    out = m("run", ws, "--image", MISSING, "--", "true")
    try:
        assert out.returncode == 125, (out.returncode, out.stderr)
        # Which image, what chose it, and how to choose another.
        assert MISSING in out.stderr and "--image" in out.stderr, out.stderr
        assert "chosen by --image" in out.stderr and "dependencies:" in out.stderr
        [run] = m.runs()
        assert run["state"] == "failed" and run["error"]

        listing = m("list")
        assert listing.returncode == 0
        row = [l for l in listing.stdout.splitlines() if run["id"] in l]
        assert row and "failed" in row[0]
        assert "! " in listing.stdout and "cannot get image" in listing.stdout, listing.stdout

        logs = m("logs", run["id"])
        assert "failed" in logs.stderr and "cannot get image" in logs.stderr, logs.stderr

        status = m("status")
        assert "Failed runs:" in status.stdout and run["id"] in status.stdout
        assert "cannot get image" in status.stdout
    finally:
        cleanup(m)


def test_a_command_keeps_its_own_exit_status_and_a_bad_config_is_moats_125(m):
    ws = m.workspace()
    out = m.run(ws, "sh", "-c", "exit 3")
    assert out.returncode == 3, out.stderr
    bad = m.workspace("bad", agent_yaml="network:\n  policy: sometimes\n")
    out = m("run", bad, "--image", IMAGE, "--", "true")
    assert out.returncode == 125, (out.returncode, out.stderr)
    assert "agent.yaml:2" in out.stderr, out.stderr
    cleanup(m)


def test_status_exits_1_when_it_reports_a_problem(m):
    dead = m.tmp / "no-engine.sock"
    out = m("status", env={"DOCKER_HOST": f"unix://{dead}"})
    assert "PROBLEM" in out.stdout, out.stdout
    assert out.returncode == 1, out.returncode
    assert m("status", "--json", env={"DOCKER_HOST": f"unix://{dead}"}).returncode == 1


# URLs --------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_detached_run_with_ports_prints_its_urls_and_list_shows_them(m):
    port = free_port()
    ws = m.workspace(agent_yaml="ports:\n  web: 3000\n  api: 4000\n")
    out = m("run", "-d", ws, "--image", IMAGE, "--name", "url-demo", "--", "sleep", "60",
            env={"MOAT_PROXY_PORT": str(port)})
    try:
        assert out.returncode == 0, out.stderr
        for name in ("web", "api"):
            assert f"{name}: https://{name}.url-demo.localhost:{port}" in out.stderr, out.stderr
        listing = m("list").stdout
        assert f"https://web.url-demo.localhost:{port}" in listing, listing
        assert f"https://api.url-demo.localhost:{port}" in listing, listing
    finally:
        cleanup(m)
        m("proxy", "stop")


def test_a_taken_routing_port_says_how_to_choose_another(m):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ws = m.workspace(agent_yaml="ports:\n  web: 3000\n")
        out = m("run", ws, "--image", IMAGE, "--", "true", env={"MOAT_PROXY_PORT": str(port)})
    try:
        assert out.returncode == 125, out.stderr
        assert "MOAT_PROXY_PORT" in out.stderr and "--port" in out.stderr, out.stderr
    finally:
        cleanup(m)


# Interactive without a terminal ----------------------------------------------

def test_interactive_without_a_terminal_is_refused_before_anything_starts(m):
    ws = m.workspace()
    out = subprocess.run([str(MOAT), "run", "-i", str(ws), "--image", IMAGE, "--", "echo", "hi"],
                         input="piped\n", capture_output=True, text=True, env=m.env, timeout=60)
    assert out.returncode == 125, (out.returncode, out.stderr)
    assert "needs a terminal" in out.stderr and "standard input" in out.stderr, out.stderr
    assert m.runs() == [], "nothing was started"
    # The same from agent.yaml.
    ws2 = m.workspace("ws2", agent_yaml="interactive: true\n")
    out = subprocess.run([str(MOAT), "run", str(ws2), "--image", IMAGE, "--", "echo", "hi"],
                         input="", capture_output=True, text=True, env=m.env, timeout=60)
    assert out.returncode == 125 and "needs a terminal" in out.stderr, out.stderr
    # Detached, it needs none: attach later from a terminal.
    run = m("run", "-d", "-i", ws, "--image", IMAGE, "--", "sh", "-c", "echo ready; sleep 30")
    assert run.returncode == 0, run.stderr
    try:
        run_id = m.runs()[0]["id"]
        # Attaching without one is refused the same way, and the run goes on.
        out = subprocess.run([str(MOAT), "attach", run_id], input="piped\n",
                             capture_output=True, text=True, env=m.env, timeout=60)
        assert out.returncode == 125, (out.returncode, out.stderr)
        assert "needs a terminal" in out.stderr and "standard input" in out.stderr, out.stderr
        assert f"moat logs -f {run_id}" in out.stderr, out.stderr
        assert m.meta(run_id)["state"] in ("starting", "running"), m.meta(run_id)
    finally:
        cleanup(m)


# The STATE column ----------------------------------------------------------------

def test_list_keeps_its_columns_with_long_states_and_names(m):
    ws = m.workspace()
    run_id = m.detach(ws, "sleep", "60", args=["--name", "a-rather-long-run-name-indeed"])
    m("stop", run_id, check=True, timeout=60)
    m.run(ws, "true")
    try:
        lines = m("list", check=True).stdout.splitlines()
        header = lines[0]
        age_at = header.index("AGE")
        rows = [l for l in lines[1:] if not l.startswith("  ")]
        assert any("exited(" in r for r in rows), lines
        for r in rows:
            # Each row's AGE starts where the header's does: nothing pushed it.
            assert re.match(r"\d+[smhd]\b", r[age_at:]), (header, r)
    finally:
        cleanup(m)


SERVE_AND_CALL = r'''
set -u
cd /workspace && echo "served from $MOAT_RUN_NAME" > index.html
python3 -m http.server 3000 --bind 0.0.0.0 >/dev/null 2>&1 &
for i in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:3000/ && break; sleep 0.1; done
echo "own: $(curl -sS --max-time 10 "$MOAT_URL_WEB/index.html")"
echo "python: $(python3 -c 'import os, urllib.request; print(urllib.request.urlopen(os.environ["MOAT_URL_WEB"] + "/index.html", timeout=10).read().decode().strip())')"
echo "other: $(curl -s --max-time 10 -o /dev/null -w '%{http_code}' "http://web.someone-else.localhost:${MOAT_URL_WEB##*:}/")"
# The same connection, its own endpoint first, then another's or the
# listing: judged per request, not per connection.
echo "listing: $(curl -s --max-time 10 -o /dev/null -w '%{http_code}' -H 'Host: localhost' "$MOAT_URL_WEB/")"
python3 - <<'PY'
import os, socket
port = int(os.environ["MOAT_URL_WEB"].rsplit(":", 1)[1])
me = os.environ["MOAT_URL_WEB"].split("//")[1].rsplit(":", 1)[0]
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.sendall(f"GET /index.html HTTP/1.1\r\nHost: {me}\r\n\r\n".encode()
          + b"GET / HTTP/1.1\r\nHost: api.someone-else.localhost\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
import re
statuses = [m.decode() for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]
print("pipelined:", " ".join(statuses))
PY
'''


@pytest.mark.parametrize("policy", ["permissive", "strict"])
def test_moat_url_works_from_inside_the_container(m, policy):
    """A service calling itself by its URL (OAuth callbacks, webhooks): the
    URL names loopback, which inside the container is the container's own;
    moat sends it to the routing proxy, for this run's endpoints only."""
    port = free_port()
    ws = m.workspace(agent_yaml=f"ports:\n  web: 3000\nnetwork:\n  policy: {policy}\n")
    out = m("run", ws, "--image", IMAGE, "--name", f"self-{policy}", "--", "bash", "-c",
            SERVE_AND_CALL, env={"MOAT_PROXY_PORT": str(port)}, timeout=120)
    try:
        assert out.returncode == 0, out.stderr
        assert f"own: served from self-{policy}" in out.stdout, out.stdout + out.stderr
        assert f"python: served from self-{policy}" in out.stdout, out.stdout + out.stderr
        # Another agent's endpoint is not this run's to reach.
        assert "other: 403" in out.stdout, out.stdout
        assert "listing: 403" in out.stdout, out.stdout
        assert "pipelined: 200 403" in out.stdout, out.stdout
        assert "cannot be reached from inside" not in out.stdout + out.stderr
    finally:
        cleanup(m)
        m("proxy", "stop")
