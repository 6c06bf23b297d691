"""The Python surface feels native: stubs that stubtest accepts, exceptions
that live in `moat`, pickle and subclass the built-ins, real defaults and
full docstrings, a timeout told apart from an exit, Ctrl+C that stops the
run it interrupts, asyncio that never blocks the loop, and a manylinux
wheel. The run tests use the real engine and the local test image (built by
scripts/build-test-image.sh)."""

import asyncio
import inspect
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

import moat
from runhelp import ENGINE
from upstream import Upstream, make_ca

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("MOAT_TEST_IMAGE", "moat-test:bookworm")
TOKEN = "ghp_pySurfaceTokenABCDEFGHIJKLMNOPQRSTUV01"


def engine_problem():
    """Why the run tests cannot run here, or None."""
    try:
        out = subprocess.run([ENGINE, "image", "inspect", IMAGE], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no {ENGINE} engine answers ({e})"
    if out.returncode != 0:
        return f"the image {IMAGE} is missing: build it with `bash scripts/build-test-image.sh`"
    return None


needs_engine = pytest.mark.skipif(engine_problem() is not None, reason=str(engine_problem()))


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("MOAT_HOME", str(h))
    monkeypatch.setenv("MOAT_KEYRING_BACKEND", "file")
    yield h
    if h.exists():
        moat.clean(home=h)


@pytest.fixture
def workspace(tmp_path):
    w = tmp_path / "ws"
    w.mkdir()
    return w


def containers_of(run_id):
    """The engine's containers (running or not) of a run."""
    out = subprocess.run([ENGINE, "ps", "-aq", "--filter", f"label=dev.moat.run={run_id}"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


# 1. stubs ------------------------------------------------------------------


def stubtest(*modules):
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed in the test venv: run `bash scripts/setup.sh`")
    allowlist = ROOT / "python" / "stubtest-allowlist.txt"
    extra = ["--allowlist", str(allowlist)] if allowlist.exists() else []
    return subprocess.run([sys.executable, "-m", "mypy.stubtest", *modules, *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.one_engine
def test_stubtest_is_clean_for_moat_and_its_native_module():
    # `stubtest moat` checks the package and every submodule (moat._moat
    # included); `stubtest moat._moat` checks the native module alone.
    # (Naming both in one command makes mypy see moat/_moat.pyi twice.)
    for module in ("moat", "moat._moat"):
        out = stubtest(module)
        assert out.returncode == 0, f"stubtest {module}:\n{out.stdout}{out.stderr}"
        assert "Success: no issues found" in out.stdout


# 2. exceptions -------------------------------------------------------------


EXCEPTIONS = {
    "MoatError": (Exception,),
    "ConfigError": (ValueError,),
    "InvalidArgumentError": (ValueError,),
    "MoatIOError": (OSError,),
    "ContainerRuntimeError": (RuntimeError,),
    "InternalError": (RuntimeError,),
    "RunTimeout": (TimeoutError, OSError),
}


@pytest.mark.one_engine
@pytest.mark.parametrize("name, bases", EXCEPTIONS.items())
def test_exceptions_live_in_moat_and_are_the_builtins_they_are(name, bases):
    cls = getattr(moat, name)
    assert cls.__module__ == "moat" and cls.__qualname__ == name
    assert issubclass(cls, moat.MoatError)
    for base in bases:
        assert issubclass(cls, base), f"{name} is not a {base.__name__}"
    assert cls.__doc__ and len(cls.__doc__) > 40


@pytest.mark.one_engine
def test_config_error_lists_every_problem_structured_and_pickles(tmp_path):
    (tmp_path / "agent.yaml").write_text("name: demo\ngrnats:\n  - github\nports:\n  web: 70000\n")
    with pytest.raises(ValueError) as info:  # a ConfigError is a ValueError
        moat.load_config(tmp_path)
    err = info.value
    assert type(err) is moat.ConfigError
    path = str(tmp_path / "agent.yaml")
    assert err.errors == [
        moat.Diagnostic(path, 2, 1, 'unknown field "grnats" (did you mean "grants"?)'),
        moat.Diagnostic(path, 5, 8, "ports.web: port 70000 is out of range (1-65535)"),
    ]
    first = err.errors[0]
    assert (first.path, first.line, first.column) == (err.path, err.line, err.column) == (path, 2, 1)
    assert str(first) == str(err) == f'{path}:2:1: unknown field "grnats" (did you mean "grants"?)'
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is moat.ConfigError
    assert str(again) == str(err) and again.args == err.args
    assert again.errors == err.errors and (again.path, again.line, again.column) == (path, 2, 1)
    assert again.message == err.message


@pytest.mark.one_engine
def test_io_and_argument_errors_are_oserror_and_valueerror_and_pickle(tmp_path):
    with pytest.raises(OSError) as info:
        moat.load_config(tmp_path / "absent")
    err = info.value
    assert type(err) is moat.MoatIOError and "no such file or directory" in str(err)
    assert err.errors == [moat.Diagnostic(None, None, None, str(err))] and err.line is None
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is moat.MoatIOError and str(again) == str(err) and again.errors == err.errors

    with pytest.raises(ValueError) as info:
        moat.Proxy(policy="strict", allow=["*"], home=tmp_path / "home")
    err = info.value
    assert type(err) is moat.InvalidArgumentError and "allow[0]" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is moat.InvalidArgumentError and again.message == err.message


@pytest.mark.one_engine
def test_exceptions_can_be_made_and_caught_by_callers():
    err = moat.ContainerRuntimeError("docker: unreachable")
    assert err.errors == [moat.Diagnostic(None, None, None, "docker: unreachable")]
    assert str(err) == "docker: unreachable" and isinstance(err, RuntimeError)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is moat.ContainerRuntimeError and again.errors == err.errors


# 3. docstrings and signatures ----------------------------------------------


def public_callables():
    """Every public function, class, method and property of moat and
    moat.aio (exceptions have their own tests)."""
    for module in (moat, moat.aio):
        prefix = "" if module is moat else "aio."
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            if not callable(obj):
                continue
            yield prefix + name, obj
            if inspect.isclass(obj):
                for attr in vars(obj):
                    if not attr.startswith("_"):
                        yield f"{prefix}{name}.{attr}", getattr(obj, attr)


@pytest.mark.one_engine
@pytest.mark.parametrize("name, obj", list(public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_callable_documents_its_parameters_with_real_defaults(name, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    if not callable(obj):
        return  # a property: its docstring is all
    try:
        params = [p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")]
    except ValueError:
        assert inspect.isclass(obj), f"{name} has no signature"
        return  # a class made only by moat (Config, LogStream, ...)
    for p in params:
        assert p.default is not Ellipsis, f"{name}: {p.name} shows its default as ..."
        assert p.name in doc, f"{name}: the docstring does not document {p.name}"
    if params and not inspect.isclass(obj):
        assert "Raises:" in doc or "Returns:" in doc or "Yields:" in doc, name


@pytest.mark.one_engine
def test_help_shows_the_real_signature_of_run():
    sig = inspect.signature(moat.run)
    assert str(sig) == ("(workspace='.', command=None, grants=(), image=None, env=None, name=None, "
                        "network=None, detach=False, timeout=None, home=None, runtime=None)")
    doc = moat.run.__doc__
    for word in ("Returns:", "Raises:", "RunTimeout", "KeyboardInterrupt", "ConfigError"):
        assert word in doc
    assert str(inspect.signature(moat.Proxy)).startswith("(credentials=(), policy=None, allow=()")


# 4. timeouts and Ctrl+C ------------------------------------------------------


@needs_engine
def test_a_timeout_raises_run_timeout_after_stopping_the_run(home, workspace):
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        moat.run(workspace, command=["sleep", "300"], image=IMAGE, timeout=2)
    # Well before the command's own 300 s (the start itself can take a while).
    assert time.monotonic() - started < 120
    err = info.value
    assert type(err) is moat.RunTimeout and err.timeout == 2
    assert err.run.state == "stopped" and err.run.exit_code in (137, 143)
    assert err.run.run_id in str(err) and "still running after 2" in str(err)
    assert containers_of(err.run.run_id) == []
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is moat.RunTimeout and again.timeout == 2 and str(again) == str(err)
    assert again.run.run_id == err.run.run_id and again.run.exit_code == err.run.exit_code
    # A run that ends in time is an ordinary result, whatever its exit code.
    assert moat.run(workspace, command=["sh", "-c", "exit 3"], image=IMAGE, timeout=60).exit_code == 3


# The child restores Python's own Ctrl+C handling: Python installs it only
# when SIGINT is not ignored at its start, and a job started in the
# background by a non-interactive shell (a CI runner's) inherits SIGINT
# ignored, so it would never hear the interrupt.
CHILD = textwrap.dedent("""
    import signal, sys, moat
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        moat.run(sys.argv[1], command=["sleep", "60"], image=sys.argv[2])
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    print("not interrupted", flush=True)
""")


@needs_engine
def test_ctrl_c_while_run_waits_stops_the_run_then_reraises(home, workspace):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(workspace), IMAGE],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        running = []
        while time.monotonic() < deadline and child.poll() is None:
            running = [r for r in moat.runs(home=home) if r["state"] == "running"]
            if running:
                break
            time.sleep(0.2)
        assert running, f"the child's run did not start: {child.stderr.read() if child.poll() is not None else ''}"
        time.sleep(0.5)  # inside moat.run's wait
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130 and out.strip() == "interrupted", out + err
    run = moat.Run(running[0]["id"], home=home)
    assert run.state == "stopped" and run.exit_code in (137, 143)
    assert containers_of(run.run_id) == []


@needs_engine
def test_detach_leaves_the_run_to_the_caller(home, workspace):
    r = moat.run(workspace, command=["sleep", "300"], image=IMAGE, detach=True, timeout=0.1)
    try:
        assert r.state == "running" and len(containers_of(r.run_id)) == 1
    finally:
        r.stop(grace=1)


# 5. asyncio -----------------------------------------------------------------


class Heartbeat:
    """A task that ticks every 20 ms: its longest gap shows whether the
    event loop was ever blocked."""

    def __init__(self):
        self.times = []
        self.task = asyncio.ensure_future(self._beat())

    async def _beat(self):
        while True:
            self.times.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        return max(b - a for a, b in zip(self.times, self.times[1:]))


@needs_engine
def test_many_runs_at_once_on_one_loop_without_blocking_it(home, workspace):
    async def one(i):
        t = time.monotonic()
        r = await moat.aio.run(workspace, command=["sh", "-c", f"sleep 1; echo {i}"], image=IMAGE)
        return r, time.monotonic() - t

    async def main():
        beat = Heartbeat()
        t = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(6)))
        elapsed = time.monotonic() - t
        return results, elapsed, await beat.stop()

    results, elapsed, gap = asyncio.run(main())
    for i, (r, _) in enumerate(results):
        assert (r.exit_code, r.output) == (0, f"{i}\n")
    total = sum(d for _, d in results)
    assert elapsed < total / 2, f"6 runs took {elapsed:.1f} s together, {total:.1f} s summed: not concurrent"
    assert gap < 1.5, f"the event loop was blocked for {gap:.2f} s"


@needs_engine
def test_async_start_follow_logs_and_stop_at_the_end(home, workspace):
    async def main():
        beat = Heartbeat()
        async with moat.aio.Run.start(workspace, image=IMAGE, name="py-aio",
                                      command=["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done"]) as r:
            assert r.name == "py-aio"
            chunks = [data async for _, data in r.logs(follow=True)]
            code = await r.wait()
            so_far = [data async for _, data in r.logs()]
        async with moat.aio.Run.start(workspace, image=IMAGE, command=["sleep", "300"]) as long:
            assert await long.state() == "running"
            assert await long.wait(timeout=0.3) is None
        opened = await moat.aio.Run.open("py-aio")
        return chunks, code, so_far, long, opened, await beat.stop()

    chunks, code, so_far, long, opened, gap = asyncio.run(main())
    assert chunks == so_far == [b"1\n", b"2\n", b"3\n"] and code == 0
    assert long.sync.state == "stopped" and long.sync.exit_code in (137, 143)
    assert containers_of(long.run_id) == []
    assert opened.sync.exit_code == 0
    assert gap < 1.5, f"the event loop was blocked for {gap:.2f} s"


@needs_engine
def test_awaiting_start_returns_a_run_that_is_the_callers(home, workspace):
    """`await moat.aio.Run.start(...)` (no `async with`): the run is the
    caller's to wait for; it is not stopped when start returns."""
    async def main():
        r = await moat.aio.Run.start(workspace, image=IMAGE,
                                     command=["sh", "-c", "sleep 2; echo awaited"])
        state = await r.state()
        code = await r.wait()
        out = b"".join([data async for _, data in r.logs()])
        return state, code, out

    state, code, out = asyncio.run(main())
    assert state in ("starting", "running"), state
    assert code == 0 and out == b"awaited\n", (code, out)


@needs_engine
def test_async_timeout_and_cancellation_stop_the_run(home, workspace):
    async def main():
        with pytest.raises(moat.RunTimeout) as info:
            await moat.aio.run(workspace, command=["sleep", "300"], image=IMAGE, timeout=1)
        timed_out = info.value.run
        task = asyncio.ensure_future(moat.aio.run(workspace, command=["sleep", "300"], image=IMAGE))
        for _ in range(300):
            await asyncio.sleep(0.2)
            running = [r for r in await asyncio.to_thread(moat.runs) if r["state"] == "running"]
            if running:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return timed_out, running

    timed_out, running = asyncio.run(main())
    assert timed_out.state == "stopped" and timed_out.exit_code in (137, 143)
    assert running, "the cancelled run never started"
    cancelled = moat.Run(running[0]["id"])
    assert cancelled.state == "stopped" and cancelled.exit_code in (137, 143)
    assert containers_of(timed_out.run_id) == containers_of(cancelled.run_id) == []


@pytest.mark.one_engine
def test_async_proxy_context(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    server = Upstream(cert, key)
    cred = moat.Credential(host="api.github.com", header="Authorization", value=f"Bearer {TOKEN}")

    async def main():
        async with moat.aio.Proxy(credentials=[cred], upstream_ca=ca, resolve=server.resolve(),
                                  home=tmp_path / "home") as proxy:
            assert isinstance(proxy, moat.Proxy) and not proxy.closed
            child = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "20", "https://api.github.com/user",
                env={**os.environ, **proxy.env()}, stdout=asyncio.subprocess.PIPE)
            out, _ = await child.communicate()
        return proxy, out

    try:
        proxy, out = asyncio.run(main())
    finally:
        server.close()
    assert json.loads(out)["authorization"] == [f"Bearer {TOKEN}"]
    assert proxy.closed
    assert [r["url"] for r in proxy.trace()] == ["https://api.github.com/user"]


# 6. packaging ---------------------------------------------------------------


@pytest.mark.one_engine
def test_the_wheel_is_manylinux_with_its_metadata(tmp_path):
    # The dev profile (what `maturin develop` already built), so this takes
    # seconds; maturin checks the symbol versions against the tag either way.
    maturin = pathlib.Path(sys.executable).parent / "maturin"
    assert maturin.exists(), "maturin is not installed in the test venv: run `bash scripts/setup.sh`"
    out = subprocess.run([str(maturin), "build", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    [wheel] = tmp_path.glob("*.whl")
    tags = wheel.name[:-len(".whl")].split("-")[-1]
    assert tags.startswith("manylinux_2_"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for f in ("moat/__init__.py", "moat/_errors.py", "moat/aio.py", "moat/_moat.pyi", "moat/py.typed"):
        assert f in names
    for field in ("Summary: ", "Requires-Python: >=3.9", "License-Expression: MIT", "Keywords: ",
                  "Project-URL: Repository, ", "Classifier: Typing :: Typed",
                  "Description-Content-Type: text/markdown"):
        assert field in meta, field
    assert "pip install ." in meta, "the README says how to install the module"


@pytest.mark.one_engine
def test_an_empty_home_is_the_default_and_a_relative_one_is_made_absolute(tmp_path, monkeypatch):
    """`home=""` meant the current directory: even `moat.grants(home="")`
    made an encryption key and a credential store there, and a proxy's CA
    bundle was handed to child processes by a relative path. Empty is none
    given, as an empty MOAT_HOME is; a relative home is made absolute."""
    cwd, default = tmp_path / "cwd", tmp_path / "default-home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MOAT_HOME", str(default))
    assert moat.grants(home="") == []
    with moat.Proxy(home="") as p:
        assert os.path.isabs(p.ca_cert_path) and p.ca_cert_path.startswith(str(default)), p.ca_cert_path
    assert list(cwd.iterdir()) == []
    with moat.Proxy(home="rel") as p:
        assert p.ca_cert_path.startswith(str(cwd / "rel")), p.ca_cert_path


@pytest.mark.one_engine
def test_moat_in_a_child_forked_after_it_started_is_an_error_not_a_hang(tmp_path):
    """A child forked after moat started has its runtime's memory but none
    of its threads: a proxy started there reported an address, never
    accepted, and its close never returned (with the GIL released, so not
    even Ctrl+C). Now every call there says why, at once."""
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
    p = moat.Proxy(home=tmp_path / "home")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            moat.Proxy(home=tmp_path / "home")
            said = b"started"
        except moat.InvalidArgumentError as e:
            said = b"refused: " + str(e).encode()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            said = b"other: " + repr(e).encode()
        os.write(w, said)
        os._exit(0)
    os.close(w)
    try:
        deadline = time.time() + 20
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("moat in the forked child hung")
            time.sleep(0.1)
        said = os.read(r, 4096).decode()
    finally:
        os.close(r)
        p.close()
    assert said.startswith("refused: ") and "forked" in said, said


@pytest.mark.one_engine
def test_one_proxy_may_be_read_by_one_thread_while_another_closes_it(tmp_path):
    """A read while close() ran raised RuntimeError('Already mutably
    borrowed'), and a close() while another thread read raised 'Already
    borrowed' and left the proxy serving."""
    import threading
    errors = []
    for _ in range(30):
        p = moat.Proxy(home=tmp_path / "home")
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    p.url, p.env(), p.trace(), p.dropped, p.closed
                except Exception as e:  # noqa: BLE001 - what the test looks for
                    errors.append(e)
                    return

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.01)
        try:
            p.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        stop.set()
        t.join()
        assert p.closed
    assert errors == []
