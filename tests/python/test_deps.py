"""`dependencies:` end to end: several runtimes composed into one image that
moat builds on the first runtime's, reused at once by the next run, its tag a
hash of what goes into it, and failures that name the dependency at fault;
with the real `moat` binary and the real engine (MOAT_RUNTIME picks it).

No image comes from a public registry. Stand-ins for the official runtime
images are made from the local test image (moat-test:bookworm): a `node`
script in /usr/local/bin, a `python3` in /usr/local/bin with a library in
/usr/local/lib, a `go` in /usr/local/go/bin, laid out where the official
images keep them, and a stand-in `apt-get` in the node image (the tools'
installs never reach a Debian mirror). They are served by a registry of this
test's own, Debian's docker-registry, on a loopback port with TLS from a
test CA (the engine trusts it through its certs.d directory for that port,
removed afterwards), and MOAT_DEPS_REGISTRY points moat at it."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.request
import io

import pytest

from runhelp import ENGINE, IMAGE, LABEL, Moat, require_docker, sh

require_docker()

RUNTIMES = "dependencies: [node@20, python@3.11, go@1.22]\n"

NODE = "#!/bin/sh\necho v20.99.0-standin\n"
PYTHON = "#!/bin/sh\necho 'Python 3.11.99 (stand-in)'\n"
GO = "#!/bin/sh\necho 'go version go1.22.99 stand-in'\n"
# A stand-in for apt-get: records what it was asked, "installs" jq, and
# knows no ripgrep (as a mirror without the package would answer).
APT_GET = r"""#!/bin/sh
echo "apt-get $*" >> /var/log/standin-apt.log
case "$1" in
update) echo "Reading package lists... Done (stand-in)" ;;
install)
    for p in "$@"; do
        case "$p" in
        jq) printf '#!/bin/sh\necho jq-1.6-standin\n' > /usr/local/bin/jq
            chmod 755 /usr/local/bin/jq ;;
        ripgrep) echo "E: Unable to locate package ripgrep" >&2; exit 100 ;;
        esac
    done ;;
esac
"""


def tar_of(files: dict) -> bytes:
    """A tar of `path: text` (executable) and `path/` (a directory), or
    `path: ("link", target)`, for `ENGINE cp - CONTAINER:/`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path.strip("/"))
            info.mtime = int(time.time())
            if path.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o1777
                tar.addfile(info)
            elif isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                data = content.encode()
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


STANDINS = {
    "node:20-bookworm": {
        "/usr/local/bin/node": NODE,
        "/usr/local/lib/node_modules/npm/package.json": '{"name": "npm"}\n',
        "/usr/local/sbin/apt-get": APT_GET,
    },
    "python:3.11-bookworm": {
        "/usr/local/bin/python3.11": PYTHON,
        "/usr/local/bin/python3": ("link", "python3.11"),
        "/usr/local/lib/python3.11/os.py": "# stand-in\n",
    },
    "golang:1.22-bookworm": {
        "/usr/local/go/bin/go": GO,
        "/go/bin/": None,
    },
    # An image that says it is Go but has none where the official one has.
    "golang:1.23-bookworm": {
        "/opt/not-go": "#!/bin/sh\n",
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def certs_dir(host: str) -> str:
    """Where the engine looks for a registry's CA."""
    base = "/etc/containers/certs.d" if ENGINE == "podman" else "/etc/docker/certs.d"
    return os.path.join(base, host)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry on 127.0.0.1 with TLS from a test CA the engine trusts, and
    the stand-in runtime images pushed to it (and not kept locally, so that
    moat pulls them). Yields the prefix for MOAT_DEPS_REGISTRY."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is missing: run bash scripts/setup.sh "
                    "(it installs Debian's docker-registry package)")
    d = tmp_path_factory.mktemp("registry")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    ca_key, ca, key, csr, cert = (str(d / n) for n in
                                  ("ca.key", "ca.pem", "leaf.key", "leaf.csr", "leaf.pem"))
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=moat deps test ca")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", str(d / "ext.cnf"))
    port = free_port()
    host = f"127.0.0.1:{port}"
    (d / "data").mkdir()
    (d / "config.yml").write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {d / "data"}
