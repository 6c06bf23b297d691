"""An independent verifier of moat's audit log, written only from
docs/audit-format.md ("The moat audit log format, version 1").

Pure Python standard library. The `cryptography` package is not installed in
the project's venv, so Ed25519 verification is implemented here from the
reference code of RFC 8032 section 6 (verification only; no secret keys are
ever handled, so constant time does not matter).

Public API:

- ``canonical_json(value) -> bytes`` and ``is_canonical(line) -> bool``
- ``leaf_hash``, ``node_hash``, ``mth``, ``inclusion_path``,
  ``consistency_proof``, ``verify_inclusion``, ``verify_consistency``
- ``parse_vkey``, ``parse_note``, ``parse_checkpoint``, ``verify_note``
- ``verify_log(dir, vkey) -> dict`` and ``verify_bundle(path, vkey=None) -> dict``

Interpretation choices where the document is silent or ambiguous are marked
"AMBIGUITY" below.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re

__all__ = [
    "canonical_json", "is_canonical", "entry_hash", "leaf_hash", "node_hash", "mth",
    "inclusion_path", "consistency_proof", "verify_inclusion", "verify_consistency",
    "ed25519_verify", "key_hash", "parse_vkey", "format_vkey", "parse_note",
    "parse_checkpoint", "verify_note", "check_entries", "verify_log", "verify_bundle",
    "VerifyError",
]

ZERO_PREV = "0" * 64
BUNDLE_FORMAT = "moat-audit-bundle/1"
KEY_NAME = "moat"
EM_DASH = "\u2014"


class VerifyError(Exception):
    """A structural failure (bad key, bad note, bad proof shape)."""


# ---------------------------------------------------------------------------
# Ed25519 verification, RFC 8032 section 6 (reference implementation).
# ---------------------------------------------------------------------------

_P = 2 ** 255 - 19
_Q = 2 ** 252 + 27742317777372353535851937790883648493  # group order L


def _inv(x):
    return pow(x, _P - 2, _P)


_D = -121665 * _inv(121666) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _point_add(P, Q):
    A = (P[1] - P[0]) * (Q[1] - Q[0]) % _P
    B = (P[1] + P[0]) * (Q[1] + Q[0]) % _P
    C = 2 * P[3] * Q[3] * _D % _P
    D = 2 * P[2] * Q[2] % _P
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F % _P, G * H % _P, F * G % _P, E * H % _P)


def _point_mul(s, P):
    Q = (0, 1, 1, 0)  # neutral element
    while s > 0:
        if s & 1:
            Q = _point_add(Q, P)
        P = _point_add(P, P)
        s >>= 1
    return Q


def _point_equal(P, Q):
    if (P[0] * Q[2] - Q[0] * P[2]) % _P != 0:
        return False
    if (P[1] * Q[2] - Q[1] * P[2]) % _P != 0:
        return False
    return True


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * _inv(_D * y * y + 1)
    if x2 % _P == 0:
        if sign:
            return None
        return 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


_GY = 4 * _inv(5) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _point_decompress(s):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def ed25519_verify(public: bytes, msg: bytes, signature: bytes) -> bool:
    """RFC 8032 §5.1.7 / §6 verify (cofactorless, s < L enforced)."""
    if len(public) != 32 or len(signature) != 64:
        return False
    A = _point_decompress(public)
    if A is None:
        return False
    Rs = signature[:32]
    R = _point_decompress(Rs)
    if R is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _Q:
        return False
    h = int.from_bytes(hashlib.sha512(Rs + public + msg).digest(), "little") % _Q
    sB = _point_mul(s, _G)
    hA = _point_mul(h, A)
    return _point_equal(sB, _point_add(R, hA))


# ---------------------------------------------------------------------------
# Canonical JSON (RFC 8785 restricted as in the document: no fractional numbers)
# ---------------------------------------------------------------------------

_SHORT_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x09: "\\t",
                  0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


class NotCanonical(ValueError):
    pass


def _canon_str(s: str) -> str:
    out = ['"']
    for ch in s:
        c = ord(ch)
        if c in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[c])
        elif c < 0x20:
            out.append("\\u%04x" % c)
        elif 0xD800 <= c <= 0xDFFF:
            # A lone surrogate (json.loads lets "\ud800" through); RFC 8785
            # forbids it and it cannot be written as UTF-8.
            raise NotCanonical("lone surrogate in string")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _canon(value, out):
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        # AMBIGUITY: RFC 8785 serializes numbers as IEEE doubles (so integers
        # beyond 2^53 lose precision / use exponent form); the document says
        # only "integers in decimal". We write every integer exactly.
        out.append(str(value))
    elif isinstance(value, float):
        raise NotCanonical("fractional number (the format allows integers only)")
    elif isinstance(value, str):
        out.append(_canon_str(value))
    elif isinstance(value, list):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _canon(v, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        # keys compared as sequences of UTF-16 code units == bytewise UTF-16BE
        keys = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        for i, k in enumerate(keys):
            if i:
                out.append(",")
            out.append(_canon_str(k))
            out.append(":")
            _canon(value[k], out)
        out.append("}")
    else:
        raise NotCanonical("unsupported type %r" % type(value).__name__)


def canonical_json(value) -> bytes:
    out = []
    _canon(value, out)
    return "".join(out).encode("utf-8")


def _reject_constant(name):
    raise ValueError("non-JSON constant %s" % name)


def _pairs_no_dupes(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate key %r" % k)
        d[k] = v
    return d


def parse_json_strict(data: bytes):
    """Parse UTF-8 JSON; rejects NaN/Infinity and duplicate keys."""
    text = data.decode("utf-8")  # strict: invalid UTF-8 raises
    return json.loads(text, parse_constant=_reject_constant,
                      object_pairs_hook=_pairs_no_dupes)


def is_canonical(line: bytes) -> bool:
    try:
        return canonical_json(parse_json_strict(line)) == line
    except (ValueError, UnicodeDecodeError, NotCanonical):
        return False


# ---------------------------------------------------------------------------
# RFC 6962 Merkle tree, RFC 9162 proof verification
# ---------------------------------------------------------------------------

def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def entry_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def leaf_hash(line: bytes) -> bytes:
    return sha256(b"\x00" + line)


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def _largest_pow2_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _mth_leaves(leaves):
    n = len(leaves)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return leaves[0]
    k = _largest_pow2_below(n)
    return node_hash(_mth_leaves(leaves[:k]), _mth_leaves(leaves[k:]))


def mth(lines) -> bytes:
    """MTH(D[0:n]) of the given lines (bytes, without the newline)."""
    return _mth_leaves([leaf_hash(x) for x in lines])


def _path(m, leaves):
    """RFC 6962 §2.1.1 PATH(m, D[n]) on leaf hashes."""
    n = len(leaves)
    if n <= 1:
        return []
    k = _largest_pow2_below(n)
    if m < k:
        return _path(m, leaves[:k]) + [_mth_leaves(leaves[k:])]
    return _path(m - k, leaves[k:]) + [_mth_leaves(leaves[:k])]


def inclusion_path(m, lines):
    return _path(m, [leaf_hash(x) for x in lines])


def _subproof(m, leaves, b):
    """RFC 6962 §2.1.2 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if b else [_mth_leaves(leaves)]
    k = _largest_pow2_below(n)
    if m <= k:
        return _subproof(m, leaves[:k], b) + [_mth_leaves(leaves[k:])]
    return _subproof(m - k, leaves[k:], False) + [_mth_leaves(leaves[:k])]


