"""Hostile workspaces: the user runs `moat config`, `moat run` or `moat
claude` on a directory somebody else prepared (a cloned repository, an
unpacked archive), or one that an agent of another run can still write.

Everything moat reads from the workspace or prints about it is the
attacker's: agent.yaml (its size, shape, bytes, and what it links to), the
names of its files and of the workspace itself, the links among them, and
the time between moat's checks and the engine's mount.

Each test names its attack and asserts the safe behaviour, so it fails for
as long as the attack works. Tests of attacks already handled guard against
regressions. The config-level tests need no container engine; those that
start runs use the local test image (and are skipped without it).
"""

import json
import os
import pathlib
import subprocess
import tempfile
import threading
import time

import pytest

from runhelp import ENGINE, IMAGE, MOAT, Moat, docker_problem, sh

SECRET = "ghp_HostileWorkspaceSECRET0123456789abcd"


@pytest.fixture
def m(tmp_path):
    moat = Moat(tmp_path)
    yield moat
    # A run whose supervisor never started (refused its handoff) holds
    # nothing on the engine, and `moat stop` would wait 30 s for it.
    runs = moat.home / "runs"
    started = [p for p in runs.glob("run_*/run.json")
               if json.loads(p.read_text()).get("supervisor")] if runs.is_dir() else []
    if started:
        moat.cleanup()


def needs_engine():
    problem = docker_problem()
    if problem:
        pytest.skip(problem)


def ws_with(m, text=None, name="ws", raw=None):
    """A workspace owned by root (a root user's clone) with agent.yaml."""
    ws = m.workspace(name=name, owner=(0, 0))
    if text is not None:
        (ws / "agent.yaml").write_text(text)
    if raw is not None:
        (ws / "agent.yaml").write_bytes(raw)
    return ws


def run_capped(m, args, timeout, cap=4 << 20, env=None):
    """Runs `moat args...` with stdout and stderr in files (an attacker may
    make moat print a lot); returns (returncode or None on timeout, combined
    size, the first `cap` bytes of stderr)."""
    e = dict(m.env)
    e.update(env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(MOAT), *map(str, args)], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=e)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        size = os.fstat(out.fileno()).st_size + os.fstat(err.fileno()).st_size
        err.seek(0)
        return rc, size, err.read(cap)


def no_runs(m):
    runs = m.home / "runs"
    return not runs.is_dir() or not [p for p in runs.iterdir() if p.name.startswith("run_")]


def refused(out, m):
    """moat refused the run before creating it, saying why."""
    return out.returncode != 0 and "would give the container" in out.stderr and no_runs(m)


# ====================================================== agent.yaml: what it is

def test_agent_yaml_linked_to_proc_environ_does_not_print_moats_environment(m):
    """Attack: agent.yaml -> /proc/self/environ. A /proc file is a regular
    file of size 0, so moat reads it: its own environment (GITHUB_TOKEN,
    ANTHROPIC_API_KEY, AWS keys of the user's shell), which the error
    snippet then prints (CI logs of a pull request are public).
    Invariant 7: no secret value appears in error messages."""
    ws = ws_with(m)
    (ws / "agent.yaml").symlink_to("/proc/self/environ")
    out = m("config", ws, env={"GITHUB_TOKEN": SECRET})
    assert out.returncode != 0
    assert SECRET not in out.stdout + out.stderr, out.stderr[:600]


def test_agent_yaml_linked_outside_the_workspace_is_not_echoed(m, tmp_path):
    """Attack: agent.yaml is a committed link to a file outside the
    workspace that root may read: here Claude Code's login
    (../../root/.claude/.credentials.json; JSON is YAML), elsewhere
    /etc/shadow or ~/.aws/credentials. moat reads it as root and echoes its
    lines in the errors' snippets (`unknown field "claudeAiOauth"` and the
    line with both tokens): a pull request's CI run of `moat claude -p`
    publishes them. A link that leaves the workspace must not make moat
    print another file's content (invariant 7)."""
    creds = tmp_path / "userhome" / ".claude" / ".credentials.json"
    creds.parent.mkdir(parents=True)
    creds.write_text('{"claudeAiOauth": {"accessToken": "sk-ant-oat01-%s", '
                     '"refreshToken": "sk-ant-ort01-%s", "expiresAt": 1}}\n' % (SECRET, SECRET))
    ws = ws_with(m)
    (ws / "agent.yaml").symlink_to(os.path.relpath(creds, ws))
    out = m("config", ws)
    assert out.returncode != 0, "a file outside the workspace is not this workspace's config"
    assert SECRET not in out.stdout + out.stderr, out.stderr