http:
  addr: {host}
  secret: moat-deps-test
  tls:
    certificate: {cert}
    key: {key}
""")
    log = open(d / "registry.log", "w")
    server = subprocess.Popen([binary, "serve", str(d / "config.yml")], stdout=log,
                              stderr=subprocess.STDOUT)
    trust = certs_dir(host)
    os.makedirs(trust, exist_ok=True)
    shutil.copy(ca, os.path.join(trust, "ca.crt"))
    pushed = []
    try:
        context = ssl.create_default_context(cafile=ca)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"https://{host}/v2/", context=context, timeout=2)
                break
            except OSError as e:
                assert server.poll() is None, \
                    f"docker-registry exited: {(d / 'registry.log').read_text()}"
                assert time.time() < deadline, f"the registry does not answer at {host}: {e}"
                time.sleep(0.2)
        prefix = f"{host}/library"
        for name, files in STANDINS.items():
            made = sh(ENGINE, "create", IMAGE, "true", check=True).stdout.strip()
            try:
                cp = subprocess.run([ENGINE, "cp", "-", f"{made}:/"], input=tar_of(files),
                                    capture_output=True, timeout=60)
                assert cp.returncode == 0, cp.stderr
                ref = f"{prefix}/{name}"
                sh(ENGINE, "commit", made, ref, check=True, timeout=120)
            finally:
                sh(ENGINE, "rm", "-f", made)
            sh(ENGINE, "push", ref, check=True, timeout=300)
            sh(ENGINE, "rmi", ref, check=True)
            pushed.append(ref)
        yield prefix
    finally:
        for ref in pushed:
            sh(ENGINE, "rmi", "-f", ref)
        server.terminate()
        server.wait(timeout=10)
        log.close()
        shutil.rmtree(trust, ignore_errors=True)


@pytest.fixture
def m(tmp_path, registry):
    moat = Moat(tmp_path)
    moat.env["MOAT_DEPS_REGISTRY"] = registry
    yield moat
    moat.cleanup()
    # The images this home built, and the runtime images its runs pulled.
    built = sh(ENGINE, "images", "-q", "--filter", f"label=dev.moat.built={moat.home}").stdout
    for image in set(built.split()):
        sh(ENGINE, "rmi", "-f", image)
    for name in STANDINS:
        sh(ENGINE, "rmi", f"{registry}/{name}")


def config(m, ws, env=None):
    out = m("config", ws, "--json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def image_id(ref):
    out = sh(ENGINE, "image", "inspect", "--format", "{{.Id}}", ref)
    return out.stdout.strip() if out.returncode == 0 else None


SHOW = ("node --version; python3 --version; go version; echo GOPATH=$GOPATH; "
        "test -f /usr/local/lib/python3.11/os.py && echo python-lib; "
        "test -f /usr/local/lib/node_modules/npm/package.json && echo node-modules; "
        "test -d /go/bin && echo gopath-bin")


def test_three_runtimes_make_one_image_built_once_and_reused(m, registry):
    ws = m.workspace(agent_yaml=RUNTIMES)
    tag = config(m, ws)["image"]
    assert tag.startswith("moat-deps:") and len(tag) == len("moat-deps:") + 16, tag

    t = time.time()
    first = m("run", ws, "--", "sh", "-c", SHOW, timeout=600)
    took = time.time() - t
    assert first.returncode == 0, first.stdout + first.stderr
    for line in ("v20.99.0-standin", "Python 3.11.99 (stand-in)", "go version go1.22.99 stand-in",
                 "GOPATH=/go", "python-lib", "node-modules", "gopath-bin"):
        assert line in first.stdout.splitlines(), f"{line!r} not in:\n{first.stdout}"
    # Progress: the pulls, the copies, each runtime's check, the image.
    for said in (f"Building image {tag} for dependencies node@20, python@3.11, go@1.22",
                 f"Pulling image {registry}/python:3.11-bookworm for python@3.11",
                 f"Copying python@3.11 from {registry}/python:3.11-bookworm",
                 f"Copying go@1.22 from {registry}/golang:1.22-bookworm",
                 "python@3.11: Python 3.11.99 (stand-in)",
                 f"Built image {tag}"):
        assert said in first.stderr, f"{said!r} not in:\n{first.stderr}"
    built = image_id(tag)
    assert built, f"no image {tag} after the run"
    labels = json.loads(sh(ENGINE, "image", "inspect", "--format", "{{json .Config.Labels}}",
                           tag, check=True).stdout)
    assert labels["dev.moat.deps"] == "node@20 python@3.11 go@1.22"
    assert labels["dev.moat.built"] == str(m.home)
    assert m.latest()["image"] == tag
    # Nothing of the build is left: no container of it, none of its run
    # (once the supervisor has cleaned up: `moat run` returns as soon as the
    # exit code is known, and cleanup follows).
    run_id = m.latest()["id"]
    m.wait_cleaned(run_id)
    left = sh(ENGINE, "ps", "-a", "-q", "--filter", f"label={LABEL}={run_id}").stdout
    assert left.split() == []

    t = time.time()
    second = m("run", ws, "--", "sh", "-c", SHOW, timeout=120)
    again = time.time() - t
    assert second.returncode == 0, second.stdout + second.stderr
    assert "v20.99.0-standin" in second.stdout
    assert "Building" not in second.stderr and "Pulling" not in second.stderr, second.stderr
    assert image_id(tag) == built, "the image was built again"
    assert again < took, f"the second run ({again:.1f} s) was not faster than the first ({took:.1f} s)"


def test_the_tag_is_a_hash_of_what_goes_into_the_image(m, registry):
    ws = m.workspace(agent_yaml=RUNTIMES)
    tag = config(m, ws)["image"]
    assert config(m, ws)["image"] == tag, "the same dependencies, the same tag"
    others = {}
    for deps in ("[node@20, python@3.12, go@1.22]", "[python@3.11, node@20, go@1.22]",
                 "[node@20, python@3.11]", "[node@20, python@3.11, go@1.22, jq]"):
        (ws / "agent.yaml").write_text(f"dependencies: {deps}\n")
        others[deps] = config(m, ws)["image"]
    (ws / "agent.yaml").write_text(RUNTIMES)
    others["another registry"] = config(m, ws, env={"MOAT_DEPS_REGISTRY": "mirror.test/x"})["image"]
    assert all(o.startswith("moat-deps:") for o in others.values()), others
    assert tag not in others.values() and len(set(others.values())) == len(others), others

    # One runtime alone is its image, as it is: nothing to build.
    (ws / "agent.yaml").write_text("dependencies: [python@3.11]\n")
    assert config(m, ws)["image"] == f"{registry}/python:3.11-bookworm"
    out = m("run", ws, "--", "python3", "--version", timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Python 3.11.99 (stand-in)"
    assert "Building" not in out.stderr, out.stderr

    # Another list is another image, built beside the first.
    (ws / "agent.yaml").write_text("dependencies: [node@20, python@3.11]\n")
    two = config(m, ws)["image"]
    out = m("run", ws, "--", "sh", "-c", "node --version; python3 --version", timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"Built image {two}" in out.stderr
    assert out.stdout.split("\n")[:2] == ["v20.99.0-standin", "Python 3.11.99 (stand-in)"]


def test_tools_are_installed_only_when_the_base_lacks_them(m):
    ws = m.workspace(agent_yaml="dependencies: [node@20, git, jq]\n")
    out = m("run", ws, "--", "sh", "-c", "jq --version; git --version; cat /var/log/standin-apt.log",
            timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "jq-1.6-standin", out.stdout
    assert lines[1].startswith("git version"), out.stdout
    # git is in the base already: only jq was installed.
    assert lines[2:] == ["apt-get update",
                         "apt-get install -y --no-install-recommends jq",
                         "apt-get clean"], out.stdout
    assert "Installing jq (apt-get install jq)" in out.stderr, out.stderr
    assert "Installing git" not in out.stderr, out.stderr
    assert "jq: jq-1.6-standin" in out.stderr, out.stderr


def failed(out, *needles):
    assert out.returncode != 0, out.stdout + out.stderr
    for needle in needles:
        assert needle in out.stderr, f"{needle!r} not in:\n{out.stderr}"


def nothing_left(m, tag):
    assert image_id(tag) is None, f"{tag} was made"
    for run in m.runs():
        left = sh(ENGINE, "ps", "-a", "-q", "--filter", f"label={LABEL}={run['id']}").stdout
        assert left.split() == [], f"containers of {run['id']} are left"


def test_a_dependency_that_cannot_be_had_is_named(m, registry):
    # Unknown: refused before anything starts, at its line and column.
    ws = m.workspace(agent_yaml="dependencies:\n  - node@20\n  - nodejs@20\n")
    out = m("run", ws, "--", "true")
    failed(out, "agent.yaml:3:5: unknown dependency \"nodejs\" (did you mean \"node\"?)")
    assert m.runs() == []

    # A version the registry does not have.
    (ws / "agent.yaml").write_text("dependencies: [node@20, python@3.99]\n")
    tag = config(m, ws)["image"]
    out = m("run", ws, "--", "true", timeout=300)
    failed(out, f"dependencies: python@3.99: cannot pull {registry}/python:3.99-bookworm",
           "moat deps info python", "MOAT_DEPS_REGISTRY")
    nothing_left(m, tag)

    # An image without the runtime where the official image keeps it.
    (ws / "agent.yaml").write_text("dependencies: [node@20, go@1.23]\n")
    tag = config(m, ws)["image"]
    out = m("run", ws, "--", "true", timeout=300)
    failed(out, f"dependencies: go@1.23: {registry}/golang:1.23-bookworm has no /usr/local/go")
    nothing_left(m, tag)

    # A tool the mirror does not have.
    (ws / "agent.yaml").write_text("dependencies: [node@20, ripgrep]\n")
    tag = config(m, ws)["image"]
    out = m("run", ws, "--", "true", timeout=300)
    failed(out, "dependencies: ripgrep: apt-get install ripgrep failed in the build container "
                "(exit 100): ", "E: Unable to locate package ripgrep")
    nothing_left(m, tag)


def test_deps_list_and_info(m, registry):
    out = m("deps", "list", "--json", check=True)
    known = {d["name"]: d for d in json.loads(out.stdout)}
    assert {"node", "python", "go", "git", "ripgrep"} <= set(known)
    assert known["go"]["image"] == f"{registry}/golang:VERSION-bookworm"
    assert known["ripgrep"]["kind"] == "tool" and known["ripgrep"]["packages"] == ["ripgrep"]
    text = m("deps", "list", check=True).stdout
    assert text.splitlines()[0].split()[:3] == ["NAME", "KIND", "VERSIONS"]
    info = json.loads(m("deps", "info", "python@3.11", "--json", check=True).stdout)
    assert info["image"] == f"{registry}/python:3.11-bookworm"
    assert info["copies"] == ["/usr/local/bin", "/usr/local/lib"]
    assert "golang:1.22-bookworm" in m("deps", "info", "go@1.22", check=True).stdout
    bad = m("deps", "info", "pyhton")
    assert bad.returncode != 0 and "did you mean \"python\"" in bad.stderr, bad.stderr