def consistency_proof(m, lines):
    leaves = [leaf_hash(x) for x in lines]
    if m == 0 or m == len(leaves):
        return []
    return _subproof(m, leaves, True)


def verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, path, root: bytes) -> bool:
    """RFC 9162 §2.1.3.2."""
    if leaf_index < 0 or leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes, path) -> bool:
    """RFC 9162 §2.1.4.2.

    AMBIGUITY: the RFC's algorithm covers only 0 < first < second. As common
    implementations do, first == second requires an empty proof and equal
    roots, and first == 0 requires an empty proof (every tree extends the
    empty one)."""
    if first < 0 or first > second:
        return False
    if first == second:
        return len(path) == 0 and first_hash == second_hash
    if first == 0:
        return len(path) == 0
    if len(path) == 0:
        return False
    path = list(path)
    if first & (first - 1) == 0:  # exact power of two
        path = [first_hash] + path
    fn, sn = first - 1, second - 1
    if fn & 1:
        while fn & 1:
            fn >>= 1
            sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


# ---------------------------------------------------------------------------
# Signed notes, verifier keys, checkpoints
# ---------------------------------------------------------------------------

def _b64decode(s: str) -> bytes:
    # standard base64 with padding (RFC 4648 §4), strictly
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", s) or len(s) % 4:
        raise VerifyError("bad base64 %r" % s)
    try:
        b = base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise VerifyError("bad base64: %s" % e)
    if base64.b64encode(b).decode() != s:
        raise VerifyError("non-canonical base64 %r" % s)
    return b


