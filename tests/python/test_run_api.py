"""moat.run / moat.Run from Python, against the real Docker engine and the
local test image (built by scripts/build-test-image.sh)."""

import json
import os
import subprocess
import threading
import time

import pytest

import moat
from runhelp import ENGINE
from upstream import Upstream, make_ca

IMAGE = os.environ.get("MOAT_TEST_IMAGE", "moat-test:bookworm")
TOKEN = "ghp_pyRunTokenABCDEFGHIJKLMNOPQRSTUVWXYZ01"


def _docker_ready():
    try:
        subprocess.run([ENGINE, "image", "inspect", IMAGE], check=True, capture_output=True, timeout=20)
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _docker_ready(), reason=f"needs a Docker engine and {IMAGE}")


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("MOAT_HOME", str(h))
    monkeypatch.setenv("MOAT_KEYRING_BACKEND", "file")
    yield h
    moat.clean(home=h)


@pytest.fixture
def workspace(tmp_path):
    w = tmp_path / "ws"
    w.mkdir()
    os.chown(w, 1234, 1234)
    return w


def test_run_returns_exit_code_and_both_streams(home, workspace):
    r = moat.run(workspace, command=["sh", "-c", "echo out; echo err >&2; touch made; exit 7"],
                 image=IMAGE, env={"A": "1"})
    assert r.run_id.startswith("run_") and len(r.run_id) == 16
    assert r.exit_code == 7
    assert r.state == "stopped"
    assert r.output == "out\n"
    assert r.stderr == "err\n"
    st = os.stat(workspace / "made")
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    info = r.info()
    assert info["env"] == ["A"] and info["user"] == "1234:1234"
    report = r.audit().verify()
    assert report["ok"] and dict(report["types"])["run_stopped"] == 1


def test_follow_logs_while_running_and_wait_releases_the_gil(home, workspace):
    # A second between lines: following lasts seconds, so a ticker that
    # runs while it does ticks many times (each 50 ms) even on a slow machine.
    with moat.Run.start(workspace, command=["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"],
                        image=IMAGE, name="py-follow") as r:
        assert r.name == "py-follow"
        ticks = []
        stop = threading.Event()

        def ticker():
            while not stop.is_set():
                ticks.append(time.monotonic())
                time.sleep(0.05)

        t = threading.Thread(target=ticker)
        t.start()
        chunks = list(r.logs(follow=True))
        stop.set()
        t.join()
        assert [c for _, c in chunks] == [b"1\n", b"2\n", b"3\n"]
        assert len(ticks) > 5, "the GIL was held while following"
        assert r.wait() == 0
    assert moat.Run("py-follow", home=home).exit_code == 0


