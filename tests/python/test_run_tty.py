"""Interactive runs (-i) through a real pseudo-terminal: the container gets a
TTY, Ctrl+C goes to the container, Ctrl-/ d detaches, Ctrl-/ k stops, and
`moat attach -i` reattaches."""

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

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


class Terminal:
    """`moat ...` on a pseudo-terminal of its own."""

    def __init__(self, args, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(str(MOAT), [str(MOAT), *args], env)
        self.out = b""

    def send(self, data):
        os.write(self.fd, data)

    def _seen_by(self, needle, deadline, start=0):
        """Reads until `needle` is in the output from offset `start` on
        (True) or the deadline passes (False); fails at EOF."""
        while needle not in self.out[start:]:
            left = deadline - time.time()
            if left <= 0:
                return False
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    assert needle in self.out[start:], \
                        f"{needle!r} not seen before EOF in {self.out[-800:]!r}"
                self.out += chunk
        return True

    def expect(self, needle, timeout=20, start=0):
        """Waits for `needle` in the output (from offset `start` on)."""
        assert self._seen_by(needle, time.time() + timeout, start), \
            f"{needle!r} not seen in {self.out[-800:]!r}"

    def seen(self, needle, timeout, start=0):
        """Like expect, but says whether `needle` showed instead of failing."""
        return self._seen_by(needle, time.time() + timeout, start)

    def send_until(self, data, needle, timeout=30, every=1.0):
        """Sends `data`, and again every `every` seconds, until `needle`
        shows in what follows the first send. Keys can be lost before the
        engine has wired the TTY's input (Podman wires it a moment after the
        output), and a shell reattached to does not redraw its prompt, so
        there is nothing else to wait for. `needle` must be what the command
        prints, not what is typed (echo a computed value): the terminal
        echoes the typed text too, and `moat attach` replays earlier output."""
        start = len(self.out)
        deadline = time.time() + timeout
        while True:
            self.send(data)
            if self._seen_by(needle, min(deadline, time.time() + every), start):
                return
            assert time.time() < deadline, \
                f"{needle!r} not seen within {timeout} s of sending {data!r}: {self.out[-800:]!r}"

    def poll(self, timeout):
        """moat's exit code once it exits within `timeout` seconds, else
        None (it is left running)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._drain()
                return os.waitstatus_to_exitcode(status)
            try:
                r, _, _ = select.select([self.fd], [], [], 0.1)
                if r:
                    self.out += os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.05)
        return None

    def wait(self, timeout=60):
        code = self.poll(timeout)
        if code is None:
            os.kill(self.pid, 9)
            raise AssertionError(f"moat did not exit; output {self.out[-800:]!r}")
        return code

    def _drain(self):
        # What moat wrote just before it exited is still in the terminal's
        # buffer: read it to the end (EIO once the other side is closed).
        while True:
            try:
                r, _, _ = select.select([self.fd], [], [], 0.2)
                chunk = os.read(self.fd, 4096) if r else b""
            except OSError:
                return
            if not chunk:
                return
            self.out += chunk


@pytest.fixture
def ws(tmp_path):
    w = tmp_path / "ws"
    w.mkdir()
    return w


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "MOAT_HOME": str(tmp_path / "home"), "TERM": "xterm"}
    yield e
    subprocess.run([str(MOAT), "list", "--json"], env=e, capture_output=True)
    for run in json.loads(subprocess.run([str(MOAT), "list", "--json"], env=e, capture_output=True,
                                         text=True).stdout or "[]"):
        subprocess.run([str(MOAT), "destroy", run["id"]], env=e, capture_output=True, timeout=60)


def runs(env):
    return json.loads(subprocess.run([str(MOAT), "list", "--json"], env=env, capture_output=True,
                                     text=True, check=True).stdout)


def test_interactive_shell_gets_a_tty_and_its_exit_code(env, ws):
    t = Terminal(["run", "-i", "--image", IMAGE, str(ws), "--", "bash", "--norc", "-i"], env)
    # The whole start of the run (network, proxy, container) comes first.
    t.expect(b"Ctrl-/ d detaches", timeout=90)
    # Type at the prompt (`bash-5.2$ `, or `bash-5.2# ` when the agent runs
    # as root), and again until the command is seen to run: Podman connects
    # a TTY's input a moment after its output, and drops keys typed before.
    t.expect(b"bash-", timeout=60)
    t.send_until(b"tty; echo tty-is-$((6*7))\r", b"tty-is-42")
    assert b"/dev/pts/" in t.out
    # Ctrl+C belongs to the container: it interrupts the sleep, not moat.
    # The foreground process says when it runs (it holds the terminal by
    # then), the sleep is long and the wait for what follows well below it,
    # and what is awaited is output, not the typed text the terminal echoes.
    t.send(b"sh -c 'echo sleeping-$((6*7)); exec sleep 300'\r")
    t.expect(b"sleeping-42")
    t.send(b"\x03")
    # (Sent again each second until it runs: had the sleep not been
    # interrupted, none of them would run for another five minutes.)
    t.send_until(b"echo after-interrupt-$((6*7))\r", b"after-interrupt-42", timeout=60)
    t.send(b"exit 7\r")
    assert t.wait() == 7
    [run] = runs(env)
    assert run["interactive"] and run["exit_code"] == 7


def test_detach_and_reattach_then_stop_with_escapes(env, ws):
    t = Terminal(["run", "-i", "--image", IMAGE, str(ws), "--", "bash", "--norc", "-i"], env)
    t.expect(b"Ctrl-/ d detaches", timeout=90)
    # Type at the prompt: Podman connects a TTY's input a moment after its
    # output, and keys typed before that are not delivered. (The prompt is
    # `bash-5.2$ `, or `bash-5.2# ` when the agent runs as root.) The export
    # is seen to have run before detaching.
    t.expect(b"bash-", timeout=60)
    t.send_until(b"export MARK=still-here; echo marked-$((6*7))\r", b"marked-42")
    t.send(b"\x1fd")
    assert t.wait() == 0
    assert b"Detached" in t.out
    [run] = runs(env)
    assert run["state"] == "running"

    again = Terminal(["attach", "-i", run["id"]], env)
    again.expect(b"Ctrl-/ k stops", timeout=60)
    # The shell does not redraw its prompt, and the attach replays what the
    # run printed before (`still-here` among it): send until the variable's
    # value comes back with a computed suffix that only the command prints.
    again.send_until(b"echo $MARK-$((6*7))\r", b"still-here-42")
    again.send(b"\x1fk")
    code = again.wait(timeout=90)
    assert code in (137, 143, 130, 0), code
    [run] = runs(env)
    assert run["state"] == "stopped"


def test_attach_i_to_a_run_without_tty_is_refused(env, ws):
    rid = subprocess.run([str(MOAT), "run", "-d", "--image", IMAGE, str(ws), "--", "sleep", "60"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([str(MOAT), "attach", "-i", rid], env=env, capture_output=True, text=True,
                         timeout=30)
    # moat's own refusal, not a command's status: 125.
    assert out.returncode == 125
    assert "has no TTY" in out.stderr


def set_size(fd, rows, cols):
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_the_terminal_size_is_passed_on_and_follows_resizes(env, ws):
    t = Terminal(["run", "-i", "--image", IMAGE, str(ws), "--", "bash", "--norc", "-i"], env)
    set_size(t.fd, 40, 100)
    t.expect(b"Ctrl-/ d detaches", timeout=90)
    t.expect(b"bash-", timeout=60)
    # (The typed `$(stty size)` never matches a size: only the output does.)
    t.send_until(b"echo size=$(stty size)\r", b"size=40 100")
    set_size(t.fd, 50, 120)  # the kernel sends moat SIGWINCH
    t.send_until(b"echo size=$(stty size)\r", b"size=50 120")
    t.send(b"exit\r")
    assert t.wait() == 0


def test_nothing_the_command_prints_at_once_is_lost(env, ws):
    """An interactive run is attached before its container starts, as
    `docker run -it` is: output written in the command's first instant (a
    shell's prompt, a banner) reaches the terminal every time, and the
    endpoints are still printed. Several runs, since a lost start is a race."""
    (ws / "agent.yaml").write_text("ports:\n  web: 8000\n")
    for i in range(4):
        t = Terminal(["run", "-i", "--image", IMAGE, str(ws), "--",
                      "sh", "-c", f"echo first-{i}-$((6*7)); echo second-{i}; exit 3"], env)
        assert t.wait(120) == 3, t.out[-800:]
        assert f"first-{i}-42".encode() in t.out, t.out[-800:]
        assert f"second-{i}".encode() in t.out, t.out[-800:]
        assert b"Endpoints of" in t.out and b"https://web." in t.out, t.out[-800:]
        assert t.out.index(b"Ctrl-/ d detaches") < t.out.index(f"first-{i}-42".encode())