def key_hash(name: str, public: bytes) -> bytes:
    return sha256(name.encode() + b"\n" + b"\x01" + public)[:4]


def format_vkey(public: bytes, name: str = KEY_NAME) -> str:
    return "%s+%s+%s" % (name, key_hash(name, public).hex(),
                         base64.b64encode(b"\x01" + public).decode())


def parse_vkey(vkey: str):
    """`<name>+<hex key hash>+<base64(0x01 || key)>` -> (name, hash4, public)."""
    # The base64 part may itself contain '+'; name and hash cannot, so split
    # those two off the front.
    parts = vkey.split("+", 2) if isinstance(vkey, str) else []
    if len(parts) != 3:
        raise VerifyError("malformed verifier key")
    name, hexhash, b64 = parts
    if not name or any(c.isspace() for c in name):
        raise VerifyError("bad key name in verifier key")
    if not re.fullmatch(r"[0-9a-f]{8}", hexhash):
        raise VerifyError("bad key hash in verifier key")
    raw = _b64decode(b64)
    if len(raw) != 33 or raw[0] != 0x01:
        raise VerifyError("verifier key is not an Ed25519 key (0x01 || 32 bytes)")
    public = raw[1:]
    h = bytes.fromhex(hexhash)
    if key_hash(name, public) != h:
        raise VerifyError("verifier key hash does not match its key")
    return name, h, public


def parse_note(note: str):
    """C2SP signed note -> (body, [(name, keyhash4, sig64)])."""
    if not isinstance(note, str):
        raise VerifyError("note is not a string")
    sep = note.rfind("\n\n")
    if sep < 0:
        raise VerifyError("note has no blank line before its signatures")
    body, sigs = note[:sep + 1], note[sep + 2:]
    if not sigs.endswith("\n") or not sigs.strip():
        raise VerifyError("note signature block is empty or not newline-terminated")
    out = []
    for line in sigs[:-1].split("\n"):
        m = re.fullmatch(EM_DASH + r" (\S+) (\S+)", line)
        if not m:
            raise VerifyError("malformed signature line %r" % line)
        raw = _b64decode(m.group(2))
        if len(raw) < 5:
            raise VerifyError("signature too short")
        out.append((m.group(1), raw[:4], raw[4:]))
    return body, out


_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def parse_checkpoint(body: str):
    """The note body -> dict(origin, size, root (bytes), time)."""
    if not body.endswith("\n"):
        raise VerifyError("checkpoint body does not end in a newline")
    lines = body[:-1].split("\n")
    # the document: origin, size, root, the time line, and a `final` line in
    # the checkpoint that closes the log or `reopened` in one that opens it
    final = len(lines) == 5 and lines[4] == "final"
    reopened = len(lines) == 5 and lines[4] == "reopened"
    if len(lines) != 4 and not (final or reopened):
        raise VerifyError("checkpoint body has %d lines, expected 4 (or 5 ending in final "
                          "or reopened)" % len(lines))
    origin, size_s, root_s, time_l = lines[:4]
    if not origin.startswith("moat/") or len(origin) <= len("moat/"):
        raise VerifyError("checkpoint origin %r is not moat/<run>" % origin)
    if not re.fullmatch(r"0|[1-9][0-9]*", size_s):
        raise VerifyError("bad tree size %r" % size_s)
    root = _b64decode(root_s)
    if len(root) != 32:
        raise VerifyError("tree head is not 32 bytes")
    if not time_l.startswith("time ") or not _RFC3339.fullmatch(time_l[5:]):
        raise VerifyError("bad time extension line %r" % time_l)
    return {"origin": origin, "size": int(size_s), "root": root, "time": time_l[5:],
            "final": final, "reopened": reopened}