def test_context_manager_stops_a_running_run(home, workspace):
    with moat.Run.start(workspace, command=["sleep", "300"], image=IMAGE) as r:
        assert r.state == "running"
        assert r.wait(timeout=0.2) is None
    assert r.state == "stopped"
    assert r.exit_code in (137, 143)
    out = subprocess.run([ENGINE, "ps", "-aq", "--filter", f"label=dev.moat.run={r.run_id}"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_timeout_stops_the_run(home, workspace):
    t = time.monotonic()
    with pytest.raises(moat.RunTimeout) as info:
        moat.run(workspace, command=["sleep", "300"], image=IMAGE, timeout=0.5)
    # Well before the command's own 300 s (the start itself can take a while).
    assert time.monotonic() - t < 120
    r = info.value.run
    assert r.state == "stopped" and r.exit_code in (137, 143)


def test_detach_then_reopen_and_destroy(home, workspace):
    r = moat.run(workspace, command=["sh", "-c", "echo started; sleep 300"], image=IMAGE, detach=True)
    assert r.state == "running"
    assert [x["id"] for x in moat.runs(home=home)] == [r.run_id]
    again = moat.Run(r.run_id[:10], home=home)
    deadline = time.monotonic() + 30
    while "started" not in again.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert again.output == "started\n"
    again.destroy()
    assert moat.runs(home=home) == []
    with pytest.raises(moat.InvalidArgumentError, match="no run matches"):
        moat.Run(r.run_id, home=home)


def test_grant_is_injected_and_traced_but_never_inside(home, workspace, tmp_path, monkeypatch):
    ca, cert, key = make_ca(tmp_path)
    up = Upstream(cert, key)
    up.users = {TOKEN: "octocat"}
    try:
        monkeypatch.setenv("MOAT_UPSTREAM_CA_FILE", ca)
        monkeypatch.setenv("MOAT_RESOLVE", ",".join(f"{k}={v}" for k, v in up.resolve().items()))
        moat.grant("github", token=TOKEN, validate=False, home=home)
        r = moat.run(workspace, image=IMAGE, grants=["github"],
                     command=["sh", "-c", "curl -s https://api.github.com/user; echo; env"])
        assert r.exit_code == 0, r.stderr
        assert '"login": "octocat"' in r.output
        assert TOKEN not in r.output
        assert "GITHUB_TOKEN=" in r.output  # the placeholder
        assert up.seen[-1]["authorization"] == [f"Bearer {TOKEN}"]
        trace = r.trace()
        assert trace[0]["host"] == "api.github.com" and trace[0]["grant"] == "github"
        assert trace[0]["status"] == 200
        for root, _, files in os.walk(r.dir):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    assert TOKEN.encode() not in f.read(), name
    finally:
        up.close()


def test_the_engine_is_chosen_and_remembered(home, workspace, monkeypatch):
    r = moat.run(workspace, image=IMAGE, runtime=ENGINE, command=["true"])
    assert r.exit_code == 0 and r.info()["engine"] == ENGINE
    # MOAT_RUNTIME is the default; a bad one is named.
    monkeypatch.setenv("MOAT_RUNTIME", "lxc")
    with pytest.raises(moat.InvalidArgumentError, match="MOAT_RUNTIME"):
        moat.run(workspace, image=IMAGE, command=["true"])
    # The argument wins over it.
    r = moat.run(workspace, image=IMAGE, runtime=ENGINE, command=["true"])
    assert r.info()["engine"] == ENGINE


def test_strict_network_argument(home, workspace):
    r = moat.run(workspace, image=IMAGE, network={"policy": "strict", "allow": ["api.github.com"]},
                 command=["sh", "-c", "curl -s -o /dev/null -w '%{http_connect} %{http_code}' https://blocked.test/"])
    # The CONNECT is answered; the refusal comes inside TLS.
    assert r.output == "200 403"
    assert r.info()["policy"] == "strict"


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"network": "lenient"}, moat.InvalidArgumentError, "lenient"),
    ({"network": {"mode": "strict"}}, moat.InvalidArgumentError, "unknown key \"mode\""),
    ({"network": {"policy": "strict", "allow": ["*"]}}, moat.InvalidArgumentError,
     'network.allow[0] "*"'),
    ({"name": "Not A Name"}, moat.InvalidArgumentError, "name: invalid agent name"),
    ({"env": {"1BAD": "x"}}, moat.InvalidArgumentError, "env.1BAD: "),
    ({"runtime": "kubernetes"}, moat.InvalidArgumentError,
     'runtime: "kubernetes" is not a container engine'),
    ({"grants": ["githb"]}, moat.InvalidArgumentError, 'grants "githb": unknown grant provider'),
    ({"image": ""}, moat.InvalidArgumentError, "image: empty image name"),
])
def test_bad_arguments_name_what_is_wrong(home, workspace, kwargs, error, needle):
    with pytest.raises(error) as e:
        moat.run(workspace, **{"image": IMAGE, "command": ["true"], **kwargs})
    assert needle in str(e.value)
    # In the keywords' own words, never the CLI's flags.
    assert "--" not in str(e.value) and "-e " not in str(e.value), str(e.value)


def test_missing_workspace_is_an_io_error(home, tmp_path):
    with pytest.raises(moat.MoatError, match="nope"):
        moat.run(tmp_path / "nope", image=IMAGE, command=["true"])


