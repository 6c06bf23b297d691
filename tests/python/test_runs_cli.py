"""End-to-end tests of `moat run` and the run commands (list, logs, stop,
destroy, clean, trace, audit) with the real `moat` binary and the real
Docker engine, image moat-test:bookworm.

No traffic leaves this host: api.github.com, github.com and other.test map
(MOAT_RESOLVE) to a local HTTPS upstream with a test CA
(MOAT_UPSTREAM_CA_FILE); raw-TCP targets are listeners of this test on
0.0.0.0, reached at the run network's gateway address."""

import base64
import json
import os
import signal
import time

import pytest

from runhelp import (ENGINE, IMAGE, LABEL, TOKEN, Moat, TcpListener, container_alive, docker_objects,
                     files_holding, gateway_of, make_upstream, others_live, process_gone,
                     require_docker, sh, wait_until)

require_docker()

RUN_FILES = ("run.json", "logs.jsonl", "network.jsonl", "audit.jsonl", "supervisor.log")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = make_upstream(tmp_path_factory.mktemp("upstream"))
    yield server
    server.close()


@pytest.fixture
def m(tmp_path, upstream):
    """A moat home with the github grant, pointed at the local upstream."""
    moat = Moat(tmp_path, upstream)
    moat.grant_github()
    yield moat
    moat.cleanup()


def seen(upstream, path):
    return [r for r in upstream.seen if r["path"] == path]


# 1 ---------------------------------------------------------------------------

