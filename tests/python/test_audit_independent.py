"""moat's audit log checked by an independent verifier (audit_verifier.py),
written only from docs/audit-format.md.

Logs are produced by a real moat.Proxy forwarding plain http:// requests to a
local HTTP server; every host name is mapped to 127.0.0.1 through the proxy's
resolve option and the client speaks to the proxy's loopback address directly
(http.client), so no traffic leaves loopback.
"""

import base64
import hashlib
import http.client
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse

import pytest

import moat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import audit_verifier as av  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOAT_BIN = ROOT / "target" / "debug" / "moat"
HOSTS = ("api.github.com", "example.test")


# ---------------------------------------------------------------------------
# producing logs with moat
# ---------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class LocalHTTP:
    def __init__(self):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def resolve(self):
        return {f"{h}:{p}": f"127.0.0.1:{self.port}" for h in HOSTS for p in (80, 443)}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _send(proxy, url):
    """GET `url` through the proxy: an absolute-form request sent to the
    proxy's own loopback address (what urllib's ProxyHandler does, minus any
    chance of bypassing the proxy)."""
    p = urllib.parse.urlsplit(proxy.url)
    assert p.hostname == "127.0.0.1"
    auth = base64.b64encode(f"{urllib.parse.unquote(p.username)}:"
                            f"{urllib.parse.unquote(p.password)}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=20)
    try:
        conn.request("GET", url, headers={"Proxy-Authorization": f"Basic {auth}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def make_log(base, runs=(24,)):
    """Run a proxy once per element of `runs` on the same audit dir, sending
    that many requests each time. Returns (home, logdir)."""
    base = pathlib.Path(base)
    home, log = base / "home", base / "log"
    server = LocalHTTP()
    try:
        for r, count in enumerate(runs):
            cred = moat.Credential(host="api.github.com", header="Authorization",
                                   value="Bearer T0KEN")
            proxy = moat.Proxy(credentials=[cred], home=home, audit_dir=log,
                               resolve=server.resolve())
            try:
                for i in range(count):
                    host = HOSTS[i % 2]
                    assert _send(proxy, f"http://{host}/run{r}/req{i}") == 200
            finally:
                proxy.close()  # writes the final signed checkpoint
    finally:
        server.close()
    return home, log


def cli(args, home):
    env = {**os.environ, "MOAT_HOME": str(home)}
    return subprocess.run([str(MOAT_BIN), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def cli_report(log, home, *extra):
    out = cli(["audit", str(log), "--json", *extra], home)
    report = json.loads(out.stdout)
    assert (out.returncode == 0) == report["ok"], (out.returncode, out.stderr)
    return report


def moat_verify(log, home, key=None):
    """moat's verdict: (report or None, error message or None)."""
    try:
        audit = moat.AuditLog(str(log), home=str(home))
        return (audit.verify(key) if key is not None else audit.verify()), None
    except moat.ConfigError as e:
        return None, str(e)


_ENTRY_RE = re.compile(r"\bentry (\d+) \(line (\d+)\)")


def moat_first_bad(message):
    """The entry moat names as first bad ("entry N (line N+1)"), or None."""
    m = _ENTRY_RE.search(message or "")
    if not m:
        return None
    assert int(m.group(2)) == int(m.group(1)) + 1
    return int(m.group(1))


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    base = tmp_path_factory.mktemp("moatlog")
    home, log = make_log(base, runs=(24,))
    report, err = moat_verify(log, home)
    assert err is None, err
    return {"home": home, "log": log, "report": report, "vkey": report["vkey"]}


@pytest.fixture(scope="module")
def produced_reopened(tmp_path_factory):
    """The same audit dir written by three proxy runs: three checkpoints."""
    base = tmp_path_factory.mktemp("moatlog3")
    home, log = make_log(base, runs=(5, 3, 9))
    report, err = moat_verify(log, home)
    assert err is None, err
    return {"home": home, "log": log, "report": report, "vkey": report["vkey"]}


@pytest.fixture
def copy(produced, tmp_path):
    """A fresh copy of the produced log to tamper with."""
    def make(name="log"):
        dst = tmp_path / name
        shutil.copytree(produced["log"], dst)
        return dst
    return make


def read_lines(log):
    data = (log / "audit.jsonl").read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def write_lines(log, lines, tail=b""):
    (log / "audit.jsonl").write_bytes(b"".join(x + b"\n" for x in lines) + tail)


def other_vkey():
    """A valid verifier key for a key moat did not use (RFC 8032 test 1)."""
    pub = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    return av.format_vkey(pub)


# ---------------------------------------------------------------------------
# the verifier's building blocks (independent of moat)
# ---------------------------------------------------------------------------

RFC8032 = [  # (public key, message, signature), RFC 8032 §7.1 tests 1-3
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


@pytest.mark.parametrize("pub,msg,sig", RFC8032)
def test_ed25519_rfc8032_vectors(pub, msg, sig):
    pub, msg, sig = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
    assert av.ed25519_verify(pub, msg, sig)
    assert not av.ed25519_verify(pub, msg + b"x", sig)
    bad = bytearray(sig)
    bad[10] ^= 1
    assert not av.ed25519_verify(pub, msg, bytes(bad))
    # s >= L is rejected (malleability)
    s = int.from_bytes(sig[32:], "little") + av._Q
    if s < 2 ** 256:
        assert not av.ed25519_verify(pub, msg, sig[:32] + s.to_bytes(32, "little"))


def test_rfc6962_roots():
    # the certificate-transparency reference test leaves and roots
    leaves = [bytes.fromhex(x) for x in ["", "00", "10", "2021", "3031", "40414243",
                                         "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f"]]
    roots = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
             "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
             "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
             "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
             "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
             "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
    assert av.mth([]) == hashlib.sha256(b"").digest()
    for n, root in enumerate(roots, 1):
        assert av.mth(leaves[:n]).hex() == root


def test_rfc9162_proofs_round_trip():
    lines = [b"leaf %d" % i for i in range(23)]
    for n in range(1, len(lines) + 1):
        root = av.mth(lines[:n])
        for i in range(n):
            path = av.inclusion_path(i, lines[:n])
            assert av.verify_inclusion(i, n, av.leaf_hash(lines[i]), path, root)
            assert not av.verify_inclusion(i, n, av.leaf_hash(b"other"), path, root)
            if path:
                assert not av.verify_inclusion(i, n, av.leaf_hash(lines[i]), path[:-1], root)
                assert not av.verify_inclusion(i, n, av.leaf_hash(lines[i]),
                                               path + [root], root)
        for m in range(0, n + 1):
            old = av.mth(lines[:m])
            proof = av.consistency_proof(m, lines[:n])
            assert av.verify_consistency(m, n, old, root, proof), (m, n)
            if 0 < m < n:
                assert not av.verify_consistency(m, n, av.mth([b"x"]), root, proof)
                assert not av.verify_consistency(m, n, old, root, proof[:-1])
                bad = list(proof)
                bad[0] = hashlib.sha256(bad[0]).digest()
                assert not av.verify_consistency(m, n, old, root, bad)


def test_canonical_json():
    assert av.canonical_json({"b": 1, "a": [True, False, None, "x"]}) == \
        b'{"a":[true,false,null,"x"],"b":1}'
    # sorted by UTF-16 code units: U+1F600 (D83D DE00) before U+FFFF
    assert av.canonical_json({"\uffff": 1, "\U0001F600": 2}) == \
        '{"\U0001F600":2,"\uffff":1}'.encode()
    assert av.canonical_json("\"\\\b\t\n\f\r\x01\x1f\x7f\u2028é") == \
        '"\\"\\\\\\b\\t\\n\\f\\r\\u0001\\u001f\x7f\u2028é"'.encode()
    assert av.is_canonical(b'{"a":-5,"b":"\\u001f"}')
    for bad in [b'{"b":1,"a":2}', b'{"a": 1}', b'{"a":1.0}', b'{"a":"\\u001F"}',
                b'{"a":"\\/"}', b'{"a":"\\u00e9"}', b'{"a":1,"a":1}', b'{"a":NaN}',
                b'{"a":01}', b'{"a":1e2}', b'\xff']:
        assert not av.is_canonical(bad), bad


def test_vkey_parsing():
    vk = other_vkey()
    name, h, pub = av.parse_vkey(vk)
    assert name == "moat" and len(h) == 4 and len(pub) == 32
    with pytest.raises(av.VerifyError):  # key hash does not match the key
        av.parse_vkey(vk.replace(vk.split("+")[1], "00000000"))
    with pytest.raises(av.VerifyError):
        av.parse_vkey("moat+12345678")


# ---------------------------------------------------------------------------
# (1) moat's log is accepted, and the verdicts agree
# ---------------------------------------------------------------------------

def test_verifier_accepts_moats_log(produced):
    log, home, vkey, report = produced["log"], produced["home"], produced["vkey"], produced["report"]
    mine = av.verify_log(log, vkey)
    assert mine["ok"], mine["problems"]
    assert mine["first_bad"] is None and mine["torn_tail"] is None
    assert mine["entries"] >= 24  # at least one entry per request
    assert mine["entries"] == report["entries"]
    assert mine["root"] == report["root"]
    # the proxy's close wrote a checkpoint covering the whole log
    assert mine["covered"] == mine["entries"]
    assert all(c["ok"] for c in mine["checkpoints"])
    assert mine["checkpoints"][-1]["root"] == report["root"]
    # the CLI agrees as well, and prints the same verifier key
    rep = cli_report(log, home)
    assert rep["ok"] and rep["vkey"] == vkey
    assert rep["entries"] == mine["entries"] and rep["root"] == mine["root"]
    # the key hash in the vkey is the one the document defines
    name, h, pub = av.parse_vkey(vkey)
    assert name == "moat"
    assert h == hashlib.sha256(b"moat\n\x01" + pub).digest()[:4]


def test_every_line_is_what_the_document_says(produced):
    lines = read_lines(produced["log"])
    prev = "0" * 64
    for i, line in enumerate(lines):
        obj = json.loads(line)
        assert set(obj) == {"seq", "time", "type", "prev", "data"}
        assert obj["seq"] == i and obj["prev"] == prev
        assert av.canonical_json(obj) == line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", obj["time"])
        assert isinstance(obj["type"], str) and isinstance(obj["data"], dict)
        assert "T0KEN" not in line.decode()  # never a secret value
        prev = hashlib.sha256(line).hexdigest()
    types = {json.loads(x)["type"] for x in lines}
    assert "policy_decision" in types


def test_checkpoint_notes_follow_the_document(produced):
    vkey = produced["vkey"]
    _, h, pub = av.parse_vkey(vkey)
    raw = (produced["log"] / "checkpoints.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    for line in raw[:-1].split(b"\n"):
        note = json.loads(line)["note"]
        body, sigs = av.parse_note(note)
        assert [(n, k) for n, k, _ in sigs] == [("moat", h)]
        assert note == body + "\n\u2014 moat " + base64.b64encode(h + sigs[0][2]).decode() + "\n"
        cp = av.parse_checkpoint(body)
        assert av.ed25519_verify(pub, body.encode(), sigs[0][2])
        # a changed body no longer verifies
        forged = note.replace("\n%d\n" % cp["size"], "\n%d\n" % (cp["size"] + 1), 1)
        with pytest.raises(av.VerifyError):
            av.verify_note(forged, vkey)


def test_multiple_runs_and_checkpoints(produced_reopened):
    p = produced_reopened
    mine = av.verify_log(p["log"], p["vkey"])
    assert mine["ok"], mine["problems"]
    assert mine["entries"] == p["report"]["entries"] and mine["root"] == p["report"]["root"]
    sizes = [c["size"] for c in mine["checkpoints"]]
    assert len(sizes) >= 3 and sizes == sorted(sizes) and sizes[-1] == mine["entries"]


def test_periodic_checkpoints_in_a_long_log(tmp_path):
    """More than 1000 entries: the document says a checkpoint is written
    every 1000 entries while the log grows."""
    home, log = make_log(tmp_path, runs=(600,))
    report, err = moat_verify(log, home)
    assert err is None, err
    mine = av.verify_log(log, report["vkey"])
    assert mine["ok"], mine["problems"]
    assert mine["entries"] == report["entries"] > 1000
    assert mine["root"] == report["root"]
    sizes = [c["size"] for c in mine["checkpoints"]]
    assert len(sizes) >= 2 and sizes[-1] == mine["entries"]
    # A checkpoint while the log grew. (moat writes it at roughly, not
    # exactly, every 1000 entries, see the report; only require one.)
    assert any(1000 <= s < mine["entries"] for s in sizes[:-1]), sizes
    bundle = tmp_path / "b.json"
    moat.AuditLog(str(log), home=str(home)).export(str(bundle))
    res = av.verify_bundle(bundle, report["vkey"])
    assert res["ok"], res["problems"]
    assert json.loads(bundle.read_text())["consistency"]


# ---------------------------------------------------------------------------
# (2) moat's bundle is accepted
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cli", "python"])
@pytest.mark.parametrize("which", ["produced", "produced_reopened"])
def test_verifier_accepts_moats_bundle(which, how, request, tmp_path):
    p = request.getfixturevalue(which)
    bundle = tmp_path / "proof.json"
    if how == "cli":
        out = cli(["audit", str(p["log"]), "--export", str(bundle)], p["home"])
        assert out.returncode == 0, out.stderr
    else:
        moat.AuditLog(str(p["log"]), home=str(p["home"])).export(str(bundle))
    b = json.loads(bundle.read_text())
    assert b["format"] == "moat-audit-bundle/1" and b["vkey"] == p["vkey"]
    assert b["entries"] == [x.decode() for x in read_lines(p["log"])]
    trusted = av.verify_bundle(bundle, p["vkey"])
    assert trusted["ok"], trusted["problems"]
    assert not trusted["self_keyed"]
    assert trusted["entries"] == p["report"]["entries"]
    assert trusted["root"] == p["report"]["root"]
    own = av.verify_bundle(bundle)
    assert own["ok"] and own["self_keyed"]
    if which == "produced_reopened":
        assert len(b["checkpoints"]) >= 3 and b["consistency"]


def _tamper_bundle(src, dst, fn):
    b = json.loads(src.read_text())
    fn(b)
    dst.write_text(json.dumps(b))
    return dst


def _flip_hex(h):
    return ("0" if h[0] != "0" else "1") + h[1:]


def test_tampered_bundles_are_rejected(produced_reopened, tmp_path):
    p = produced_reopened
    src = tmp_path / "proof.json"
    moat.AuditLog(str(p["log"]), home=str(p["home"])).export(str(src))
    vkey = p["vkey"]
    n = len(json.loads(src.read_text())["entries"])

    def change_entry(b):
        b["entries"][n // 2] = b["entries"][n // 2].replace('"seq":', '"seq": ', 1)

    def change_time(b):
        e = b["entries"][-1]
        i = e.index('Z"')
        b["entries"][-1] = e[:i - 1] + ("1" if e[i - 1] != "1" else "2") + e[i:]

    def drop_last_entry(b):
        b["entries"].pop()
        b["inclusion"].pop()

    def bad_inclusion(b):
        b["inclusion"][1]["proof"][0] = _flip_hex(b["inclusion"][1]["proof"][0])

    def missing_inclusion(b):
        b["inclusion"].pop(0)

    def bad_consistency(b):
        # A reopened log has a trivial (empty) proof between its final and
        # its reopening checkpoint, of one size: change a real one.
        [first, *_] = [c for c in b["consistency"] if c["proof"]]
        first["proof"][-1] = _flip_hex(first["proof"][-1])

    def forged_checkpoint(b):
        b["checkpoints"][0] = b["checkpoints"][0].replace("\n", "\n1", 1)

    def wrong_format(b):
        b["format"] = "moat-audit-bundle/2"

    for k, fn in enumerate([change_entry, change_time, drop_last_entry, bad_inclusion,
                            missing_inclusion, bad_consistency, forged_checkpoint,
                            wrong_format]):
        res = av.verify_bundle(_tamper_bundle(src, tmp_path / f"t{k}.json", fn), vkey)
        assert not res["ok"], fn.__name__
    # the untouched bundle, re-serialized, is still fine
    assert av.verify_bundle(_tamper_bundle(src, tmp_path / "same.json", lambda b: None), vkey)["ok"]


# ---------------------------------------------------------------------------
# (3) tampering: rejected by both, and the same first bad entry
# ---------------------------------------------------------------------------

def _change_time_digit(line):
    """Change one byte (a digit of the time) keeping the line canonical."""
    s = line.decode()
    i = s.index('Z","type"') - 1
    return (s[:i] + ("1" if s[i] != "1" else "2") + s[i + 1:]).encode()


def _check_both_reject(log, home, vkey):
    mine = av.verify_log(log, vkey)
    theirs, err = moat_verify(log, home)
    assert not mine["ok"], "independent verifier accepted a tampered log"
    assert theirs is None and err, f"moat accepted a tampered log: {theirs}"
    rep = cli_report(log, home)
    assert not rep["ok"]
    return mine, err, rep


def test_changed_byte_in_an_entry(produced, copy):
    """A changed (still canonical) line k: the document's step 2 says the
    first line that fails is the first bad entry, and a changed line is caught
    by the next line's prev, so both must name k+1."""
    log = copy()
    lines = read_lines(log)
    k = len(lines) // 2
    lines[k] = _change_time_digit(lines[k])
    assert av.is_canonical(lines[k])
    write_lines(log, lines)
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert mine["first_bad"] == k + 1
    assert moat_first_bad(err) == k + 1, err
    assert moat_first_bad(rep["problems"][0]) == k + 1


def test_non_canonical_byte_in_an_entry(produced, copy):
    """A change that breaks line k's canonical form: line k itself fails."""
    log = copy()
    lines = read_lines(log)
    k = len(lines) // 3
    lines[k] = lines[k].replace(b'"seq":', b'"seq": ', 1)
    write_lines(log, lines)
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert mine["first_bad"] == k
    assert moat_first_bad(err) == k, err


def test_changed_byte_in_the_last_entry(produced, copy):
    """The last line is caught by the checkpoint only. The document does not
    say which entry either side must name (see the report); both reject."""
    log = copy()
    lines = read_lines(log)
    lines[-1] = _change_time_digit(lines[-1])
    write_lines(log, lines)
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert mine["first_bad"] == len(lines) - 1
    assert any("checkpoint" in p for p in mine["problems"])
    assert "checkpoint" in err


@pytest.mark.parametrize("where", ["first", "middle"])
def test_deleted_entry(produced, copy, where):
    log = copy()
    lines = read_lines(log)
    k = 0 if where == "first" else len(lines) // 2
    del lines[k]
    write_lines(log, lines)
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert mine["first_bad"] == k  # seq k+1 where k belongs
    assert moat_first_bad(err) == k, err
    assert moat_first_bad(rep["problems"][0]) == k


def test_swapped_entries(produced, copy):
    log = copy()
    lines = read_lines(log)
    k = len(lines) // 2
    lines[k], lines[k + 1] = lines[k + 1], lines[k]
    write_lines(log, lines)
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert mine["first_bad"] == k
    assert moat_first_bad(err) == k, err
    assert moat_first_bad(rep["problems"][0]) == k


@pytest.mark.parametrize("cut", [1, 5])
def test_tail_cut_below_the_checkpoint(produced, copy, cut):
    """The document says only that the log was cut (step 3); it names no
    first bad entry, so only the verdicts are compared."""
    log = copy()
    lines = read_lines(log)
    write_lines(log, lines[:-cut])
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert any("cut" in p for p in mine["problems"])
    assert "cut" in err
    assert mine["entries"] == len(lines) - cut


def _swap_in(log, older):
    shutil.rmtree(log)
    shutil.copytree(older, log)


def test_older_copy_after_a_checkpoint_is_caught_by_moats_witness(tmp_path):
    """The document: moat keeps the latest checkpoint of each log in
    $MOAT_HOME/audit/witness/ "so that replacing a log with an older copy of
    itself is detected". An older copy holding an older checkpoint. (The
    independent verifier cannot check this: the witness format is not
    specified, and the older copy is a genuine, consistent log.)"""
    home, log = make_log(tmp_path / "a", runs=(4,))
    older = tmp_path / "older"
    shutil.copytree(log, older)
    make_log(tmp_path / "a", runs=(4,))  # the same log grows, a new checkpoint
    report, err = moat_verify(log, home)
    assert err is None, err
    _swap_in(log, older)
    assert av.verify_log(log, report["vkey"])["ok"]  # genuine, just older
    theirs, err = moat_verify(log, home)
    assert theirs is None and err, "moat did not detect the older copy"


def test_older_copy_before_the_first_checkpoint_is_caught_by_moats_witness(tmp_path):
    """The same, with the older copy taken while the proxy was still running
    (before its first checkpoint: checkpoints.jsonl is empty). The document's
    promise covers it; see the report if this fails."""
    base = tmp_path / "a"
    home, log = base / "home", base / "log"
    server = LocalHTTP()
    try:
        proxy = moat.Proxy(home=home, audit_dir=log, resolve=server.resolve())
        try:
            for i in range(6):
                assert _send(proxy, f"http://example.test/early{i}") == 200
            older = tmp_path / "older"
            shutil.copytree(log, older)
            for i in range(6):
                assert _send(proxy, f"http://example.test/late{i}") == 200
        finally:
            proxy.close()
    finally:
        server.close()
    report, err = moat_verify(log, home)
    assert err is None, err
    _swap_in(log, older)
    mine = av.verify_log(log, report["vkey"])
    assert mine["ok"] and mine["covered"] == 0  # nothing signed to check against
    theirs, err = moat_verify(log, home)
    assert theirs is None and err, (
        "moat accepted an older copy of the log (taken before its first "
        f"checkpoint) in place of the log: {theirs}")


def test_two_logs_in_one_home_both_verify(tmp_path):
    """The document: moat keeps the latest checkpoint "of each log". Two
    separate, untouched logs written with one $MOAT_HOME (same default
    client name) must both verify."""
    server = LocalHTTP()
    home = tmp_path / "home"
    try:
        for name, count in (("log1", 5), ("log2", 2)):
            proxy = moat.Proxy(home=home, audit_dir=tmp_path / name, resolve=server.resolve())
            try:
                for i in range(count):
                    assert _send(proxy, f"http://example.test/{name}/{i}") == 200
            finally:
                proxy.close()
    finally:
        server.close()
    for name in ("log1", "log2"):
        theirs, err = moat_verify(tmp_path / name, home)
        assert err is None, f"moat rejected the untouched {name}: {err}"
        assert av.verify_log(tmp_path / name, theirs["vkey"])["ok"]


def test_tampered_checkpoint(produced, copy):
    log = copy()
    path = log / "checkpoints.jsonl"
    objs = [json.loads(x) for x in path.read_bytes()[:-1].split(b"\n")]
    note = objs[-1]["note"]
    body, sigs = av.parse_note(note)
    cp = av.parse_checkpoint(body)
    objs[-1]["note"] = note.replace(base64.b64encode(cp["root"]).decode(),
                                    base64.b64encode(bytes(32)).decode())
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))
    _check_both_reject(log, produced["home"], produced["vkey"])


# ---------------------------------------------------------------------------
# (4) a torn tail
# ---------------------------------------------------------------------------

def test_torn_tail(produced, copy):
    log = copy()
    lines = read_lines(log)
    half = lines[-1][: len(lines[-1]) // 2]
    write_lines(log, lines, tail=half)
    mine = av.verify_log(log, produced["vkey"])
    assert mine["ok"], mine["problems"]
    assert mine["torn_tail"] is not None and mine["torn_tail"]["length"] == len(half)
    assert mine["entries"] == len(lines) and mine["root"] == produced["report"]["root"]
    theirs, err = moat_verify(log, produced["home"])
    assert err is None, err
    assert theirs["torn_tail"] is not None
    assert theirs["entries"] == len(lines) and theirs["root"] == produced["report"]["root"]
    rep = cli_report(log, produced["home"])
    assert rep["ok"] and rep["torn_tail"] is not None


def test_torn_tail_in_checkpoints(produced, copy):
    """The document: "A file whose last line does not end in \\n has a torn
    tail", applied to checkpoints.jsonl too. The document does not say moat
    must report this one (see the report), so only moat's verdict is checked."""
    log = copy()
    with open(log / "checkpoints.jsonl", "ab") as f:
        f.write(b'{"note":"moat/cli')
    mine = av.verify_log(log, produced["vkey"])
    assert mine["ok"], mine["problems"]
    assert mine["checkpoints_torn_tail"] is not None and mine["covered"] == mine["entries"]
    theirs, err = moat_verify(log, produced["home"])
    assert err is None, err


# ---------------------------------------------------------------------------
# (5) a wrong verifier key
# ---------------------------------------------------------------------------

def test_wrong_vkey_rejects_the_checkpoints(produced, tmp_path):
    wrong = other_vkey()
    assert wrong != produced["vkey"]
    mine = av.verify_log(produced["log"], wrong)
    assert not mine["ok"]
    assert mine["covered"] == 0
    assert mine["checkpoints"] and not any(c["ok"] for c in mine["checkpoints"])
    assert all("checkpoint" in p for p in mine["problems"])
    # the entries themselves are fine: nothing is named as a bad entry
    assert mine["first_bad"] is None
    # a key with the right name and hash but another key cannot be written:
    # the hash is checked against the key
    name, h, pub = av.parse_vkey(produced["vkey"])
    forged = "moat+%s+%s" % (h.hex(), base64.b64encode(b"\x01" + bytes.fromhex(
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")).decode())
    assert not av.verify_log(produced["log"], forged)["ok"]
    # the bundle too
    bundle = tmp_path / "proof.json"
    moat.AuditLog(str(produced["log"]), home=str(produced["home"])).export(str(bundle))
    res = av.verify_bundle(bundle, wrong)
    assert not res["ok"]
    # and moat itself, given the wrong key
    theirs, err = moat_verify(produced["log"], produced["home"], key=wrong)
    assert theirs is None and err
    assert not cli_report(produced["log"], produced["home"], "--key", wrong)["ok"]


def test_a_key_from_another_moat_home(produced, tmp_path):
    """A real moat key, but another home's: rejected."""
    home, log = make_log(tmp_path, runs=(2,))
    other, err = moat_verify(log, home)
    assert err is None
    assert other["vkey"] != produced["vkey"]
    assert not av.verify_log(produced["log"], other["vkey"])["ok"]
    assert av.verify_log(log, other["vkey"])["ok"]


def test_closed_log_and_an_entry_forged_after_its_final_checkpoint(produced, copy):
    """Step 5: a closed log (its last checkpoint final) takes no more
    entries. One forged after the close, chained and canonical as a writer
    would make it, is rejected by both verifiers; the clean log is closed."""
    mine = av.verify_log(produced["log"], produced["vkey"])
    assert mine["closed"] and mine["unsigned"] == 0
    assert mine["checkpoints"][-1]["final"]
    log = copy()
    lines = read_lines(log)
    forged = {"seq": len(lines), "time": "2026-11-29T00:00:00Z", "type": "request",
              "prev": hashlib.sha256(lines[-1]).hexdigest(),
              "data": {"host": "evil.example", "method": "GET"}}
    lines.append(av.canonical_json(forged))
    write_lines(log, lines)
    mine, err, rep = _check_both_reject(log, produced["home"], produced["vkey"])
    assert "added after the close" in " ".join(mine["problems"])
    assert "added after the close" in err


def test_reopened_log_is_not_taken_for_a_forgery(produced_reopened):
    p = produced_reopened
    mine = av.verify_log(p["log"], p["vkey"])
    assert mine["ok"] and mine["closed"], mine["problems"]
    finals = [c["final"] for c in mine["checkpoints"]]
    # each run closed its own part; each reopening signed a plain one first
    assert finals[-1] and finals.count(True) == 3 and finals.count(False) >= 2


def test_a_copied_checkpoint_cannot_make_a_closed_log_look_open(produced_reopened, tmp_path):
    """Step 5: after a forged entry, appending a copy of an earlier signed
    checkpoint would make the log look open; the order of the checkpoints
    gives it away, to both verifiers, with no witness (another home)."""
    p = produced_reopened
    log = tmp_path / "log"
    shutil.copytree(p["log"], log)
    lines = read_lines(log)
    forged = {"seq": len(lines), "time": "2026-11-29T00:00:00Z", "type": "request",
              "prev": hashlib.sha256(lines[-1]).hexdigest(), "data": {"host": "evil.example"}}
    write_lines(log, lines + [av.canonical_json(forged)])
    cps = (log / "checkpoints.jsonl").read_bytes().splitlines()
    reopen = [c for c in cps if "\nreopened\n" in json.loads(c)["note"]]
    assert reopen, "a reopened log has a reopened checkpoint"
    (log / "checkpoints.jsonl").write_bytes(b"\n".join(cps + [reopen[0]]) + b"\n")
    mine = av.verify_log(log, p["vkey"])
    assert not mine["ok"], mine
    out = cli(["audit", str(log), "--key", p["vkey"], "--json"], tmp_path / "other-home")
    assert out.returncode != 0, out.stdout + out.stderr