def test_no_engine_is_a_container_runtime_error(home, workspace, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        m.setenv("CONTAINER_HOST", "unix:///nonexistent/podman.sock")
        title = "Podman" if ENGINE == "podman" else "Docker"
        with pytest.raises(moat.ContainerRuntimeError, match=f"Start {title}"):
            moat.run(workspace, image=IMAGE, command=["true"])
    [run] = moat.runs(home=home)
    assert run["state"] == "failed" and f"{title} engine" in run["error"]


def test_an_image_that_cannot_be_pulled_is_a_clear_error(home, workspace):
    # A registry on a closed loopback port: the pull fails without leaving
    # the machine.
    with pytest.raises(moat.ContainerRuntimeError, match=r"cannot pull image 127\.0\.0\.1:1/moat/absent:1"):
        moat.run(workspace, image="127.0.0.1:1/moat/absent:1", command=["true"])
    [run] = moat.runs(home=home)
    assert run["state"] == "failed" and "cannot pull image" in run["error"]


def test_secrets_are_resolved_on_the_host_and_audited_by_name(home, workspace, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    op = bin_dir / "op"
    op.write_text('#!/bin/sh\n[ "$3" = "op://Dev/Api/key" ] && { printf s3cr3t-from-op; exit 0; }\nexit 1\n')
    op.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (workspace / "agent.yaml").write_text("secrets:\n  API_KEY: op://Dev/Api/key\n")
    r = moat.run(workspace, image=IMAGE, command=["sh", "-c", 'echo "key=$API_KEY"'])
    assert r.output == "key=s3cr3t-from-op\n"
    info = r.info()
    assert info["secrets"] == ["API_KEY"]
    audit = [json.loads(l) for l in open(os.path.join(r.dir, "audit.jsonl"))]
    [resolved] = [e["data"] for e in audit if e["type"] == "secrets_resolved"]
    assert resolved["secrets"] == [{"name": "API_KEY", "backend": "1password"}]
    for name in ("run.json", "audit.jsonl", "network.jsonl", "supervisor.log"):
        path = os.path.join(r.dir, name)
        if os.path.exists(path):
            assert "s3cr3t-from-op" not in open(path).read(), name


@pytest.mark.parametrize("policy", ["permissive", "strict"])
def test_the_proxy_is_reachable_from_its_run_and_the_host_only(home, workspace, policy):
    import socket
    r = moat.run(workspace, image=IMAGE, network=policy, detach=True,
                 command=["sh", "-c", "sleep 300"])
    try:
        host, port = r.info()["proxy"].rsplit(":", 1)
        # The host reaches it.
        socket.create_connection((host, int(port)), timeout=5).close()
        # The run's own container reaches it.
        inside = subprocess.run([ENGINE, "exec", f"moat-{r.run_id}", "nc", "-z", "-w", "5", host, port],
                                capture_output=True, timeout=30)
        assert inside.returncode == 0, inside.stderr
        # A container of another network (the default bridge) does not,
        # though the host would route it there.
        other = subprocess.run([ENGINE, "run", "--rm", IMAGE, "nc", "-z", "-w", "3", host, port],
                               capture_output=True, timeout=60)
        assert other.returncode != 0
        audit = [json.loads(l) for l in open(os.path.join(r.dir, "audit.jsonl"))]
        [created] = [e["data"] for e in audit if e["type"] == "container_created"]
        assert created["proxy_guard"] is True
    finally:
        r.stop(grace=1)


def test_moat_home_and_the_engine_socket_are_never_mounted(home, tmp_path):
    # A workspace that holds the moat home (cd ~ && moat run) would hand the
    # agent the CA key and the credential store.
    home.mkdir(parents=True, exist_ok=True)
    with pytest.raises(moat.InvalidArgumentError, match="moat's own files"):
        moat.run(tmp_path, image=IMAGE, command=["true"])
    with pytest.raises(moat.InvalidArgumentError, match="moat's own files"):
        moat.run(home, image=IMAGE, command=["true"])
    ws = tmp_path / "ws-mounts"
    ws.mkdir()
    (ws / "agent.yaml").write_text(f"mounts:\n  - {home}/proxy:/stolen:ro\n")
    with pytest.raises(moat.InvalidArgumentError, match="moat's own files"):
        moat.run(ws, image=IMAGE, command=["true"])
    (ws / "agent.yaml").write_text("mounts:\n  - /var/run/docker.sock:/var/run/docker.sock\n")
    with pytest.raises(moat.InvalidArgumentError, match="engine's socket"):
        moat.run(ws, image=IMAGE, command=["true"])
    assert moat.runs(home=home) == []


def test_a_timeout_longer_than_the_clock_can_count_is_forever_not_a_panic(home, workspace):
    """1e19 s overflowed the deadline (a PanicException, past `except
    Exception`); 1e300 was called not finite. Both are waits as long as it
    takes."""
    r = moat.run(workspace, image=IMAGE, command=["true"], detach=True, home=home)
    try:
        assert r.wait(timeout=1e19) == 0
        assert r.wait(timeout=1e300) == 0
        stream = r.logs(follow=True)
        assert stream._poll(1e19)[0] is True
    finally:
        r.destroy()
    assert moat.run(workspace, image=IMAGE, command=["true"], timeout=1e19, home=home).exit_code == 0


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_a_bad_timeout_is_an_error_not_a_panic(home, workspace, timeout):
    with pytest.raises(moat.InvalidArgumentError, match="timeout"):
        moat.run(workspace, image=IMAGE, command=["true"], timeout=timeout)