def test_demo_curl_gets_the_login_with_the_real_token(m, upstream):
    ws = m.workspace()
    out = m.run(ws, "curl", "-sS", "--max-time", "20", "https://api.github.com/user",
                args=["--grant", "github"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"login": "octocat"}
    [req] = seen(upstream, "/user")[-1:]
    assert req["authorization"] == [f"Bearer {TOKEN}"]
    assert req["host"] == "api.github.com"
    run = m.latest()
    assert run["state"] == "stopped" and run["exit_code"] == 0
    leaks = files_holding([m.dir(run["id"]) / f for f in RUN_FILES], TOKEN)
    assert leaks == [], f"the real token is in {leaks}"


SCAN = r'''
import os, subprocess, sys
# The needles are kept in two halves so that no command line, environment
# or file of this run holds them whole (the scan itself would find them).
needles = {name: bytes.fromhex(a + b) for name, a, b in PIECES}
found = []
def check(where, data):
    for name, n in needles.items():
        if n in data:
            found.append(f"{name} in {where}")
    for key in (b"PRIVATE KEY",):
        if where.startswith(("/etc/moat", "/workspace", "/home", "/tmp", "env", "ps", "/run",
                             "/proc")) and key in data and "scan.py" not in where:
            found.append(f"{key.decode()} in {where}")
env = subprocess.run(["env"], capture_output=True).stdout
check("env", env)
check("ps auxe", subprocess.run(["ps", "auxe"], capture_output=True).stdout)
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for f in ("environ", "cmdline"):
            try:
                check(f"/proc/{pid}/{f}", open(f"/proc/{pid}/{f}", "rb").read())
            except OSError:
                pass
files = 0
for top in ["/"]:
    for root, dirs, names in os.walk(top):
        if root == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        for n in names:
            p = os.path.join(root, n)
            try:
                if os.path.islink(p) or not os.path.isfile(p) or os.path.getsize(p) > 64 << 20:
                    continue
                with open(p, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            files += 1
            check(p, data)
print("GITHUB_TOKEN=" + os.environ.get("GITHUB_TOKEN", "<unset>"))
print("GH_TOKEN=" + os.environ.get("GH_TOKEN", "<unset>"))
print(f"scanned {files} files")
for f in found:
    print("FOUND " + f)
print("SCAN DONE")
'''


def private_key_needles(name, path):
    """What would give a private key away: its private scalar (raw and hex)
    and the lines of its PEM that encode scalar bytes (the other lines hold
    only public-key bytes, which the CA certificate may share)."""
    text = path.read_bytes()
    if b"PRIVATE KEY" not in text:
        assert len(text) >= 16, f"{path} is too short to be a key"
        return [(f"{name} file", text), (f"{name} file hex", text.hex().encode())]
    body = [l for l in text.decode().splitlines() if l and not l.startswith("-----")]
    der = base64.b64decode("".join(body))
    dump = sh("openssl", "pkey", "-in", str(path), "-noout", "-text", check=True).stdout
    hexpart = dump.split("priv:")[1].split("pub:")[0]
    scalar = bytes.fromhex("".join(hexpart.split()).replace(":", ""))
    scalar = scalar.lstrip(b"\0") if len(scalar) > 32 else scalar
    off = der.find(scalar)
    assert off > 0, "cannot find the private scalar in the key"
    out = [(f"{name} scalar", scalar), (f"{name} scalar hex", scalar.hex().encode())]
    for i, line in enumerate(body):
        lo, hi = 48 * i, 48 * (i + 1)
        if lo < off + len(scalar) and off < hi:
            out.append((f"{name} PEM line {i}", line.encode()))
    return out


def halves(name, secret):
    mid = len(secret) // 2
    return (name, secret[:mid], secret[mid:])


def test_no_real_token_nor_ca_key_inside_the_container(m, upstream):
    ws = m.workspace()
    # A first run creates the proxy's CA; its key must not be readable inside.
    first = m.run(ws, "true", args=["--grant", "github"])
    assert first.returncode == 0, first.stderr
    needles = [("real token", TOKEN.encode())]
    needles += private_key_needles("CA key", m.home / "proxy" / "ca" / "ca.key")
    signing = m.home / "audit" / "signing.key"
    if signing.exists():
        needles += private_key_needles("audit signing key", signing)
    pieces = [halves(name, needle.hex()) for name, needle in needles]
    (ws / "scan.py").write_text(f"PIECES = {pieces!r}\n" + SCAN)
    os.chown(ws / "scan.py", 1000, 1000)
    out = m.run(ws, "sh", "-c", "env; cat /proc/*/environ | tr '\\0' '\\n'; ps auxe; "
                "timeout 300 python3 /workspace/scan.py",
                args=["--grant", "github"], timeout=360)
    (ws / "scan.py").unlink()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SCAN DONE" in out.stdout, out.stdout[-2000:]
    assert TOKEN not in out.stdout + out.stderr
    found = [l for l in out.stdout.splitlines() if l.startswith("FOUND ")]
    assert found == [], found
    # The grant's placeholders are there, and are not the token.
    env = dict(l.split("=", 1) for l in out.stdout.splitlines()
               if l.startswith(("GITHUB_TOKEN=", "GH_TOKEN=")))
    assert env.get("GITHUB_TOKEN") not in (None, "", "<unset>", TOKEN), env
    assert env.get("GH_TOKEN") not in (None, "", "<unset>", TOKEN), env
    assert int(out.stdout.split("scanned ")[1].split()[0]) > 1000  # it really walked the FS
    for run in m.runs():
        leaks = files_holding([m.dir(run["id"]) / f for f in RUN_FILES], TOKEN)
        assert leaks == [], f"the real token is in {leaks}"


# 2 ---------------------------------------------------------------------------

@pytest.mark.parametrize("script, code", [
    ("echo to-out; echo to-err >&2; exit 0", 0),
    ("echo to-out; echo to-err >&2; exit 3", 3),
    ("echo to-out; echo to-err >&2; kill -9 $$", 137),
])
def test_exit_codes_and_streams_pass_through(m, script, code):
    out = m.run(m.workspace(), "sh", "-c", script)
    assert out.returncode == code, out.stderr
    assert out.stdout == "to-out\n"
    assert "to-err\n" in out.stderr
    assert "to-out" not in out.stderr
    run = m.latest()
    assert run["exit_code"] == code and run["state"] == "stopped"


# 3 ---------------------------------------------------------------------------

def test_agent_runs_as_the_workspace_owner(m):
    ws = m.workspace(owner=(1234, 1234))
    out = m.run(ws, "sh", "-c", "touch /workspace/f && id -u && id -g")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1234", "1234"]
    st = os.stat(ws / "f")
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    assert m.latest()["user"] == "1234:1234"


# 4 ---------------------------------------------------------------------------

CLIENTS = r'''
set -u
echo "curl: $(curl -sS --max-time 20 https://api.github.com/ca/curl | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
python3 - <<'EOF'
import json, urllib.request
with urllib.request.urlopen("https://api.github.com/ca/urllib", timeout=20) as r:
    print("urllib:", json.load(r)["path"])
import requests
print("requests:", requests.get("https://other.test/ca/requests", timeout=20).json()["path"])
EOF
git -c http.sslVerify=true ls-remote https://github.com/x/y 2>git.err; echo "git-exit: $?"
cat git.err >&2
if command -v node >/dev/null; then
  node -e 'require("https").get("https://api.github.com/ca/node", r => { let b=""; r.on("data", d => b += d); r.on("end", () => console.log("node:", JSON.parse(b).path)); })'
else
  echo "node: absent"
fi
'''


def test_clients_trust_the_proxy_without_any_setup(m, upstream):
    out = m.run(m.workspace(), "sh", "-c", CLIENTS, timeout=120)
    lines = out.stdout.splitlines()
    assert "curl: /ca/curl" in lines, out.stdout + out.stderr
    assert "urllib: /ca/urllib" in lines, out.stdout + out.stderr
    assert "requests: /ca/requests" in lines, out.stdout + out.stderr
    # git spoke TLS to the proxy, trusted it, and its request reached the
    # upstream (which is no git server, so ls-remote itself then fails).
    assert [r for r in upstream.seen if r["path"].startswith("/x/y/info/refs")], out.stderr
    for word in ("SSL", "certificate", "CAfile"):
        assert word not in out.stderr, out.stderr
    if "node: absent" in lines:
        pass  # no node in the image; nothing to check
    else:
        assert "node: /ca/node" in lines, out.stdout + out.stderr


# 5 ---------------------------------------------------------------------------

def test_detach_list_logs_stop_destroy_clean(m):
    ws = m.workspace()
    run_id = m.detach(ws, "sh", "-c", "echo started; sleep 300")
    try:
        [run] = [r for r in m.runs() if r["id"] == run_id]
        assert run["state"] == "running"
        assert container_alive(run_id)
        assert m.wait_log(run_id, "started")
        logs = m("logs", run_id, check=True)
        assert logs.stdout == "started\n"
        # By id prefix and by name, too.
        assert m("logs", run_id[:9], check=True).stdout == "started\n"
        assert m("logs", run["name"], check=True).stdout == "started\n"
        # `moat logs -f` ends when its reader does (`| head -1`), not when
        # the run does: the run here prints a line a second for 300 s.
        ticker = m.detach(ws, "sh", "-c", "while true; do echo tick; sleep 1; done")
        assert m.wait_log(ticker, "tick")
        follow = m.popen("logs", "-f", ticker)
        assert follow.stdout.readline() == "tick\n"
        follow.stdout.close()  # the reader goes
        try:
            follow.wait(timeout=15)
        finally:
            follow.kill()
            m("stop", ticker, check=True, timeout=60)
        human = m("list", check=True).stdout
        assert run_id in human and "running" in human
        t0 = time.time()
        m("stop", run_id, check=True, timeout=60)
        assert time.time() - t0 < 55
        [run] = [r for r in m.runs() if r["id"] == run_id]
        assert run["state"] == "stopped"
        assert docker_objects(run_id) == ([], [])
        m("destroy", run_id, check=True)
        assert not m.dir(run_id).exists()
        assert run_id not in [r["id"] for r in m.runs()]
        # clean -f removes stopped runs (not running ones) and prints JSON.
        done = m.run(ws, "true")
        assert done.returncode == 0
        stopped_id = m.latest()["id"]
        live_id = m.detach(ws, "sleep", "300")
        if others_live([run_id, stopped_id, live_id]):
            pytest.skip("another MOAT_HOME has live runs on this engine, and `moat clean -f` "
                        "would remove them (see test_clean_leaves_the_live_runs_of_another_home_alone)")
        cleaned = json.loads(m("clean", "-f", "--json", check=True).stdout)
        assert stopped_id in cleaned["runs"]
        assert live_id not in cleaned["runs"]
        assert not m.dir(stopped_id).exists()
        assert m.dir(live_id).exists() and container_alive(live_id)
        m("stop", live_id, check=True)
        for rid in (run_id, stopped_id, live_id):
            assert docker_objects(rid) == ([], []), rid
    finally:
        m.cleanup()
    ps = sh(ENGINE, "ps", "-a", "--filter", f"label={LABEL}", "--format",
            '{{.Label "dev.moat.run"}}').stdout
    nets = sh(ENGINE, "network", "ls", "--filter", f"label={LABEL}", "--format",
              "{{.Name}}").stdout
    assert run_id not in ps and run_id not in nets


def test_clean_leaves_the_live_runs_of_another_home_alone(m, tmp_path, upstream):
    """Two MOAT_HOMEs on one engine: `moat clean -f` in one must not remove
    the other's running container (it is no leftover of its own)."""
    run_id = m.detach(m.workspace(), "sleep", "300")
    other = Moat(tmp_path / "other", upstream)
    try:
        other("clean", "-f", "--json", check=True)
        assert container_alive(run_id), \
            "`moat clean -f` in another MOAT_HOME removed this home's running container"
        assert m.meta(run_id)["state"] == "running"
    finally:
        other.cleanup()


# 6 ---------------------------------------------------------------------------

def test_names_are_unique_among_running_runs(m):
    ws = m.workspace()
    first = m.detach(ws, "sleep", "300", args=["--name", "twin"])
    out = m.run(ws, "true", args=["--name", "twin"], timeout=60)
    assert out.returncode != 0
    assert "Name already in use" in out.stderr, out.stderr
    assert m.meta(first)["state"] == "running" and container_alive(first)
    assert len([r for r in m.runs() if r["name"] == "twin" and r["state"] == "running"]) == 1
    m("stop", first, check=True)
    # Once the first has stopped, the name is free again.
    again = m.run(ws, "true", args=["--name", "twin"])
    assert again.returncode == 0, again.stderr


# 7 ---------------------------------------------------------------------------

def test_killing_the_attached_cli_leaves_the_run_running(m):
    ws = m.workspace()
    proc = m.popen("run", ws, "--image", IMAGE, "--name", "orphan", "--",
                   "sh", "-c", "echo started; sleep 300")
    try:
        deadline = time.time() + 60
        run_id = None
        while time.time() < deadline and run_id is None:
            runs = [r for r in m.runs() if r["name"] == "orphan"]
            if runs and m.wait_log(runs[0]["id"], "started", timeout=0.5):
                run_id = runs[0]["id"]
        assert run_id, "the run did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(1)
        [run] = [r for r in m.runs() if r["id"] == run_id]
        assert run["state"] == "running"
        assert container_alive(run_id)
        m("stop", run_id, check=True, timeout=60)
        assert m.meta(run_id)["state"] == "stopped"
        assert docker_objects(run_id) == ([], [])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_killing_the_supervisor_marks_the_run_failed_and_removes_it(m):
    run_id = m.detach(m.workspace(), "sleep", "300")
    meta = m.meta(run_id)
    pid = meta["supervisor"][0]
    assert container_alive(run_id)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"_supervise" in f.read()
    os.kill(pid, signal.SIGKILL)
    # Gone (a zombie nobody reaps counts: the CLI that started it has exited).
    wait_until("the killed supervisor is gone", lambda: process_gone(pid), 30)

    def state():
        [run] = [r for r in m.runs() if r["id"] == run_id]
        return run, container_alive(run_id), docker_objects(run_id)

    def failed_and_removed():
        run, alive, objects = state()
        return (run["state"] == "failed" and "supervisor" in (run["error"] or "")
                and not alive and objects == ([], []))

    wait_until("the run is failed and its container and network are gone", failed_and_removed,
               30, show=state)
    [run] = [r for r in m.runs() if r["id"] == run_id]
    assert run["state"] == "failed", run
    assert "supervisor" in (run["error"] or "")
    assert not container_alive(run_id)
    assert docker_objects(run_id) == ([], [])


# 8 ---------------------------------------------------------------------------

def test_docker_not_running_is_a_clear_error(m):
    t0 = time.time()
    out = m("run", m.workspace(), "--image", IMAGE, "--", "true", timeout=30,
            env={"DOCKER_HOST": "unix:///nonexistent.sock",
                 "CONTAINER_HOST": "unix:///nonexistent.sock"})
    assert time.time() - t0 < 30
    assert out.returncode != 0
    err = out.stderr.lower()
    assert ENGINE in err and "engine" in err and "nonexistent.sock" in err, out.stderr
    assert "start" in err, out.stderr
    assert "panicked" not in err


# 9, 10 -------------------------------------------------------------------------

def test_audit_log_of_a_run_verifies_and_holds_its_events(m):
    out = m.run(m.workspace(), "curl", "-sS", "--max-time", "20", "https://api.github.com/user",
                args=["--grant", "github"])
    assert out.returncode == 0, out.stderr
    run_id = m.latest()["id"]
    audit = m("audit", run_id, timeout=60)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    entries = [json.loads(l) for l in (m.dir(run_id) / "audit.jsonl").read_text().splitlines()]
    types = [e["type"] for e in entries]
    for t in ("run_created", "grants_bound", "container_created", "run_started", "run_stopped"):
        assert t in types, types
    assert types.index("run_created") < types.index("run_started") < types.index("run_stopped")
    [req] = [e["data"] for e in entries if e["type"] == "request"]
    assert (req["host"], req["method"], req["path"], req["status"], req["grant"]) == \
        ("api.github.com", "GET", "/user", 200, "github")
    assert [e["data"]["grant"] for e in entries if e["type"] == "credential_injected"] == ["github"]
    [stopped] = [e["data"] for e in entries if e["type"] == "run_stopped"]
    assert stopped["exit_code"] == 0
    assert types.index("run_started") < types.index("request") < types.index("run_stopped")
    assert TOKEN not in (m.dir(run_id) / "audit.jsonl").read_text()
    # A changed entry no longer verifies.
    path = m.dir(run_id) / "audit.jsonl"
    text = path.read_text()
    path.write_text(text.replace('"run_started"', '"run_startex"', 1))
    assert m("audit", run_id, timeout=60).returncode != 0


def test_trace_lists_the_request_with_its_grant(m):
    out = m.run(m.workspace(), "sh", "-c",
                "curl -sS --max-time 20 https://api.github.com/user >/dev/null && "
                "curl -sS --max-time 20 -o /dev/null https://other.test/plain",
                args=["--grant", "github"])
    assert out.returncode == 0, out.stderr
    run_id = m.latest()["id"]
    trace = m("trace", run_id, "--network", "--json", check=True)
    records = [json.loads(l) for l in trace.stdout.splitlines() if l.strip()]
    [user] = [r for r in records if r.get("url") == "https://api.github.com/user"]
    assert user["host"] == "api.github.com"
    assert user["method"] == "GET"
    assert user["status"] == 200
    assert user["grant"] == "github"
    assert not user.get("denied")
    [plain] = [r for r in records if r.get("url") == "https://other.test/plain"]
    assert plain.get("grant") is None
    assert TOKEN not in trace.stdout
    human = m("trace", run_id, "--network", check=True).stdout
    assert "https://api.github.com/user" in human and "[grant: github]" in human


# 11 ----------------------------------------------------------------------------

def test_permissive_raw_tcp_reaches_the_host(m):
    listener = TcpListener()
    try:
        script = ("gw=$(ip route | awk '/^default/ {print $3}'); echo gw=$gw; "
                  "python3 -c 'import socket, sys; s = socket.create_connection((sys.argv[1], "
                  f"{listener.port}), timeout=5); s.sendall(b\"from-container\\n\"); "
                  "print(s.recv(100).decode().strip())' \"$gw\"")
        out = m.run(m.workspace(), "sh", "-c", script)
        assert out.returncode == 0, out.stderr
        gw_line, answer = out.stdout.split()
        # The default route is the run network's gateway, where the proxy is.
        assert gw_line == "gw=" + gateway_of(m.latest())
        assert answer == "HELLO-FROM-HOST"
        time.sleep(0.3)
        assert listener.accepted, "the host listener saw no connection"
        assert b"from-container\n" in listener.data
    finally:
        listener.close()


def test_the_engine_is_chosen_by_flag_or_by_agent_yaml(m):
    """`--runtime` and `runtime:` in agent.yaml choose the engine, over
    MOAT_RUNTIME and the one present; the flag over the file. The run is
    really on that engine: its container is that engine's, not the other's."""
    other = "podman" if ENGINE == "docker" else "docker"
    sh(other, "image", "inspect", IMAGE, check=True)
    ws = m.workspace()
    run_id = m.detach(ws, "sleep", "60", args=["--runtime", other])
    try:
        meta = m.meta(run_id)
        assert meta["engine"] == other, meta
        assert m.wait_state(run_id, ("running",), timeout=60) == "running"
        container = m.meta(run_id)["container"]
        assert sh(other, "inspect", container).returncode == 0, f"{other} runs it"
        assert sh(ENGINE, "inspect", container).returncode != 0, f"{ENGINE} does not"
    finally:
        m("stop", run_id, "-t", "1", timeout=60)
    ws2 = m.workspace("ws2", agent_yaml=f"runtime: {other}\n")
    out = m.run(ws2, "echo", "hello")
    assert out.returncode == 0 and "hello" in out.stdout, out.stderr
    assert m.latest()["engine"] == other
    # The flag wins over the file.
    assert m.run(ws2, "true", args=["--runtime", ENGINE]).returncode == 0
    assert m.latest()["engine"] == ENGINE


def test_the_readmes_main_job_prints_hello_from_moat(m):
    """README's first command, as a newcomer copies it (after setup): the
    example workspace, its command, its output."""
    from runhelp import ROOT
    readme = (ROOT / "README.md").read_text()
    assert "cargo run -q -p moat-cli -- run --image moat-test:bookworm examples/minimal" in readme
    out = m("run", "--image", IMAGE, str(ROOT / "examples" / "minimal"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from moat", out.stdout


def test_the_supervisor_may_open_as_many_descriptors_as_the_host_allows(m):
    """The run's proxy holds up to 4,096 connections, each with its
    upstream: under the usual soft limit of 1,024 open files an agent's
    connections would use up the supervisor's descriptors and cut off its
    proxy, forwarders and router at once. The supervisor raises its soft
    limit to the hard one."""
    import resource
    import subprocess
    from runhelp import MOAT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard)
    if low >= hard:
        pytest.fail(f"this host's hard limit on open files is {hard}: nothing to raise")

    def lowered():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    out = subprocess.run([str(MOAT), "run", m.workspace(), "--image", IMAGE, "-d", "--", "sleep", "60"],
                         capture_output=True, text=True, env=m.env, timeout=120,
                         stdin=subprocess.DEVNULL, preexec_fn=lowered)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    pid = m.meta(run_id)["supervisor"][0]
    limits = open(f"/proc/{pid}/limits").read()
    line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
    got_soft, got_hard = line.split()[3:5]
    assert int(got_soft) == hard and int(got_hard) == hard, line
    m("stop", run_id, check=True)