@pytest.mark.parametrize("kind", ["dev-zero", "dev-urandom", "fifo", "directory", "loop",
                                  "dangling"])
def test_agent_yaml_that_is_not_a_regular_file_is_refused_at_once(m, kind):
    """Attack: agent.yaml is /dev/zero, /dev/urandom, a FIFO, a directory,
    a link to itself or a dangling link. moat must neither hang nor read
    forever nor take it for "no configuration" (invariant 10)."""
    ws = ws_with(m)
    p = ws / "agent.yaml"
    if kind == "dev-zero":
        p.symlink_to("/dev/zero")
    elif kind == "dev-urandom":
        p.symlink_to("/dev/urandom")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "loop":
        p.symlink_to("agent.yaml")
    else:
        p.symlink_to("/nonexistent/agent.yaml")
    started = time.time()
    rc, _, err = run_capped(m, ["config", ws], timeout=20)
    assert rc is not None, f"{kind}: moat config hung"
    assert time.time() - started < 10
    assert rc != 0 and b"agent.yaml" in err and b"showing the defaults" not in err, err


def test_a_non_regular_agent_yaml_is_never_opened(m):
    """Attack: agent.yaml -> a device node. Opening some devices acts
    (/dev/watchdog arms the watchdog, which reboots the machine when it is
    not closed with its magic word; a tape's rewind device rewinds; a serial
    line raises DTR), and O_NONBLOCK does not stop a driver's open. moat
    must learn the type before it opens. Observed safely with a FIFO: a
    writer blocked in open() is released the moment moat opens it."""
    ws = ws_with(m)
    fifo = ws / "agent.yaml"
    os.mkfifo(fifo)
    released = []

    def writer():
        fd = os.open(fifo, os.O_WRONLY)
        released.append(True)
        os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.2)
    out = m("config", ws, timeout=20)
    time.sleep(0.3)
    opened_by_moat = bool(released)
    if not opened_by_moat:
        # Let the thread go.
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    t.join(timeout=5)
    assert out.returncode != 0 and "not a regular file" in out.stderr, out.stderr
    assert not opened_by_moat, "moat opened the FIFO (a device would have been opened too)"


