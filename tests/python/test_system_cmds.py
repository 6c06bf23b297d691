"""End-to-end tests of `moat clean` (images moat built, `--dry-run`, what it
asks about agreeing with what `-f` removes), `moat system images` and
`moat system containers`, `moat promote`, and `moat completions` and the
suggestions for a mistyped command: the real `moat` binary, the real engine
(MOAT_RUNTIME: docker or podman) and the image moat-test:bookworm.

No traffic leaves this host: the runs' commands use no network. The images
"moat built" here are made by the test from moat-test:bookworm with moat's
label for this test's home, so that `moat clean` never touches an image of
another home (another test's Claude Code image, say)."""

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from runhelp import ENGINE, IMAGE, MOAT, Moat, docker_problem, sh

BUILT_LABEL = "dev.moat.built"


@pytest.fixture
def engine():
    problem = docker_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def m(tmp_path, engine):
    moat = Moat(tmp_path)
    yield moat
    moat.cleanup()


def plain_moat(*args, env=None):
    """`moat` with no engine needed (completions, argument errors)."""
    return subprocess.run([str(MOAT), *args], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


def built_image(home, name):
    """An image as moat labels the images it builds for `home` (made from
    the test image by the engine's own commit); its tag."""
    tag = f"moat-deps:systest-{name}-{uuid.uuid4().hex[:12]}"
    cid = sh(ENGINE, "create", IMAGE, "true", check=True).stdout.strip()
    try:
        sh(ENGINE, "commit", "--change", f"LABEL {BUILT_LABEL}={home}", cid, tag, check=True)
    finally:
        sh(ENGINE, "rm", "-f", cid)
    return tag


def image_exists(tag) -> bool:
    return sh(ENGINE, "image", "inspect", tag).returncode == 0


def remove_images(*tags):
    for tag in tags:
        sh(ENGINE, "rmi", "-f", tag)


def same_tag(listed, tag):
    """A tag as the engine lists it: Podman's carry `localhost/`."""
    return listed == tag or listed == f"localhost/{tag}"


def by_tag(images, tag):
    found = [i for i in images if any(same_tag(t, tag) for t in i["tags"])]
    assert len(found) <= 1, found
    return found[0] if found else None


def start_time(pid):
    """A process's start time as moat records it (/proc/<pid>/stat, 22)."""
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def rewrite_meta(m, run_id, **changes):
    path = m.dir(run_id) / "run.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    tmp = path.with_name(".run.json.test")
    tmp.write_text(json.dumps(meta))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# clean -----------------------------------------------------------------------

def test_clean_asks_about_what_clean_f_removes_right_after_a_run_ended(m):
    """`moat run` returns once the exit code is recorded; the supervisor is
    still removing the container then. `moat clean` (its question and
    --dry-run) used to count only runs already cleaned up (0), while
    `clean -f` waited for the supervisor and removed the run (1). Here the
    supervisor's cleanup is held (a live process stands in for it) so the
    moment cannot pass before we look."""
    ws = m.workspace()
    done = m.run(ws, "true")
    assert done.returncode == 0, done.stderr
    run_id = m.latest()["id"]
    m.wait_cleaned(run_id)
    standin = subprocess.Popen(["sleep", "120"])
    try:
        rewrite_meta(m, run_id, cleaned=False,
                     supervisor=[standin.pid, start_time(standin.pid)])
        assert m.meta(run_id)["state"] == "stopped"
        dry = json.loads(m("clean", "--dry-run", "--json", check=True).stdout)
        assert dry["runs"] == [run_id], dry
        text = m("clean", "--dry-run", check=True)
        assert f"run        {run_id}" in text.stdout, text.stdout
        assert "Would remove 1 run(s)" in text.stderr, text.stderr
        # A dry run removes nothing.
        assert m.dir(run_id).exists()
        # Without a terminal and without -f, it refuses and says how.
        asked = m("clean")
        assert asked.returncode != 0 and "--dry-run" in asked.stderr, asked.stderr
        assert m.dir(run_id).exists()
    finally:
        standin.kill()
        standin.wait()
    # The "supervisor" is gone: the next look cleans up after it, and
    # `clean -f` removes what the dry run said.
    done = json.loads(m("clean", "-f", "--json", check=True).stdout)
    assert done["runs"] == dry["runs"], (done, dry)
    assert not m.dir(run_id).exists()


def test_clean_removes_the_images_moat_built_that_nothing_uses(m, tmp_path):
    other_home = str(tmp_path / "another-home")
    unused = built_image(m.home, "unused")
    used = built_image(m.home, "used")
    foreign = built_image(other_home, "foreign")
    try:
        ws = m.workspace()
        live = m("run", ws, "--image", used, "-d", "--", "sleep", "300", check=True)
        run_id = live.stdout.strip()
        assert m.wait_state(run_id, ("running",)) == "running"

        # moat system images: this home's, with what uses them.
        images = json.loads(m("system", "images", "--json", check=True).stdout)
        assert by_tag(images, foreign) is None
        u, d = by_tag(images, unused), by_tag(images, used)
        assert u and d, images
        assert u["runs"] == [] and u["containers"] == [] and u["home"] == str(m.home)
        assert d["runs"] == [run_id] and len(d["containers"]) == 1, d
        assert d["engine"] == ENGINE and d["id"].startswith("sha256:")
        everyone = json.loads(m("system", "images", "--all", "--json", check=True).stdout)
        assert by_tag(everyone, foreign)["home"] == other_home
        table = m("system", "images", check=True).stdout
        assert "USED BY" in table and run_id in table, table

        # moat system containers: the run's, running.
        containers = json.loads(m("system", "containers", "--json", check=True).stdout)
        [c] = [c for c in containers if c["run"] == run_id]
        assert c["name"] == f"moat-{run_id}" and c["state"] == "running", c
        assert c["home"] == str(m.home) and c["engine"] == ENGINE
        assert same_tag(c["image"], used), c
        assert c["created"].endswith("Z")
        assert run_id in m("system", "containers", check=True).stdout

        # The dry run names the unused image only; clean -f removes just that.
        dry = json.loads(m("clean", "--dry-run", "--json", check=True).stdout)
        assert [same_tag(i, unused) for i in dry["images"]] == [True], dry
        assert dry["runs"] == []
        assert image_exists(unused)
        # --keep-images leaves them all.
        kept = json.loads(m("clean", "-f", "--keep-images", "--json", check=True).stdout)
        assert kept["images"] == [] and image_exists(unused), kept
        assert json.loads(m("clean", "--dry-run", "--keep-images", "--json",
                            check=True).stdout)["images"] == []
        done = json.loads(m("clean", "-f", "--json", check=True).stdout)
        assert done["images"] == dry["images"] and done["runs"] == [], done
        assert not image_exists(unused)
        assert image_exists(used) and image_exists(foreign)
        assert m.meta(run_id)["state"] == "running"

        # Once the run is over, it and then its image go.
        m("stop", run_id, "-t", "1", check=True, timeout=60)
        dry = json.loads(m("clean", "--dry-run", "--json", check=True).stdout)
        assert dry["runs"] == [run_id]
        assert [same_tag(i, used) for i in dry["images"]] == [True], dry
        done = json.loads(m("clean", "-f", "--json", check=True).stdout)
        assert done["runs"] == dry["runs"] and done["images"] == dry["images"], (done, dry)
        assert not image_exists(used)
        assert image_exists(foreign), "another home's image was removed"
        assert json.loads(m("system", "containers", "--json", check=True).stdout) == []
        assert json.loads(m("system", "images", "--json", check=True).stdout) == []
    finally:
        remove_images(unused, used, foreign)


# promote ---------------------------------------------------------------------

def test_promote_keeps_a_runs_artifacts_past_destroy_and_clean(m, tmp_path):
    ws = m.workspace()
    out = m.run(ws, "sh", "-c", "echo kept-for-later; echo changed > /workspace/new.txt")
    assert out.returncode == 0, out.stderr
    run_id = m.latest()["id"]
    m.wait_cleaned(run_id)

    promoted = m("promote", run_id, "--json", check=True)
    info = json.loads(promoted.stdout)
    dest = m.home / "promoted" / run_id
    assert info["dir"] == str(dest) and info["run"] == run_id
    names = {f["name"] for f in info["files"]}
    for name in ("run.json", "logs.jsonl", "network.jsonl", "audit.jsonl",
                 "checkpoints.jsonl", "audit-bundle.json"):
        assert name in names, names
        assert (dest / name).is_file(), name
    assert "run.lock" not in names and not any(n.startswith(".") for n in names)
    assert info["bundle"] == "audit-bundle.json" and info["bundle_problem"] is None
    assert "not recorded" in info["workspace_changes"]
    assert info["workspace"] == str(ws)
    assert json.loads((dest / "promoted.json").read_text()) == info
    assert os.stat(dest).st_mode & 0o777 == 0o700
    for f in dest.iterdir():
        assert os.stat(f).st_mode & 0o777 == 0o600, f
    # What was copied is what the manifest says.
    import hashlib
    for f in info["files"]:
        assert hashlib.sha256((dest / f["name"]).read_bytes()).hexdigest() == f["sha256"]

    # Gone with the run: not the promoted copy.
    m("destroy", run_id, check=True)
    m("clean", "-f", check=True)
    assert not m.dir(run_id).exists()
    assert "kept-for-later" in (dest / "logs.jsonl").read_text()
    assert m("verify-bundle", dest / "audit-bundle.json", check=True).returncode == 0
    audit = m("audit", dest, check=True)
    assert "Verified" in audit.stderr, audit.stderr


def test_promote_to_a_directory_and_what_it_refuses(m, tmp_path):
    ws = m.workspace()
    assert m.run(ws, "true").returncode == 0
    run_id = m.latest()["id"]
    m.wait_cleaned(run_id)

    to = tmp_path / "evidence" / "first"
    out = m("promote", run_id, "--to", to, check=True)
    assert out.stdout.strip() == str(to)
    assert "audit-bundle.json" in out.stderr and "not copied" in out.stderr, out.stderr
    assert (to / "audit.jsonl").is_file() and (to / "promoted.json").is_file()
    # Nothing but the result is left beside it.
    assert sorted(p.name for p in to.parent.iterdir()) == ["first"]

    again = m("promote", run_id, "--to", to)
    assert again.returncode != 0 and "not empty" in again.stderr, again.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    m("promote", run_id, "--to", empty, check=True)
    assert (empty / "run.json").is_file()
    # The default place, twice.
    m("promote", run_id, check=True)
    twice = m("promote", run_id)
    assert twice.returncode != 0 and "promoted already" in twice.stderr, twice.stderr
    # Not where clean and destroy remove runs.
    inside = m("promote", run_id, "--to", m.home / "runs" / "keep")
    assert inside.returncode != 0 and "where `moat destroy`" in inside.stderr, inside.stderr
    assert not (m.home / "runs" / "keep").exists()

    # A running run: not yet.
    live = m.detach(ws, "sleep", "300")
    early = m("promote", live)
    assert early.returncode != 0 and "once it is over" in early.stderr, early.stderr
    m("stop", live, "-t", "1", check=True, timeout=60)


# completions and suggestions ---------------------------------------------------

def test_completions_name_the_commands_and_never_the_internal_ones(tmp_path):
    for shell in ("bash", "zsh", "fish"):
        out = plain_moat("completions", shell)
        assert out.returncode == 0, out.stderr
        assert "promote" in out.stdout and "system" in out.stdout, shell
        assert "_supervise" not in out.stdout and "_router" not in out.stdout, shell
        if shell == "bash":
            script = tmp_path / "moat.bash"
            script.write_text(out.stdout)
            check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
            # What bash offers after `moat pro<TAB>` and `moat _<TAB>`.
            complete = subprocess.run(
                ["bash", "-c", 'source "$1"; COMP_WORDS=(moat pro); COMP_CWORD=1; '
                 'COMP_LINE="moat pro"; COMP_POINT=8; _moat moat pro moat; '
                 'echo "${COMPREPLY[@]}"; COMP_WORDS=(moat _); COMP_LINE="moat _"; '
                 'COMP_POINT=6; COMPREPLY=(); _moat moat _ moat; echo "[${COMPREPLY[@]}]"',
                 "bash", str(script)],
                capture_output=True, text=True)
            offered, hidden = complete.stdout.splitlines()
            assert set(offered.split()) == {"promote", "proxy"}, complete
            assert hidden == "[]", complete
        elif shutil.which(shell):
            check = subprocess.run([shell, "-n", "/dev/stdin"], input=out.stdout,
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
    bad = plain_moat("completions", "tcsh")
    assert bad.returncode == 2 and "bash" in bad.stderr


def test_a_mistyped_command_is_answered_with_a_visible_one():
    out = plain_moat("prommote")
    assert out.returncode == 2
    assert "a similar subcommand exists: 'promote'" in out.stderr, out.stderr
    assert "_router" not in out.stderr and "_supervise" not in out.stderr, out.stderr
    out = plain_moat("_routr")
    assert out.returncode == 2 and "unrecognized subcommand '_routr'" in out.stderr
    assert "_router" not in out.stderr and "tip:" not in out.stderr, out.stderr
    out = plain_moat("sytem", "images")
    assert "'system'" in out.stderr, out.stderr


# the same from Python ----------------------------------------------------------

def test_python_has_clean_promote_system_and_deps_as_the_cli(m, tmp_path):
    import moat

    home = m.home
    unused = built_image(home, "py-unused")
    try:
        ws = m.workspace()
        m.run(ws, "true")
        [run] = m.runs()
        # `moat run` returns as soon as the exit code is known and the
        # supervisor removes the container after: wait for that, or the
        # two listings below could each see a different moment.
        m.wait_cleaned(run["id"])
        # system: the same objects as the CLI's --json.
        images = moat.system_images(home=home)
        assert by_tag(images, unused) is not None
        assert images == json.loads(m("system", "images", "--json", check=True).stdout)
        assert moat.system_containers(home=home) == json.loads(
            m("system", "containers", "--json", check=True).stdout)
        # promote: to a directory of the caller's.
        to = tmp_path / "kept"
        promoted = moat.promote(run["id"], to=to, home=home)
        assert promoted["dir"] == str(to) and (to / "promoted.json").is_file()
        with pytest.raises(moat.InvalidArgumentError):
            moat.promote("run_nosuchrun00", home=home)
        # clean: a dry run and keep_images remove nothing they should not.
        dry = moat.clean(home=home, dry_run=True)
        assert dry["runs"] == [run["id"]] and any(same_tag(i, unused) for i in dry["images"])
        assert (m.home / "runs" / run["id"]).is_dir() and image_exists(unused)
        kept = moat.clean(home=home, keep_images=True)
        assert kept["runs"] == [run["id"]] and kept["images"] == []
        assert image_exists(unused) and (to / "promoted.json").is_file()
        done = moat.clean(home=home)
        assert any(same_tag(i, unused) for i in done["images"]) and not image_exists(unused)
    finally:
        remove_images(unused)
    # deps: the CLI's list and info.
    assert moat.deps() == json.loads(plain_moat("deps", "list", "--json").stdout)
    assert moat.deps("python@3.11") == json.loads(
        plain_moat("deps", "info", "python@3.11", "--json").stdout)
    with pytest.raises(moat.InvalidArgumentError, match="python"):
        moat.deps("pyhton")
