"""Faults, end to end, with the real `moat` binary and the real Docker
engine: kill -9 of moat's own processes, a full disk under the moat home,
commands racing each other, files left behind, and a mount that would hand
the agent the engine.

Each test states the promise it checks (DESIGN.md invariants 9 to 11)."""

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from runhelp import (ENGINE, IMAGE, LABEL, MOAT, Moat, container_alive, docker_objects, make_upstream,
                     netfilter_rules, require_docker, sh)

require_docker()

STRICT = "network:\n  policy: strict\n  allow: [api.github.com]\n"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = make_upstream(tmp_path_factory.mktemp("upstream"))
    yield server
    server.close()


@pytest.fixture
def m(tmp_path, upstream):
    moat = Moat(tmp_path, upstream)
    yield moat
    moat.cleanup()


def chains_of(run_id):
    """The netfilter chains (iptables and ip6tables) a run holds."""
    hexid = run_id[4:]
    found = []
    for tool in ("iptables", "ip6tables"):
        for line in netfilter_rules(tool).splitlines():
            if line.startswith("-N ") and hexid in line:
                found.append(f"{tool}:{line[3:]}")
    return found


def wait_until(what, check, timeout):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def pids_of(pattern):
    out = sh("pgrep", "-f", pattern).stdout.split()
    return [int(p) for p in out]


# ------------------------------------------------------- kill -9 of moat's processes

@pytest.mark.parametrize("policy", ["permissive", "strict"])
def test_a_run_whose_supervisor_and_cli_are_killed_leaves_nothing_within_seconds(m, policy):
    """Invariant 11: kill -9 of the supervisor and the attached CLI; nobody
    runs another moat command. The run's guard notices at once: container,
    network and firewall chains go within seconds, and the run says why."""
    ws = m.workspace(agent_yaml=STRICT if policy == "strict" else None)
    cli = m.popen("run", ws, "--image", IMAGE, "--", "sleep", "300")
    run_dir = wait_until("the run appears", lambda: list((m.home / "runs").glob("run_*"))
                         if (m.home / "runs").is_dir() else None, 30)[0]
    run_id = run_dir.name
    wait_until("the container runs", lambda: container_alive(run_id), 60)
    if policy == "strict":
        assert chains_of(run_id), "a strict run has its chains"
    supervisor = m.meta(run_id)["supervisor"][0]
    os.kill(supervisor, signal.SIGKILL)
    cli.kill()
    cli.wait(timeout=10)
    started = time.time()
    # "Within seconds": generous windows for a slow, loaded CI machine (the
    # time it took is printed below).
    wait_until("the container and network are gone", lambda: docker_objects(run_id) == ([], []),
               30)
    wait_until("the firewall chains are gone", lambda: chains_of(run_id) == [], 30)
    took = time.time() - started
    meta = wait_until("run.json says failed", lambda: m.meta(run_id)
                      if m.meta(run_id)["state"] == "failed" else None, 30)
    assert "exited unexpectedly" in meta["error"], meta
    assert meta["cleaned"] is True
    print(f"cleaned up {took:.1f} s after the kill")


def test_a_supervisor_killed_during_setup_leaves_nothing(m):
    """Killed while the run is being set up (before run.json names the
    container): whatever carries the run's label goes too."""
    ws = m.workspace()
    proc = m.popen("run", ws, "--image", IMAGE, "-d", "--", "sleep", "300")
    run_dir = wait_until("the run appears", lambda: list((m.home / "runs").glob("run_*"))
                         if (m.home / "runs").is_dir() else None, 30)[0]
    run_id = run_dir.name
    # As soon as Docker holds the network, kill it.
    wait_until("the network exists", lambda: docker_objects(run_id)[1], 30)
    os.kill(m.meta(run_id)["supervisor"][0], signal.SIGKILL)
    proc.wait(timeout=30)
    wait_until("nothing is left", lambda: docker_objects(run_id) == ([], []) and
               not chains_of(run_id), 45)
    wait_until("run.json says failed", lambda: m.meta(run_id)["state"] == "failed", 30)