def test_agent_yaml_over_the_size_limit_is_refused(m):
    """Attack: a huge agent.yaml (memory, time). Over 1 MiB is refused
    without reading it."""
    ws = ws_with(m)
    with open(ws / "agent.yaml", "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB
    rc, _, err = run_capped(m, ["config", ws], timeout=20)
    assert rc not in (None, 0) and b"at most 1048576" in err, err


def test_a_yaml_alias_bomb_is_refused(m):
    """Attack: billion laughs (aliases of aliases) in a few hundred bytes."""
    text = "a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 12))
    ws = ws_with(m, text)
    rc, _, err = run_capped(m, ["config", ws], timeout=20)
    assert rc not in (None, 0) and b"aliases expand to more than" in err, err[:500]


@pytest.mark.parametrize("shape", ["flow-seq", "flow-map", "block-map"])
def test_deep_nesting_is_refused_without_a_crash(m, shape):
    """Attack: nesting deep enough to overflow a recursive parser's stack."""
    if shape == "flow-seq":
        text = "env: " + "[" * 200000 + "]" * 200000 + "\n"
    elif shape == "flow-map":
        text = "env: " + "{a: " * 100000 + "b" + "}" * 100000 + "\n"
    else:
        text = "".join("  " * i + f"k{i}:\n" for i in range(1000))
    ws = ws_with(m, text)
    rc, _, err = run_capped(m, ["config", ws], timeout=30)
    assert rc not in (None, 0), err[:300]
    assert b"panicked" not in err and b"overflow" not in err.lower(), err[:300]


def test_non_utf8_and_nul_bytes_are_located(m):
    """Attack: bytes that are not text (non-UTF-8, NUL) in agent.yaml."""
    ws = ws_with(m, raw=b"name: ok\nimage: \xff\xfe\n")
    out = m("config", ws)
    assert out.returncode != 0 and "agent.yaml:2" in out.stderr and "utf-8" in out.stderr
    ws = ws_with(m, raw=b"name: a\x00b\nnetwork: {policy: strict}\n", name="ws-nul")
    out = m("config", ws)
    assert out.returncode != 0 and "NUL byte" in out.stderr, out.stderr


@pytest.mark.parametrize("section", ["env", "network.allow"])
def test_a_one_mib_agent_yaml_of_distinct_entries_parses_at_once(m, section):
    """Attack: 1 MiB of distinct keys (env:) or hosts (network.allow), well
    under the size limit. Duplicates are looked for by comparing each new
    entry with every earlier one (yaml.rs push_node for keys,
    `network.allow.contains` for hosts): quadratic, minutes of CPU for
    every `moat config`, `run`, `claude` or `policy check` of the
    workspace. Invariant 9: bad input never hangs."""
    lines, size, i = [], 0, 0
    head = "env:\n" if section == "env" else "network:\n  allow:\n"
    while True:
        line = f"  K{i:x}: v\n" if section == "env" else f"    - h{i:x}.io\n"
        if size + len(line) + len(head) > (1 << 20) - 16:
            break
        lines.append(line)
        size += len(line)
        i += 1
    ws = ws_with(m, head + "".join(lines))
    started = time.time()
    rc, _, err = run_capped(m, ["config", ws, "--json"], timeout=10)
    took = time.time() - started
    assert rc is not None, f"moat config of a 1 MiB agent.yaml ({i} entries) ran for over 10 s"
    assert rc == 0, err[:300]
    print(f"{i} entries: {took:.1f} s")


def test_error_output_is_bounded_by_the_input(m):
    """Attack: one long line with thousands of problems. Every problem
    prints the whole line again (and reads the file again to find it): a
    17 KB agent.yaml prints 50 MB, a 1 MiB one about 100 GB to the user's
    terminal or CI log."""
    text = "{" + ",".join(f"u{i}: 1" for i in range(2000)) + "}\n"
    ws = ws_with(m, text)
    rc, size, err = run_capped(m, ["config", ws], timeout=60)
    assert rc not in (None, 0), err[:300]
    assert size < 20 * len(text) + 100_000, f"{len(text)} bytes of agent.yaml gave {size} bytes of errors"


def inotify_watch(directory):
    """An inotify descriptor watching `directory` for files closed after
    reading (IN_CLOSE_NOWRITE)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    assert fd >= 0, "inotify_init1 failed"
    IN_CLOSE_NOWRITE = 0x10
    assert libc.inotify_add_watch(fd, str(directory).encode(), IN_CLOSE_NOWRITE) >= 0
    return fd


def closed_names(fd):
    """Names of the files whose close one read() of `fd` reports."""
    import struct
    buf = os.read(fd, 65536)
    names, i = [], 0
    while i < len(buf):
        _, _, _, length = struct.unpack_from("iIII", buf, i)
        names.append(buf[i + 16:i + 16 + length].rstrip(b"\0").decode())
        i += 16 + length
    return names


def test_the_error_snippet_is_not_read_again_from_the_workspace(m, tmp_path):
    """Attack (TOCTOU): between the read moat validates and the snippet it
    prints, agent.yaml is swapped for a link to a FIFO (or /dev/zero). The
    CLI's `snippet` (moat-cli main.rs) reads the path again with
    read_to_string: no size limit, no O_NONBLOCK, no check that it is a
    file. A FIFO hangs moat for ever; /dev/zero eats memory until the OOM
    killer comes. The swapper is anything that can write the workspace: an
    agent of an earlier run of it (`moat run -d`) that is still running. It
    swaps as soon as moat has closed the file it read (inotify)."""
    ws = ws_with(m)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Long enough that validating it takes longer than the swap.
    text = "# padding\n" * 20000 + "bogus: 1\n"
    hung = 0
    for attempt in range(5):
        a = ws / "agent.yaml"
        if a.is_symlink() or a.exists():
            a.unlink()
        a.write_text(text)
        fd = inotify_watch(ws)
        stop = threading.Event()

        def swapper():
            while "agent.yaml" not in closed_names(fd):
                if stop.is_set():
                    return
            link = ws / ".link"
            link.symlink_to(fifo)
            os.rename(link, a)

        t = threading.Thread(target=swapper, daemon=True)
        t.start()
        rc, _, err = run_capped(m, ["config", ws], timeout=5)
        stop.set()
        (ws / ".wake").write_text("")
        (ws / ".wake").read_text()
        t.join(timeout=5)
        os.close(fd)
        # Release a reader still blocked on the FIFO, if any.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        if rc is None:
            hung += 1
            break
        assert rc != 0, err[:300]
    assert hung == 0, f"moat config hung on the FIFO swapped in after validation (attempt {attempt + 1})"


# ============================================ what moat prints to the terminal

ESCAPES = ("\x1b", "\x07", "\x9b")


def test_config_errors_send_no_escape_sequences_to_the_terminal(m):
    """Attack: YAML escapes (\\e, \\a) in keys and values, and raw control
    bytes in a line, which moat echoes in its error messages and snippets:
    OSC 52 writes the user's clipboard, OSC 0 the title, CSI erases lines
    and redraws them (an error made to look like success). trace_view's
    `printable` already escapes them for `moat trace`; errors do not."""
    ws = ws_with(m, 'name: ok\n"x\\e]52;c;cm0gLXJmIH4K\\a\\e[2K": 1\n'
                 'image: "\\e[31mred"\ngrants: ["\\e]0;PWNED\\a"]\n')
    out = m("config", ws)
    assert out.returncode != 0
    assert not any(c in out.stderr for c in ESCAPES), repr(out.stderr)
    ws = ws_with(m, raw=b"name: ok\nfoo\x1b[2K\x1b[1Gmoat: all good\x1b[8m: 2\n", name="ws-raw")
    out = m("config", ws)
    assert out.returncode != 0
    assert not any(c in out.stderr for c in ESCAPES), repr(out.stderr)


def test_a_workspace_path_with_control_characters_is_printed_escaped(m, tmp_path):
    """Attack: the workspace's own name (an unpacked archive's top
    directory) holds an escape sequence or a newline that forges a line of
    moat's output."""
    name = "ws\x1b]0;PWNED\x07\x1b[31m\nerror: forged line"
    ws = tmp_path / name
    ws.mkdir()
    (ws / "agent.yaml").write_text("bogus: 1\n")
    out = m("config", ws)
    assert out.returncode != 0
    assert not any(c in out.stderr for c in ESCAPES), repr(out.stderr)
    assert "\nerror: forged line" not in out.stderr, repr(out.stderr)