def _instant(t: str):
    """An RFC 3339 time as a comparable instant (nanoseconds kept)."""
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", t)
    if not m:
        raise VerifyError("bad time %r" % t)
    import datetime
    base = datetime.datetime.fromisoformat(m.group(1) + (
        "+00:00" if m.group(3) in ("Z", "z") else m.group(3)))
    frac = int((m.group(2) or ".0")[1:].ljust(9, "0")[:9])
    return (int(base.timestamp()), frac)


def verify_note(note: str, vkey: str):
    """Verify a signed checkpoint with the trusted key. Returns the parsed
    checkpoint; raises VerifyError when no signature by that key verifies."""
    name, h, public = parse_vkey(vkey)
    body, sigs = parse_note(note)
    cp = parse_checkpoint(body)
    # C2SP: signatures by unknown keys are ignored; one by ours must verify.
    mine = [s for (n, kh, s) in sigs if n == name and kh == h]
    if not mine:
        raise VerifyError("no signature by the trusted key %s+%s" % (name, h.hex()))
    if not any(ed25519_verify(public, body.encode("utf-8"), s) for s in mine):
        raise VerifyError("checkpoint signature does not verify")
    return cp


# ---------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------

_MEMBERS = {"seq", "time", "type", "prev", "data"}
_TIME_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def _entry_problem(i, line: bytes, prev_hex: str):
    """Step 2 checks of the document for line i; None when fine."""
    try:
        obj = parse_json_strict(line)
    except (ValueError, UnicodeDecodeError) as e:
        return "does not parse: %s" % e
    try:
        canon = canonical_json(obj)
    except NotCanonical as e:
        return "not canonical: %s" % e
    if canon != line:
        return "not canonical JSON"
    if not isinstance(obj, dict) or set(obj) != _MEMBERS:
        return "members are not exactly seq,time,type,prev,data"
    if type(obj["seq"]) is not int or obj["seq"] != i:
        return "seq is %r, expected %d" % (obj["seq"], i)
    if obj["prev"] != prev_hex:
        return "prev does not match the entry hash of line %d" % (i - 1)
    if not isinstance(obj["type"], str):
        return "type is not a string"
    if not isinstance(obj["time"], str) or not _TIME_UTC.fullmatch(obj["time"]):
        return "time is not RFC 3339 UTC"
    if not isinstance(obj["data"], dict):
        return "data is not an object"
    return None


def check_entries(lines):
    """Document step 2 over `lines` (bytes, no newline).

    Returns (first_bad or None, [problems]). Only the first failing line is
    the first bad entry; later failures are listed as problems too (but a
    single deletion/insert makes every later seq fail, so we stop listing
    after the first)."""
    prev = ZERO_PREV
    for i, line in enumerate(lines):
        p = _entry_problem(i, line, prev)
        if p is not None:
            return i, ["entry %d: %s" % (i, p)]
        prev = entry_hash(line)
    return None, []


def _split_lines(data: bytes):
    """-> (complete lines without '\n', torn tail bytes or None)."""
    if not data:
        return [], None
    parts = data.split(b"\n")
    tail = parts.pop()  # after the last '\n' (b"" when the file ends in '\n')
    return parts, (tail if tail else None)


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------

def _min(a, b):
    return b if a is None else (a if b is None else min(a, b))


