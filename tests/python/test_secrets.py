"""secrets: in agent.yaml, resolved through real subprocesses: fake `op` and
`aws` executables on PATH stand in for 1Password and AWS SSM."""

import os
import stat

import pytest

import moat

CONFIG = """\
secrets:
  OPENAI_API_KEY: op://Dev/OpenAI/api-key
  DATABASE_URL: ssm:///production/database/url
  REGIONAL: ssm://eu-west-1/app/token
"""


def script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_clis(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    script(bin_dir / "op", f"""echo "op $*" >> {log}
if [ "$1 $2 $3" = "read --no-newline op://Dev/OpenAI/api-key" ]; then printf 'sk-op-SECRET'; exit 0; fi
echo "[ERROR] could not read secret: item not found" >&2; exit 1
""")
    script(bin_dir / "aws", f"""echo "aws $*" >> {log}
case "$*" in
  "ssm get-parameter --name /production/database/url --with-decryption --query Parameter.Value --output text")
    echo 'postgres://u:SSM-SECRET@db/prod';;
  "ssm get-parameter --name /app/token --with-decryption --query Parameter.Value --output text --region eu-west-1")
    echo 'regional-SECRET';;
  *) echo "An error occurred (ParameterNotFound)" >&2; exit 254;;
esac
""")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return bin_dir, log


def workspace(tmp_path, text=CONFIG):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "agent.yaml").write_text(text)
    return ws


def test_secrets_resolve_through_op_and_aws(fake_clis, tmp_path):
    _, log = fake_clis
    values = moat.load_config(workspace(tmp_path)).resolve_secrets()
    assert values == {
        "OPENAI_API_KEY": "sk-op-SECRET",
        "DATABASE_URL": "postgres://u:SSM-SECRET@db/prod",
        "REGIONAL": "regional-SECRET",
    }
    calls = log.read_text()
    assert "op read --no-newline op://Dev/OpenAI/api-key" in calls
    assert "--region eu-west-1" in calls


def test_a_failed_lookup_names_variable_and_backend_never_a_value(fake_clis, tmp_path):
    ws = workspace(tmp_path, "secrets:\n  GOOD: op://Dev/OpenAI/api-key\n  MISSING: op://Dev/Nope/field\n")
    with pytest.raises(moat.ConfigError) as info:
        moat.load_config(ws).resolve_secrets()
    msg = str(info.value)
    assert msg.startswith("secret MISSING (1password): lookup of op://Dev/Nope/field failed")
    assert "item not found" in msg
    assert "sk-op-SECRET" not in msg


def test_a_missing_cli_says_what_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    ws = workspace(tmp_path, "secrets:\n  DB: ssm:///x/y\n")
    with pytest.raises(moat.ConfigError, match=r"secret DB \(aws-ssm\): `aws` is not installed; install the AWS CLI"):
        moat.load_config(ws).resolve_secrets()
    ws = workspace(tmp_path, "secrets:\n  K: op://a/b/c\n")
    with pytest.raises(moat.ConfigError, match=r"`op` is not installed; install the 1Password CLI"):
        moat.load_config(ws).resolve_secrets()


def test_a_value_larger_than_a_pipe_holds_comes_whole_and_quickly(tmp_path, monkeypatch):
    # A document of 200 KiB from `op read`: more than a pipe holds, so the
    # CLI waits for its reader while it writes. It must not wait for the
    # lookup's 60 s limit.
    import time
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script(bin_dir / "op", "head -c 204800 /dev/zero | tr '\\0' 'k'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    ws = workspace(tmp_path, "secrets:\n  DOC: op://Dev/Doc/file\n")
    started = time.monotonic()
    values = moat.load_config(ws).resolve_secrets()
    assert time.monotonic() - started < 10
    assert values["DOC"] == "k" * 204800


def test_a_value_that_is_not_text_or_too_large_is_refused(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    ws = workspace(tmp_path, "secrets:\n  BIN: op://Dev/Bin/file\n")
    script(bin_dir / "op", "printf 'ab\\377cd'\n")
    with pytest.raises(moat.ConfigError, match=r"secret BIN \(1password\): op://Dev/Bin/file is not UTF-8 text"):
        moat.load_config(ws).resolve_secrets()
    script(bin_dir / "op", "head -c 2000000 /dev/zero | tr '\\0' 'k'\n")
    with pytest.raises(moat.ConfigError, match=r"op://Dev/Bin/file is larger than 1 MiB"):
        moat.load_config(ws).resolve_secrets()
    # A NUL: the engine would refuse the variable and quote it, value and
    # all, into the run's error (run.json, the audit log, the terminal).
    script(bin_dir / "op", "printf 'abc\\000TOPSECRET-value'\n")
    with pytest.raises(moat.ConfigError, match=r"op://Dev/Bin/file holds a NUL byte") as err:
        moat.load_config(ws).resolve_secrets()
    assert "TOPSECRET" not in str(err.value)
