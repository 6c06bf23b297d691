"""The Python surface of moat's configuration model."""

import json
import os
import pathlib
import threading

import pytest

import moat

ROOT = pathlib.Path(__file__).resolve().parents[2]


def workspace(tmp_path, text, name="agent.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path


def test_version_matches_cargo():
    cargo = (ROOT / "Cargo.toml").read_text()
    line = next(l for l in cargo.splitlines() if l.startswith("version = "))
    assert moat.__version__ == line.split('"')[1]


def test_full_example_gives_typed_objects():
    cfg = moat.load_config(ROOT / "examples" / "full")
    assert isinstance(cfg, moat.Config)
    assert cfg.name == "my-agent"
    assert cfg.version == "1.0.0"
    assert cfg.image == "node:20-bookworm"
    assert cfg.dependencies == ["node@20"]
    assert cfg.grants == ["github:repo"]
    assert cfg.env == {"NODE_ENV": "development"}
    assert cfg.secrets == {
        "DATABASE_URL": "ssm:///production/database/url",
        "OPENAI_API_KEY": "op://Dev/OpenAI/api-key",
    }
    assert isinstance(cfg.network, moat.Network)
    assert cfg.network.policy == "strict"
    assert cfg.network.allow == ["api.openai.com", "*.amazonaws.com"]
    [mount] = cfg.mounts
    assert isinstance(mount, moat.Mount)
    assert mount.source == str(ROOT / "examples" / "full" / "data")
    assert (mount.target, mount.read_only) == ("/data", True)
    assert cfg.ports == {"api": 8080, "web": 3000}
    assert cfg.command == ["npm", "start"]
    assert cfg.interactive is False
    assert cfg.workspace == str(ROOT / "examples" / "full")
    assert cfg.config_file == str(ROOT / "examples" / "full" / "agent.yaml")


def test_to_json_matches_attributes(tmp_path):
    cfg = moat.load_config(workspace(tmp_path, "ports:\n  web: 3000\n"))
    data = json.loads(cfg.to_json())
    assert data["ports"] == {"web": 3000}
    assert data["image"] == cfg.image == "ubuntu:22.04"
    assert data["image_source"] == "default"


def test_defaults_without_a_file(tmp_path):
    cfg = moat.load_config(str(tmp_path))
    assert cfg.config_file is None
    assert cfg.name is None
    assert cfg.image == "ubuntu:22.04"
    assert cfg.network.policy == "permissive"
    assert cfg.command is None


def test_moat_yaml_is_accepted(tmp_path):
    cfg = moat.load_config(workspace(tmp_path, "name: alt\n", name="moat.yaml"))
    assert cfg.name == "alt"


def test_config_error_carries_location(tmp_path):
    ws = workspace(tmp_path, "name: demo\ngrnats:\n  - github\nports:\n  web: 70000\n")
    with pytest.raises(moat.ConfigError) as info:
        moat.load_config(ws)
    err = info.value
    assert isinstance(err, moat.MoatError)
    assert err.path == str(ws / "agent.yaml")
    assert (err.line, err.column) == (2, 1)
    assert err.message == 'unknown field "grnats" (did you mean "grants"?)'
    assert str(err) == f'{ws / "agent.yaml"}:2:1: {err.message}'
    assert len(err.errors) == 2
    assert str(err.errors[1]).endswith(":5:8: ports.web: port 70000 is out of range (1-65535)")
    assert (err.errors[1].line, err.errors[1].column) == (5, 8)


@pytest.mark.parametrize(
    "text, line, column, needle",
    [
        ("name: Bad_Name\n", 1, 7, "invalid agent name"),
        ("name: a\nname: b\n", 2, 1, 'duplicate key "name"'),
        ("network:\n  policy: strcit\n", 2, 11, 'did you mean "strict"'),
        ("grants: [githb]\n", 1, 10, 'did you mean "github"'),
        ("secrets:\n  X: vault://a\n", 2, 6, "unsupported secret backend"),
        ("env:\n  X: a\nsecrets:\n  X: op://a/b/c\n", 4, 3, "in both env and secrets"),
        ("mounts: ['./a:/a:rx']\n", 1, 10, 'mode "rx" must be ro or rw'),
        ("name: [unterminated\n", 2, 1, "invalid yaml"),
    ],
)
def test_invalid_configs(tmp_path, text, line, column, needle):
    with pytest.raises(moat.ConfigError) as info:
        moat.load_config(workspace(tmp_path, text))
    assert (info.value.line, info.value.column) == (line, column), str(info.value)
    assert needle in str(info.value)


def test_both_files_is_a_config_error(tmp_path):
    workspace(tmp_path, "name: a\n")
    workspace(tmp_path, "name: b\n", name="moat.yaml")
    with pytest.raises(moat.ConfigError, match="both agent.yaml and moat.yaml exist"):
        moat.load_config(tmp_path)


def test_missing_workspace_is_an_io_error():
    with pytest.raises(moat.MoatIOError, match="no such file or directory") as info:
        moat.load_config("/nonexistent/moat-ws")
    assert info.value.line is None


def test_wrong_argument_type_is_a_type_error():
    with pytest.raises(TypeError):
        moat.load_config(42)


def test_load_releases_the_gil(tmp_path):
    """Loading from several threads at once works (and never deadlocks)."""
    ws = workspace(tmp_path, "name: threaded\n")
    results = []

    def load():
        results.append(moat.load_config(ws).name)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == ["threaded"] * 8


def test_typing_files_ship():
    pkg = pathlib.Path(moat.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_moat.pyi").exists()


def test_a_deps_registry_that_is_not_utf8_is_an_error_not_ignored(tmp_path, monkeypatch):
    """MOAT_DEPS_REGISTRY that cannot be read is refused wherever it would
    choose an image, never read as unset."""
    ws = workspace(tmp_path, "dependencies: [node@20]\n")
    cfg = moat.load_config(ws)
    monkeypatch.setitem(os.environb, b"MOAT_DEPS_REGISTRY", b"mirror\xff/library")
    with pytest.raises(moat.InvalidArgumentError, match="MOAT_DEPS_REGISTRY is not UTF-8"):
        cfg.image
    with pytest.raises(moat.InvalidArgumentError, match="MOAT_DEPS_REGISTRY is not UTF-8"):
        cfg.to_json()
    with pytest.raises(moat.InvalidArgumentError, match="MOAT_DEPS_REGISTRY is not UTF-8"):
        moat.deps()
    assert "not UTF-8" in repr(cfg)
    monkeypatch.delitem(os.environb, b"MOAT_DEPS_REGISTRY")
    assert cfg.image == "node:20-bookworm"