def test_a_run_whose_home_is_deleted_and_supervisor_killed_leaves_nothing(m):
    """The moat home removed under a live strict run (`rm -rf`), then its
    supervisor killed: run.json is gone, so nothing says what the run held.
    The guard cleans up from the run's id alone: container, network and the
    MOAT-* firewall chains go within seconds, without a later moat command."""
    import shutil
    run_id = m.detach(m.workspace(agent_yaml=STRICT), "sleep", "300")
    wait_until("the container runs", lambda: container_alive(run_id), 60)
    assert chains_of(run_id), "a strict run has its chains"
    supervisor = m.meta(run_id)["supervisor"][0]
    shutil.rmtree(m.home)
    os.kill(supervisor, signal.SIGKILL)
    started = time.time()
    try:
        wait_until("the container and network are gone",
                   lambda: docker_objects(run_id) == ([], []), 30)
        wait_until("the firewall chains are gone", lambda: chains_of(run_id) == [], 30)
        print(f"cleaned up {time.time() - started:.1f} s after the kill")
        assert not (m.home / "runs").exists(), "the guard does not make the home again"
    finally:
        # m.cleanup() finds no runs in a deleted home.
        sh(ENGINE, "rm", "-f", f"moat-{run_id}")
        sh(ENGINE, "network", "rm", f"moat-{run_id}")


def test_an_object_the_engine_makes_after_the_guard_cleaned_up_is_swept(m):
    """A killed supervisor's last request to the engine (creating the
    container, say) can finish after its guard cleaned up. The guard looks
    for the run's label again 1, 3 and 7 s after cleaning up: an object
    that appears then goes too."""
    run_id = m.detach(m.workspace(), "sleep", "300")
    wait_until("the container runs", lambda: container_alive(run_id), 60)
    os.kill(m.meta(run_id)["supervisor"][0], signal.SIGKILL)
    wait_until("the guard cleaned up", lambda: m.meta(run_id).get("cleaned"), 45)
    # The late object: made now, as the engine would finish that request.
    late = sh(ENGINE, "create", "--label", f"{LABEL}={run_id}", IMAGE, "true", check=True)
    late_id = late.stdout.strip()
    assert docker_objects(run_id)[0], "the late container exists"
    try:
        wait_until("the late container is swept", lambda: docker_objects(run_id)[0] == [], 30)
    finally:
        sh(ENGINE, "rm", "-f", late_id)


# ------------------------------------------------------------------ a full disk