def verify_log(dir, vkey) -> dict:
    """Verify a log directory with the trusted verifier key.

    Returns a dict:
      ok          bool
      entries     number of complete lines in audit.jsonl
      first_bad   index of the first bad entry, or None
      problems    list of strings
      torn_tail   None, or {"file", "offset", "length"} for audit.jsonl
      root        hex MTH of all complete lines
      checkpoints list of {origin, size, root (hex), time, ok}
      covered     size of the last good checkpoint (entries after it are unsigned)
    """
    dir = os.fspath(dir)
    problems = []
    first_bad = None
    result = {"ok": False, "entries": 0, "first_bad": None, "problems": problems,
              "torn_tail": None, "root": None, "checkpoints": [], "covered": 0,
              "checkpoints_torn_tail": None}
    try:
        parse_vkey(vkey)
    except VerifyError as e:
        problems.append("trusted key: %s" % e)
        return result

    try:
        with open(os.path.join(dir, "audit.jsonl"), "rb") as f:
            data = f.read()
    except OSError as e:
        problems.append("cannot read audit.jsonl: %s" % e)
        return result
    lines, torn = _split_lines(data)
    if torn is not None:
        result["torn_tail"] = {"file": "audit.jsonl", "offset": len(data) - len(torn),
                               "length": len(torn)}
    result["entries"] = len(lines)

    # step 2: the chain
    fb, ps = check_entries(lines)
    first_bad = _min(first_bad, fb)
    problems += ps

    # step 3: checkpoints
    leaves = [leaf_hash(x) for x in lines]
    result["root"] = _mth_leaves(leaves).hex()
    cp_path = os.path.join(dir, "checkpoints.jsonl")
    try:
        with open(cp_path, "rb") as f:
            cdata = f.read()
    except FileNotFoundError:
        cdata = b""
        # AMBIGUITY: the document does not say whether a log without any
        # checkpoint is acceptable (a running log before its first checkpoint
        # has none). We accept it and report covered == 0.
    except OSError as e:
        problems.append("cannot read checkpoints.jsonl: %s" % e)
        cdata = b""
    clines, ctorn = _split_lines(cdata)
    if ctorn is not None:
        # AMBIGUITY: "A file whose last line does not end in \n has a torn
        # tail" -- we apply it to checkpoints.jsonl as well.
        result["checkpoints_torn_tail"] = {"file": "checkpoints.jsonl",
                                           "offset": len(cdata) - len(ctorn),
                                           "length": len(ctorn)}
    mth_cache = {}

    def prefix_root(n):
        if n not in mth_cache:
            mth_cache[n] = _mth_leaves(leaves[:n])
        return mth_cache[n]

    covered = 0
    for j, cl in enumerate(clines):
        info = {"index": j, "ok": False}
        result["checkpoints"].append(info)
        try:
            obj = parse_json_strict(cl)
            if not isinstance(obj, dict) or not isinstance(obj.get("note"), str):
                raise VerifyError('not a {"note": ...} object')
            cp = verify_note(obj["note"], vkey)
        except (ValueError, UnicodeDecodeError, VerifyError) as e:
            problems.append("checkpoint %d: %s" % (j, e))
            continue
        info.update(origin=cp["origin"], size=cp["size"], root=cp["root"].hex(), time=cp["time"])
        n = cp["size"]
        if n > len(lines):
            problems.append("checkpoint %d: size %d but the log has %d entries (the log was cut)"
                            % (j, n, len(lines)))
            # AMBIGUITY: the document names no first bad entry for a cut log;
            # we name the first missing entry.
            first_bad = _min(first_bad, len(lines))
            continue
        if prefix_root(n) != cp["root"]:
            problems.append("checkpoint %d: root does not match the first %d entries" % (j, n))
            # "the last line [is caught] by the checkpoint": with an intact
            # chain, the entries up to n-2 are pinned by their successor's
            # prev, so we name entry n-1.
            if n > 0:
                first_bad = _min(first_bad, n - 1)
            continue
        info["ok"] = True
        info["final"] = cp["final"]
        info["reopened"] = cp["reopened"]
        info["note"] = obj["note"]
        covered = max(covered, n)
    # step 5: the order of the checkpoints
    good = [c for c in result["checkpoints"] if c.get("ok")]
    if good and good[0]["reopened"]:
        problems.append("checkpoint 1 reopens a log that was not closed")
    for a, b in zip(good, good[1:]):
        if b["origin"] != a["origin"]:
            problems.append("checkpoints of two logs (%s, %s)" % (a["origin"], b["origin"]))
        if (b["size"] < a["size"] or _instant(b["time"]) < _instant(a["time"])
                or b["note"] == a["note"]):
            problems.append("checkpoints go back (size %d at %s after size %d at %s)"
                            % (b["size"], b["time"], a["size"], a["time"]))
        if a["final"] and not (b["reopened"] and b["size"] == a["size"]):
            problems.append("a checkpoint follows a final one without reopening the log")
        if b["reopened"] and not a["final"]:
            problems.append("a checkpoint reopens a log that was not closed")
    # step 6: nothing after a final checkpoint (the last one, in file order)
    last = result["checkpoints"][-1] if result["checkpoints"] else None
    if last is not None and last.get("ok") and last.get("final") and len(lines) > last["size"]:
        problems.append("%d entries follow the final checkpoint (size %d): added after the close"
                        % (len(lines) - last["size"], last["size"]))
        first_bad = _min(first_bad, last["size"])
    # step 7
    result["unsigned"] = len(lines) - covered
    result["closed"] = bool(last is not None and last.get("ok") and last.get("final")
                            and len(lines) == last["size"])
    result["covered"] = covered
    result["first_bad"] = first_bad
    result["ok"] = not problems
    return result