# ========================================================== mounts: where to

def run_true(m, ws, timeout=120):
    return m("run", ws, "--image", IMAGE, "--", "true", timeout=timeout)


def test_an_image_whose_user_database_is_huge_is_refused_not_read(m, tmp_path):
    """Attack: `image:` naming an image whose /etc/passwd is gigabytes (a
    layer of one repeated byte is nothing in a registry). moat reads that
    file to give the run's user an entry: it reads at most 4 MiB of it and
    says so, instead of holding it all in the supervisor and the cache."""
    needs_engine()
    ctx = tmp_path / "bigpasswd"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {IMAGE}\nRUN yes x | head -c 6000000 >> /etc/passwd\n")
    tag = f"moat-test-bigpasswd:{os.getpid()}"
    sh(ENGINE, "build", "-q", "-t", tag, str(ctx), check=True, timeout=600)
    try:
        ws = ws_with(m)
        out = m("run", ws, "--image", tag, "--", "true", timeout=120)
        assert out.returncode == 125, (out.returncode, out.stderr)
        assert "/etc/passwd is larger than 4 MiB" in out.stderr, out.stderr
        big = [p for p in m.home.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
        assert big == [], big
    finally:
        m.cleanup()
        sh(ENGINE, "rmi", "-f", tag)


@pytest.mark.parametrize("source", ["/etc", "/usr/local", "/var/lib", "/home", "/boot", "HOME",
                                    "HOME/.bashrc", "HOME/.config/x"])
def test_a_repositorys_agent_yaml_cannot_mount_the_hosts_system_or_home_dot_files(m, source):
    """Attack: agent.yaml, written by the repository, names an absolute
    source: `/etc:/hostetc` handed a root user's run the host's /etc/shadow
    to read and /etc/cron.d to write; `~/.bashrc` would run the agent's
    line in the user's next shell."""
    needs_engine()
    # A home of the test's own: nothing of the real user's is touched.
    home = m.tmp / "user"
    home.mkdir(exist_ok=True)
    m.env["HOME"] = str(home)
    if source.startswith("HOME"):
        source = str(home) + source[len("HOME"):]
        path = pathlib.Path(source)
        if source.endswith(".bashrc"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# the user's\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
    if not os.path.exists(source):
        pytest.skip(f"{source} is not on this host")
    ws = ws_with(m, f"mounts:\n  - {source}:/host\n")
    out = run_true(m, ws)
    assert out.returncode == 125, (out.returncode, out.stderr)
    # The home itself holds ~/.ssh, which says so first.
    assert ("never mounts the host's system directories" in out.stderr
            or source == str(home) and "your SSH keys" in out.stderr), out.stderr
    assert no_runs(m)


def test_a_mount_link_into_the_moat_home_is_refused(m):
    """Attack: `./data:/data` where data is a committed link to the moat
    home. Links are resolved before the check (regression guard)."""
    needs_engine()
    ws = ws_with(m, "mounts:\n  - ./data:/data:ro\n")
    (ws / "data").symlink_to(m.home)
    out = run_true(m, ws)
    assert refused(out, m) and "moat's own files" in out.stderr, out.stderr


def test_a_dotdot_mount_into_the_moat_home_is_refused(m):
    """Attack: `..` climbing to the moat home (regression guard)."""
    needs_engine()
    ws = ws_with(m, f"mounts:\n  - {os.path.relpath(m.home, m.tmp / 'ws')}/proxy:/p:ro\n")
    out = run_true(m, ws)
    # Refused as it is read: a relative source may not leave the workspace.
    assert out.returncode != 0 and no_runs(m), out.stderr
    assert "climbs out of the workspace" in out.stderr, out.stderr
    # Written by its absolute path, it is refused as moat's own files.
    ws = ws_with(m, f"mounts:\n  - {m.home}/proxy:/p:ro\n")
    out = run_true(m, ws)
    assert refused(out, m) and "moat's own files" in out.stderr, out.stderr


def test_a_workspace_that_is_a_link_to_the_moat_home_is_refused(m, tmp_path):
    """Attack: the workspace itself is a link (to the moat home)."""
    needs_engine()
    link = tmp_path / "innocent"
    link.symlink_to(m.home)
    out = run_true(m, link)
    assert refused(out, m), out.stderr


def test_a_relative_mount_cannot_climb_out_of_the_workspace(m, tmp_path):
    """Attack: `../../<somewhere>:/x` in a cloned repo's agent.yaml.
    Relative sources are documented as the workspace's; `..` takes them
    anywhere on the host (rw by default, as root when the clone is
    root's). A relative source must stay inside the workspace."""
    needs_engine()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text(SECRET)
    ws = ws_with(m, "mounts:\n  - ../outside:/x\n")
    out = run_true(m, ws)
    assert out.returncode != 0 and no_runs(m), out.stderr
    assert "outside" in out.stderr and "workspace" in out.stderr, out.stderr


def test_a_relative_mount_cannot_leave_the_workspace_through_a_link(m, tmp_path):
    """Attack: the seeds' own example, `./data:/data:ro`, looks harmless in
    review, while `data` is a link the repository commits
    (data -> /root/.config/gh, /etc, ~/.kube). The check resolves links,
    but only to refuse the moat home, ~/.ssh and engine sockets."""
    needs_engine()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text(SECRET)
    ws = ws_with(m, "mounts:\n  - ./data:/data:ro\n")
    (ws / "data").symlink_to(outside)
    out = run_true(m, ws)
    assert out.returncode != 0 and no_runs(m), out.stderr
    assert "data" in out.stderr and "workspace" in out.stderr, out.stderr


def test_a_mount_whose_last_part_is_missing_cannot_follow_a_link_out(m, tmp_path):
    """Attack: `./link/made:/x:rw` with `link -> <outside>` and `made` not
    there yet. A path that does not exist cannot be resolved, so a check
    that falls back to the written text sees a harmless path inside the
    workspace, and Docker creates the directory by following the link:
    the agent then writes outside (as root, into /root/.ssh, say)."""
    needs_engine()
    outside = tmp_path / "outside"
    outside.mkdir()
    ws = ws_with(m, "mounts:\n  - ./link/made:/x:rw\n")
    (ws / "link").symlink_to(outside)
    out = m("run", ws, "--image", IMAGE, "--", "sh", "-c", "echo pwned > /x/owned", timeout=120)
    assert out.returncode != 0 and no_runs(m), out.stderr
    assert "cannot be resolved" in out.stderr and "create it first" in out.stderr, out.stderr
    assert not (outside / "made").exists(), "the engine created a directory through the link"


@pytest.mark.parametrize("store", [".claude", ".aws", ".config/gh"])
def test_the_users_credential_stores_are_never_mounted(m, tmp_path, store):
    """Attack: `mounts: [<home>/.claude:/c:ro]` (or ~/.aws, ~/.config/gh).
    These hold the real tokens moat's grants are made from: Claude Code's
    login (with its refresh token, which the OAuth broker reads live), the
    AWS keys the aws grant signs AssumeRole with, gh's GitHub token. moat
    already refuses ~/.ssh for the same reason (invariant 1: a real
    credential never enters the container)."""
    needs_engine()
    home = tmp_path / "userhome"
    files = {".claude": ".claude/.credentials.json", ".aws": ".aws/credentials",
             ".config/gh": ".config/gh/hosts.yml"}
    f = home / files[store]
    f.parent.mkdir(parents=True)
    f.write_text(SECRET)
    ws = ws_with(m, f"mounts:\n  - {home / store}:/stolen:ro\n")
    out = m("run", ws, "--image", IMAGE, "--", "sh", "-c", "find /stolen -type f -exec cat {} +",
            env={"HOME": str(home)}, timeout=120)
    assert SECRET not in out.stdout, f"the agent read {files[store]}: {out.stdout}"
    assert refused(out, m), out.stderr


def test_a_mount_inside_the_workspace_works(m):
    """Baseline for the mount attacks: the seeds' `./data:/data:ro` must
    run (else the refusals above prove nothing). The plan's Mount is
    serialized with `mode: "rw"` (serialize_with) but deserialized as a
    bool, so the supervisor refuses every handoff that has a mount
    ("bad handoff ... expected a boolean") and any run with `mounts:`
    fails as "the run's supervisor exited before the run started"."""
    needs_engine()
    ws = ws_with(m, "mounts:\n  - ./data:/data:ro\n")
    (ws / "data").mkdir()
    (ws / "data" / "hello").write_text("mounted\n")
    out = m("run", ws, "--image", IMAGE, "--", "cat", "/data/hello", timeout=120)
    assert out.returncode == 0 and "mounted" in out.stdout, out.stderr


def test_the_agent_cannot_rewrite_the_policy_of_the_next_run(m):
    """Attack: the agent (prompt-injected by the repository, or its build
    scripts) rewrites /workspace/agent.yaml, which the workspace mount
    gives it read-write: the user's strict policy becomes permissive, and
    `mounts:` (/etc, ~/.bashrc), `grants:` or `secrets:` are added for the
    next `moat run` or `moat claude` of the workspace, which takes them
    without a word. Safe: the file the run was planned from is out of the
    agent's reach (a read-only bind over it), or moat says at the run's end
    that it changed."""
    needs_engine()
    strict = "network:\n  policy: strict\n"
    ws = ws_with(m, strict)
    script = ("printf 'network:\\n  policy: permissive\\nmounts:\\n  - /etc:/hostetc\\n' "
              "> /workspace/agent.yaml; echo rewritten")
    out = m("run", ws, "--image", IMAGE, "--", "sh", "-c", script, timeout=120)
    now = (ws / "agent.yaml").read_text()
    assert now == strict or "agent.yaml" in out.stdout + out.stderr, (
        f"agent.yaml is now {now!r}; moat said: {out.stderr[-500:]}")
    # Said once, in moat's voice (not "moat: moat: ...").
    assert "moat: agent.yaml was changed in the workspace" in out.stdout + out.stderr
    assert "moat: moat:" not in out.stdout + out.stderr


# ============================================ between the check and the mount

def swap_when_run_appears(m, path, target, timeout=60):
    """Waits for the run's directory (made after moat's mount checks), then
    puts a link to `target` where the directory `path` was, as an agent of
    another run that can write the workspace's parent would."""
    runs = m.home / "runs"

    def appeared():
        return runs.is_dir() and [p for p in runs.iterdir() if p.name.startswith("run_")]

    deadline = time.time() + timeout
    while not appeared():
        if time.time() > deadline:
            return False
        time.sleep(0.001)
    aside = path.with_name(path.name + ".aside")
    os.rename(path, aside)
    os.symlink(target, path)
    return True


def test_a_workspace_swapped_for_a_link_after_the_check_is_not_mounted(m, tmp_path):
    """Attack (TOCTOU): the workspace lies in a directory its attacker can
    write: another local user's home (root runs `moat run
    /home/alice/repo` to review alice's code), or a monorepo an agent of
    another run writes (`moat run -d repo`, then `moat run repo/pkg`).
    After moat's checks (run::start::launch: canonicalize, check_mounts)
    and before the supervisor creates the container, the attacker renames
    the workspace and puts a link in its place, here to the moat home
    (alice would choose /root). The engine follows the link, and the
    supervisor takes the agent's uid from the link's target
    (files.rs agent_user, at the files step): the container gets the CA
    key, the credential store and its key at /workspace, and runs as root
    instead of the workspace's owner (uid 1000)."""
    needs_engine()
    m.home.mkdir(parents=True, exist_ok=True)
    os.chmod(m.home, 0o700)
    repo = tmp_path / "repo"
    pkg = repo / "pkg"
    pkg.mkdir(parents=True)
    os.chown(pkg, 1000, 1000)
    proc = m.popen("run", pkg, "--image", IMAGE, "--", "sh", "-c",
                   "echo uid=$(id -u); ls -a /workspace; "
                   "cat /workspace/proxy/ca/ca.key 2>/dev/null | head -1")
    swapped = swap_when_run_appears(m, pkg, m.home)
    out, err = proc.communicate(timeout=120)
    assert swapped, "the run never appeared"
    mode = os.stat(m.home).st_mode & 0o7777
    assert "PRIVATE KEY" not in out, "the agent read the moat CA key:\n" + out
    assert "runs" not in out.split(), "the agent saw the moat home:\n" + out
    assert "uid=0" not in out, "the agent ran as root, not as the workspace's owner:\n" + out
    assert mode == 0o700, f"the moat home's mode became {oct(mode)}"


def test_a_mount_source_swapped_after_the_check_is_not_mounted(m):
    """Attack (TOCTOU): as above for a mount: `./data:/data:ro` is a plain
    directory when checked; an agent of another run of the workspace then
    replaces it with a link to the moat home (or /run, which holds the
    engine's socket). The supervisor hands the engine the unresolved path
    (steps.rs `files`, `m.source`), checked only in the starter."""
    needs_engine()
    ws = ws_with(m, "mounts:\n  - ./data:/data:ro\n")
    (ws / "data").mkdir()
    proc = m.popen("run", ws, "--image", IMAGE, "--", "sh", "-c",
                   "ls -a /data; cat /data/proxy/ca/ca.key 2>/dev/null | head -1")
    swapped = swap_when_run_appears(m, ws / "data", m.home)
    out, err = proc.communicate(timeout=120)
    assert swapped, "the run never appeared"
    assert "PRIVATE KEY" not in out, "the agent read the moat CA key:\n" + out
    # Safe is either: the run was refused, or it ran and saw the directory
    # that was checked (empty), not the moat home.
    ran_clean = proc.returncode == 0 and "runs" not in out.split()
    said_why = proc.returncode != 0 and "data" in err and "the run's supervisor exited" not in err
    assert ran_clean or said_why, f"rc={proc.returncode}\n{out}\n{err}"


# ======================================================= the workspace's path

@pytest.mark.parametrize("name", ["a:b", "a,b", "x:ro", "y:rw,z"])
def test_a_workspace_path_with_a_colon_or_comma_mounts_nothing_else(m, tmp_path, name):
    """Attack: a workspace whose path holds `:` (or `,`): the engine's bind
    is the string `source:target:mode` (docker.rs create_container), so a
    colon in the source splits it (bind-mount syntax injection: `x:ro`
    would read as source `x`, target `ro`). Docker and Podman refuse four
    fields, so this fails closed; the run must mount exactly the workspace
    or fail naming it, never mount another path."""
    needs_engine()
    ws = tmp_path / name
    ws.mkdir()
    (ws / "marker").write_text("the workspace\n")
    out = m("run", ws, "--image", IMAGE, "--", "cat", "/workspace/marker", timeout=120)
    if out.returncode == 0:
        assert "the workspace" in out.stdout
    else:
        assert str(ws) in out.stderr, out.stderr