@pytest.fixture
def small_home(tmp_path):
    """A moat home on a 4 MiB tmpfs of its own."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run the tests as root (CI does)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt), check=True)
    yield mnt
    sh("umount", "-l", str(mnt))


def test_a_full_disk_keeps_the_exit_code_and_says_so_once(tmp_path, small_home, upstream):
    m = Moat(tmp_path, upstream)
    m.home = small_home
    m.env["MOAT_HOME"] = str(small_home)
    ws = m.workspace()
    try:
        # Fill the disk with output, then make requests through the proxy,
        # whose audit entries find no room either.
        script = ("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 8000000; "
                  "for i in 1 2 3 4 5; do curl -s -o /dev/null https://api.github.com/full-$i; "
                  "done; exit 7")
        out = m.run(ws, "sh", "-c", script, timeout=120)
        assert out.returncode == 7, out.stderr[-2000:]
        note = "bytes of output were not kept"
        said = (out.stdout + out.stderr).count(note)
        assert said == 1, out.stderr[-2000:]
        assert "no space left on device" in out.stderr
        [run] = m.runs()
        assert run["state"] == "stopped" and run["exit_code"] == 7, run
        assert note in run["error"]
        m.wait_cleaned(run["id"])
        # The audit log was closed properly (its final checkpoint written).
        audit = m("audit", run["id"])
        assert audit.returncode == 0 and "closed by its writer" in audit.stderr, audit.stderr
        # What could not be written is said in the log itself.
        entries = [json.loads(l) for l in (m.dir(run["id"]) / "audit.jsonl").read_text().splitlines()]
        lost = [e for e in entries if e["type"] == "entries_lost"]
        if lost:
            assert lost[0]["data"]["entries"] > 0 and "no space" in lost[0]["data"]["error"].lower()
            assert entries[-1]["type"] == "entries_lost" or entries[-2]["type"] == "entries_lost"
        print("audit entries lost:", lost)
        leftovers = [str(p) for p in small_home.rglob("*") if p.name.endswith(".tmp")
                     or p.name == ".reserve"]
        assert leftovers == []
        # Full to the last byte: a new run is refused, clearly, leaving nothing.
        with open(small_home / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        before = sorted(p.name for p in (small_home / "runs").iterdir())
        out = m.run(ws, "true", timeout=60)
        assert out.returncode != 0
        assert "is full, so the run was not started" in out.stderr, out.stderr
        assert sorted(p.name for p in (small_home / "runs").iterdir()) == before
        assert not [p for p in small_home.rglob("*.tmp")]
    finally:
        m.cleanup()


# --------------------------------------------------------------- racing commands

def test_stop_racing_destroy_both_succeed(m):
    """`moat stop` and `moat destroy` of one run at once, ten times: both
    exit 0 (a run removed while being stopped is stopped), nothing is left."""
    ws = m.workspace()
    for i in range(10):
        run_id = m.detach(ws, "sleep", "300")
        stop = m.popen("stop", run_id, "-t", "1")
        destroy = m.popen("destroy", run_id)
        for p, name in ((stop, "stop"), (destroy, "destroy")):
            _, err = p.communicate(timeout=90)
            assert p.returncode == 0, f"round {i}: moat {name} exited {p.returncode}: {err}"
        assert not m.dir(run_id).exists()
        assert docker_objects(run_id) == ([], [])


def test_two_destroys_at_once_both_succeed(m):
    ws = m.workspace()
    for i in range(5):
        run_id = m.detach(ws, "sleep", "300")
        procs = [m.popen("destroy", run_id) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=90)
            assert p.returncode == 0, f"round {i}: {err}"
        assert not m.dir(run_id).exists()


# ---------------------------------------------------------- what is left behind

def test_moat_clean_removes_chains_whose_network_is_gone_and_keeps_live_ones(m, tmp_path):
    """A chain left behind by a run of a home since deleted guards nothing:
    `moat clean` removes it, whichever home it came from. A live run's
    chains, of another home, stay."""
    orphan = "MOAT-G-0000deadbeef"
    sh("iptables", "-w", "-N", orphan, check=True)
    sh("iptables", "-w", "-A", orphan, "-j", "DROP", check=True)
    # Strict mode's chain of the same run, in mangle, hooked to its bridge.
    strict = "MOAT-0000deadbeef"
    mangle = ("iptables", "-w", "-t", "mangle")
    sh(*mangle, "-N", strict, check=True)
    sh(*mangle, "-A", strict, "-j", "DROP", check=True)
    sh(*mangle, "-I", "PREROUTING", "1", "-i", "mt-0000deadbeef", "-j", strict, check=True)
    # A run being set up: its network exists (no bridge yet, as on Podman
    # before the container starts) and so its chains stay.
    setting_up = "run_0000deadbee1"
    sh(ENGINE, "network", "create", "--label", f"{LABEL}={setting_up}", f"moat-{setting_up}",
       check=True)
    sh(*mangle, "-N", "MOAT-0000deadbee1", check=True)
    other = Moat(tmp_path / "other")
    live = other.detach(other.workspace(agent_yaml=STRICT), "sleep", "300")
    try:
        live_chains = chains_of(live)
        assert live_chains
        out = m("clean", "-f", check=True)
        assert "1 leftover firewall chain set" in out.stderr, out.stderr
        assert orphan not in netfilter_rules() and strict not in netfilter_rules()
        assert "MOAT-0000deadbee1" in netfilter_rules()
        assert chains_of(live) == live_chains
        assert container_alive(live)
    finally:
        for table in ("filter", "mangle"):
            for rule in sh("iptables", "-w", "-t", table, "-S").stdout.splitlines():
                if rule.startswith("-A ") and "0000deadbee" in rule:
                    sh("iptables", "-w", "-t", table, "-D", *rule.split()[1:])
            for chain in (orphan, strict, "MOAT-0000deadbee1"):
                sh("iptables", "-w", "-t", table, "-F", chain)
                sh("iptables", "-w", "-t", table, "-X", chain)
        sh(ENGINE, "network", "rm", f"moat-{setting_up}")
        other.cleanup()


def test_files_under_the_moat_home_are_private(m, upstream):
    """Invariant: nothing moat writes under its home is readable by other
    users (logs, trace, audit, run.json, locks, the supervisor's log; the
    files mounted into the container belong to the agent's user alone). The
    CA certificate is public by nature."""
    m.grant_github()
    ws = m.workspace(agent_yaml="grants: [github]\n")
    out = m.run(ws, "sh", "-c", "curl -sS https://api.github.com/user; cat /etc/moat/ca-bundle.pem | head -1")
    assert out.returncode == 0, out.stderr
    run_id = m.latest()["id"]
    m.wait_cleaned(run_id)
    loose = []
    for path in m.home.rglob("*"):
        if path.is_symlink() or path.is_socket():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name == "ca.crt":
            continue
        if mode & 0o077:
            loose.append(f"{path.relative_to(m.home)} {oct(mode)}")
    assert loose == [], loose
    for name in ("logs.jsonl", "network.jsonl", "audit.jsonl", "checkpoints.jsonl", "run.json",
                 "supervisor.log"):
        assert (m.dir(run_id) / name).exists(), name


# ----------------------------------------------------------- hostile workspaces

@pytest.mark.parametrize("source", ["/run", "/var/run", "/run/docker.sock"])
def test_a_mount_that_holds_the_engine_socket_is_refused(m, source):
    ws = m.workspace(agent_yaml=f"mounts:\n  - {source}:/hostrun:ro\n")
    out = m.run(ws, "ls", "/hostrun")
    assert out.returncode != 0
    assert "container engine's socket" in out.stderr, out.stderr
    assert "docker.sock" in out.stderr
    assert not (m.home / "runs").is_dir() or not list((m.home / "runs").iterdir())


def test_a_mount_that_reaches_the_engine_socket_another_way_is_refused(m, tmp_path):
    """The socket's class, not its one path: a source that is a link to
    /run, and a directory holding the socket DOCKER_HOST names (here a link
    to the engine's socket, which the engine is reached through)."""
    link = tmp_path / "innocent"
    link.symlink_to("/run")
    ws = m.workspace(agent_yaml=f"mounts:\n  - {link}:/data:ro\n")
    out = m.run(ws, "ls", "/data")
    assert out.returncode != 0 and "container engine's socket" in out.stderr, out.stderr
    # A socket DOCKER_HOST names, in a directory of its own: the engine's
    # socket bound there (a daemon started with -H unix:///srv/x.sock).
    if ENGINE == "docker":
        custom = tmp_path / "engine"
        custom.mkdir()
        sock = custom / "api.sock"
        sock.touch()
        sh("mount", "--bind", "/var/run/docker.sock", str(sock), check=True)
        try:
            ws2 = m.workspace("ws2", agent_yaml=f"mounts:\n  - {custom}:/data:ro\n")
            out = m("run", ws2, "--image", IMAGE, "--", "ls", "/data",
                    env={"DOCKER_HOST": f"unix://{sock}"})
            assert out.returncode != 0, out.stdout
            assert "container engine's socket" in out.stderr, out.stderr
        finally:
            sh("umount", str(sock))
    assert not (m.home / "runs").is_dir() or not list((m.home / "runs").iterdir())


def test_an_agent_yaml_its_user_cannot_read_stops_the_run(m, tmp_path):
    """As a user who may not read agent.yaml (root reads anything, so the
    test drops to uid 4321): refused, not run with the defaults."""
    import shutil
    import tempfile
    top = tempfile.mkdtemp(prefix="moat-unreadable-")
    os.chmod(top, 0o755)
    ws = os.path.join(top, "ws")
    os.mkdir(ws, 0o755)
    with open(os.path.join(ws, "agent.yaml"), "w") as f:
        f.write("network:\n  policy: strict\n")
    os.chmod(os.path.join(ws, "agent.yaml"), 0o600)
    home = os.path.join(top, "user-home")
    os.mkdir(home)
    os.chown(home, 4321, 4321)
    try:
        out = subprocess.run(["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups",
                              str(MOAT), "config", str(ws)],
                             env={**m.env, "MOAT_HOME": os.path.join(home, ".moat"), "HOME": home},
                             capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert out.returncode != 0, out.stdout
    assert "agent.yaml" in out.stderr and "permission denied" in out.stderr.lower(), out.stderr


def test_an_unreadable_agent_yaml_stops_the_run(m):
    """Invariant 10: a strict policy the user wrote is never dropped for the
    defaults because the file cannot be read."""
    ws = m.workspace()
    (ws / "agent.yaml").symlink_to(ws / "agent.yaml")  # a loop
    out = m.run(ws, "true")
    assert out.returncode != 0
    assert "agent.yaml" in out.stderr and "cannot read" in out.stderr, out.stderr
    (ws / "agent.yaml").unlink()
    os.mkfifo(ws / "agent.yaml")
    started = time.time()
    out = m.run(ws, "true", timeout=30)
    assert time.time() - started < 20, "a FIFO must not be waited on"
    assert out.returncode != 0 and "not a regular file" in out.stderr, out.stderr
    (ws / "agent.yaml").unlink()
    (ws / "agent.yaml").write_bytes(b"name: a\x00b\nnetwork: {policy: strict}\n")
    out = m.run(ws, "true")
    assert out.returncode != 0 and "NUL byte" in out.stderr, out.stderr


def test_an_empty_grant_name_is_refused(m):
    ws = m.workspace()
    out = m.run(ws, "true", args=("--grant", "github,,"))
    assert out.returncode != 0
    assert "empty grant name" in out.stderr, out.stderr