# ---------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------

def _hexes(lst, what):
    if not isinstance(lst, list):
        raise VerifyError("%s is not a list" % what)
    out = []
    for h in lst:
        if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
            raise VerifyError("%s holds a non-hash %r" % (what, h))
        out.append(bytes.fromhex(h))
    return out


def verify_bundle(path, vkey=None) -> dict:
    """Verify a proof bundle offline. Without `vkey`, the bundle's own key is
    used, which proves only internal consistency (reported as
    self_keyed=True)."""
    problems = []
    result = {"ok": False, "entries": 0, "first_bad": None, "problems": problems,
              "vkey": None, "self_keyed": vkey is None, "root": None, "size": None,
              "checkpoints": 0}
    try:
        with open(os.fspath(path), "rb") as f:
            b = parse_json_strict(f.read())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        problems.append("cannot read bundle: %s" % e)
        return result
    if not isinstance(b, dict):
        problems.append("bundle is not a JSON object")
        return result
    if b.get("format") != BUNDLE_FORMAT:
        problems.append("format is %r" % b.get("format"))
        return result
    result["vkey"] = b.get("vkey")
    key = vkey if vkey is not None else b.get("vkey")
    try:
        parse_vkey(key)
    except VerifyError as e:
        problems.append("key: %s" % e)
        return result

    entries = b.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        problems.append("entries is not a list of strings")
        return result
    lines = []
    for i, e in enumerate(entries):
        if "\n" in e:
            problems.append("entry %d contains a newline" % i)
        try:
            lines.append(e.encode("utf-8"))
        except UnicodeEncodeError:
            problems.append("entry %d is not valid Unicode" % i)
            lines.append(e.encode("utf-8", "surrogatepass"))
    result["entries"] = len(lines)
    fb, ps = check_entries(lines)
    result["first_bad"] = fb
    problems += ps

    notes = b.get("checkpoints")
    if not isinstance(notes, list) or not notes:
        problems.append("no checkpoints")
        return result
    cps = []
    for j, note in enumerate(notes):
        # AMBIGUITY: "the signed notes" -- we accept a note string or, as in
        # checkpoints.jsonl, a {"note": ...} object.
        if isinstance(note, dict):
            note = note.get("note")
        try:
            cps.append(verify_note(note, key))
        except VerifyError as e:
            problems.append("checkpoint %d: %s" % (j, e))
            cps.append(None)
    result["checkpoints"] = len(cps)
    last = cps[-1]
    leaves = [leaf_hash(x) for x in lines]
    if last is not None:
        result["size"] = last["size"]
        result["root"] = last["root"].hex()
        if last["size"] != len(lines):
            problems.append("last checkpoint size %d != %d entries" % (last["size"], len(lines)))
        elif _mth_leaves(leaves) != last["root"]:
            problems.append("last checkpoint root is not the MTH of the entries")
            if fb is None and lines:
                result["first_bad"] = len(lines) - 1
    for j in range(len(cps) - 1):
        a, c = cps[j], cps[j + 1]
        if a is not None and c is not None and a["size"] > c["size"]:
            problems.append("checkpoints %d,%d are not oldest first (size %d > %d)"
                            % (j, j + 1, a["size"], c["size"]))

    # inclusion proofs
    incl = b.get("inclusion")
    seen = set()
    if not isinstance(incl, list):
        problems.append("inclusion is not a list")
    elif last is not None:
        for k, item in enumerate(incl):
            try:
                if not isinstance(item, dict):
                    raise VerifyError("not an object")
                i = item.get("index")
                if type(i) is not int or not 0 <= i < len(lines):
                    raise VerifyError("bad index %r" % i)
                proof = _hexes(item.get("proof"), "proof")
                if i in seen:
                    raise VerifyError("duplicate index %d" % i)
                seen.add(i)
                if not verify_inclusion(i, last["size"], leaves[i], proof, last["root"]):
                    raise VerifyError("does not verify against the last checkpoint")
            except VerifyError as e:
                problems.append("inclusion %d: %s" % (k, e))
        # "each entry's audit path": one per entry.
        missing = set(range(len(lines))) - seen
        if missing:
            problems.append("inclusion proofs missing for %d entries (first %d)"
                            % (len(missing), min(missing)))

    # consistency proofs, "between consecutive checkpoints"
    cons = b.get("consistency")
    if not isinstance(cons, list):
        problems.append("consistency is not a list")
    else:
        pairs = [(j, cps[j], cps[j + 1]) for j in range(len(cps) - 1)
                 if cps[j] is not None and cps[j + 1] is not None]
        used = set()
        for k, item in enumerate(cons):
            try:
                if not isinstance(item, dict):
                    raise VerifyError("not an object")
                m, n = item.get("from"), item.get("to")
                if type(m) is not int or type(n) is not int:
                    raise VerifyError("from/to are not integers")
                proof = _hexes(item.get("proof"), "proof")
                # AMBIGUITY: a proof "names" its checkpoints by size only. We
                # match it to the first unused consecutive pair with those sizes.
                match = [p for p in pairs if p[1]["size"] == m and p[2]["size"] == n
                         and p[0] not in used]
                if not match:
                    raise VerifyError("no consecutive checkpoints of sizes %d -> %d" % (m, n))
                j, a, c = match[0]
                used.add(j)
                if not verify_consistency(m, n, a["root"], c["root"], proof):
                    raise VerifyError("%d -> %d does not verify" % (m, n))
            except VerifyError as e:
                problems.append("consistency %d: %s" % (k, e))
        # AMBIGUITY: must every consecutive pair have a proof? Pairs of equal
        # size or from an empty tree need none; we require the others.
        for j, a, c in pairs:
            if j not in used and 0 < a["size"] < c["size"]:
                problems.append("no consistency proof for checkpoints %d -> %d" % (j, j + 1))
        # Belt and braces: every earlier checkpoint must also be a prefix of the entries.
        for j, cp in enumerate(cps[:-1]):
            if cp is not None and (cp["size"] > len(lines)
                                   or _mth_leaves(leaves[:cp["size"]]) != cp["root"]):
                problems.append("checkpoint %d is not a prefix of the entries" % j)

    result["ok"] = not problems
    return result


if __name__ == "__main__":  # pragma: no cover
    import sys
    if len(sys.argv) < 2:
        print("usage: audit_verifier.py LOGDIR VKEY | audit_verifier.py --bundle FILE [VKEY]")
        sys.exit(2)
    if sys.argv[1] == "--bundle":
        r = verify_bundle(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        r = verify_log(sys.argv[1], sys.argv[2])
    print(json.dumps(r, indent=2))
    sys.exit(0 if r["ok"] else 1)
