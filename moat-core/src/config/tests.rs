//! Configuration tests: the seeds' examples parse; invalid files give the
//! right message at the right line and column.

use super::*;

fn parse(text: &str) -> Result<Config> {
    parse_str(text, Path::new("agent.yaml"), Path::new("/ws"))
}

fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected valid config, got {e}\n---\n{text}"),
    }
}

/// The full example of the seeds' README.
const SEED_README: &str = r#"name: my-agent
version: 1.0.0

# Runtime determines the base image
dependencies:
  - node@20        # Uses node:20
  # - python@3.11  # Uses python:3.11
  # - go@1.22      # Uses golang:1.22

# Credentials to inject (granted via `moat grant`)
grants:
  - github:repo

# Environment variables
env:
  NODE_ENV: development

# Secrets from external backends
secrets:
  OPENAI_API_KEY: op://Dev/OpenAI/api-key
  DATABASE_URL: ssm:///production/database/url

# Network policy
network:
  policy: strict
  allow:
    - "api.openai.com"
    - "*.amazonaws.com"

# Additional mounts
mounts:
  - ./data:/data:ro

# Expose services via hostname routing
ports:
  web: 3000
  api: 8080

# Default command to run (can be overridden with -- on CLI)
command: ["npm", "start"]

# Run in interactive mode (equivalent to -i flag)
# interactive: true
"#;

#[test]
fn seed_readme_example() {
    let c = ok(SEED_README);
    assert_eq!(c.name.as_deref(), Some("my-agent"));
    assert_eq!(c.version.as_deref(), Some("1.0.0"));
    assert_eq!(
        c.resolved_image().unwrap(),
        ("node:20-bookworm".to_string(), ImageSource::Dependencies)
    );
    assert_eq!(c.grants[0].to_string(), "github:repo");
    assert_eq!(c.env["NODE_ENV"], "development");
    assert_eq!(
        c.secrets["OPENAI_API_KEY"].backend,
        SecretBackend::OnePassword
    );
    assert_eq!(c.secrets["DATABASE_URL"].backend, SecretBackend::AwsSsm);
    assert_eq!(c.network.policy, PolicyMode::Strict);
    assert_eq!(c.network.allow.len(), 2);
    assert!(c.network.allow[1].matches("s3.amazonaws.com", 443));
    assert_eq!(
        c.mounts,
        vec![Mount {
            source: PathBuf::from("/ws/data"),
            target: "/data".into(),
            read_only: true
        }]
    );
    assert_eq!(c.ports["web"], 3000);
    assert_eq!(c.ports["api"], 8080);
    assert_eq!(
        c.command,
        Some(vec!["npm".to_string(), "start".to_string()])
    );
    assert!(!c.interactive);
}

#[test]
fn seed_exposing_ports_example() {
    let c = ok("name: my-app\n\ndependencies:\n  - node@22\n\nports:\n  web: 3000\n\ncommand: [\"npm\", \"start\"]\n");
    assert_eq!(c.resolved_image().unwrap().0, "node:22-bookworm");
    let c = ok("ports:\n  web: 3000\n  api: 8080\n  docs: 4000\n");
    assert_eq!(c.ports.len(), 3);
}

#[test]
fn seed_small_examples() {
    let c = ok("grants:\n  - github            # For HTTPS API access\n  - ssh:github.com    # For SSH git operations\n  - ssh:gitlab.com    # Multiple hosts supported\n");
    let names: Vec<String> = c.grants.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["github", "ssh:github.com", "ssh:gitlab.com"]);

    let c = ok("command: [\"bash\"]\ninteractive: true\n");
    assert!(c.interactive);

    let c = ok("command: [\"sh\", \"-c\", \"npm install && npm start\"]\n");
    assert_eq!(c.command.unwrap().len(), 3);

    let c = ok("network:\n  policy: permissive\n");
    assert_eq!(c.network.policy, PolicyMode::Permissive);

    let c = ok("network:\n  policy: strict\n  allow:\n    - \"api.github.com\"\n    - \"api.anthropic.com\"\n    - \"*.amazonaws.com\"\n");
    assert_eq!(c.network.allow.len(), 3);

    let c = ok("secrets:\n  OPENAI_API_KEY: op://Dev/OpenAI/api-key      # 1Password\n  DATABASE_URL: ssm:///production/database/url  # AWS SSM\n");
    assert_eq!(c.secrets.len(), 2);

    let c = ok("name: my-agent\n\nports:\n  web: 3000\n  api: 8080\n");
    assert_eq!(c.name.as_deref(), Some("my-agent"));
}

#[test]
fn dependency_images() {
    for (dep, image) in [
        ("node@20", "node:20-bookworm"),
        ("python@3.11", "python:3.11-bookworm"),
        ("go@1.22", "golang:1.22-bookworm"),
        ("node", "node:bookworm"),
    ] {
        let c = ok(&format!("dependencies: [\"{dep}\"]\n"));
        assert_eq!(c.resolved_image().unwrap().0, image, "{dep}");
        assert!(
            c.image_recipe().unwrap().is_some_and(|r| !r.is_built()),
            "{dep}"
        );
    }
    // Several runtimes, or tools: one image moat builds, its tag a hash
    // of what goes into it (see deps::tests).
    let c = ok("dependencies: [node@20, python@3.11, go@1.22, git]\n");
    let (image, source) = c.resolved_image().unwrap();
    assert!(image.starts_with("moat-deps:"), "{image}");
    assert_eq!(source, ImageSource::Dependencies);
    assert_eq!(
        c.image_recipe().unwrap().map(|r| r.image),
        Some(image.clone())
    );
    let other = ok("dependencies: [node@20, python@3.12, go@1.22, git]\n");
    assert_ne!(other.resolved_image().unwrap().0, image);
    assert_eq!(
        ok("").resolved_image().unwrap(),
        ("ubuntu:22.04".to_string(), ImageSource::Default)
    );
    assert_eq!(
        ok("image: registry.local/agents/base:1\ndependencies: [node@20, python@3.11]\n")
            .resolved_image()
            .unwrap(),
        (
            "registry.local/agents/base:1".to_string(),
            ImageSource::Image
        )
    );
}

#[test]
fn empty_and_null_sections_are_defaults() {
    let c = ok("env:\ngrants:\nnetwork:\n");
    assert!(c.env.is_empty() && c.grants.is_empty());
    assert_eq!(c.network.policy, PolicyMode::Permissive);
}

#[test]
fn scalars_are_taken_as_written_where_strings_are_meant() {
    let c = ok("version: 1.0\nenv:\n  DEBUG: true\n  WORKERS: 4\ncommand: [sleep, 10]\n");
    assert_eq!(c.version.as_deref(), Some("1.0"));
    assert_eq!(c.env["DEBUG"], "true");
    assert_eq!(c.env["WORKERS"], "4");
    assert_eq!(c.command.unwrap(), ["sleep", "10"]);
}

#[test]
fn relative_mounts_resolve_against_workspace() {
    let c = ok("mounts:\n  - sub/../shared:/shared\n  - /abs/path:/abs:rw\n  - data/./x:/x:ro\n");
    assert_eq!(c.mounts[0].source, PathBuf::from("/ws/shared"));
    assert!(!c.mounts[0].read_only);
    assert_eq!(c.mounts[1].source, PathBuf::from("/abs/path"));
    assert_eq!(c.mounts[2].source, PathBuf::from("/ws/data/x"));
    // A relative source may not climb out of the workspace: a directory
    // outside is written by its absolute path.
    for climb in ["../shared", "data/../../x", ".."] {
        let err = parse_str(
            &format!("mounts:\n  - {climb}:/m\n"),
            Path::new("agent.yaml"),
            Path::new("/ws"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("climbs out of the workspace"),
            "{climb}: {err}"
        );
    }
}

/// (yaml, line, column, message). Each file has exactly one problem.
const INVALID: &[(&str, u32, u32, &str)] = &[
    // 1. unknown top-level field, with a suggestion
    (
        "name: a\ngrnats:\n  - github\n",
        2,
        1,
        "unknown field \"grnats\" (did you mean \"grants\"?)",
    ),
    // 2. unknown field with no close match
    ("frobnicate: 1\n", 1, 1, "unknown field \"frobnicate\""),
    // 3. unknown network field
    (
        "network:\n  polcy: strict\n",
        2,
        3,
        "unknown field \"network.polcy\" (did you mean \"network.policy\"?)",
    ),
    // 4. wrong type: name as a list
    ("name: [a]\n", 1, 7, "name: expected a string, found a list"),
    // 5. wrong type: grants as a string
    (
        "grants: github\n",
        1,
        9,
        "grants: expected a list, found a string",
    ),
    // 6. wrong type: env as a list
    (
        "env:\n  - A=1\n",
        2,
        3,
        "env: expected a mapping, found a list",
    ),
    // 7. upper-case agent name
    (
        "name: MyAgent\n",
        1,
        7,
        "invalid agent name \"MyAgent\": must be lowercase",
    ),
    // 8. underscore in agent name
    (
        "name: my_agent\n",
        1,
        7,
        "invalid agent name \"my_agent\": contains \"_\", which host names cannot have; use \"-\"",
    ),
    // 9. leading hyphen
    (
        "name: -agent\n",
        1,
        7,
        "invalid agent name \"-agent\": must not start or end with a hyphen",
    ),
    // 10. too long
    (
        "name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
        1,
        7,
        "is longer than 63 characters",
    ),
    // 11. bad endpoint name
    (
        "ports:\n  Web_UI: 3000\n",
        2,
        3,
        "ports: invalid endpoint name \"Web_UI\": contains \"_\"",
    ),
    // 12. port out of range
    (
        "ports:\n  web: 70000\n",
        2,
        8,
        "ports.web: port 70000 is out of range (1-65535)",
    ),
    // 13. port zero
    (
        "ports:\n  web: 0\n",
        2,
        8,
        "ports.web: port 0 is out of range (1-65535)",
    ),
    // 14. negative port
    (
        "ports:\n  web: -1\n",
        2,
        8,
        "ports.web: port -1 is out of range (1-65535)",
    ),
    // 15. port as a string
    (
        "ports:\n  web: \"3000\"\n",
        2,
        8,
        "ports.web: expected a port number, found a string",
    ),
    // 16. bad mount mode
    (
        "mounts:\n  - ./data:/data:rx\n",
        2,
        5,
        "mount \"./data:/data:rx\": mode \"rx\" must be ro or rw",
    ),
    // 17. relative mount target
    (
        "mounts:\n  - ./data:data\n",
        2,
        5,
        "target \"data\" must be an absolute path in the container",
    ),
    // 18. mount over the workspace
    (
        "mounts:\n  - ./x:/workspace\n",
        2,
        5,
        "would hide the workspace",
    ),
    // 19. too many colons
    (
        "mounts:\n  - a:b:c:d\n",
        2,
        5,
        "must look like source:target or source:target:ro",
    ),
    // 20. duplicate mount target
    (
        "mounts:\n  - ./a:/data\n  - ./b:/data:ro\n",
        3,
        5,
        "target \"/data\" is already mounted",
    ),
    // 20b. the same targets, spelled as the engine reads them
    (
        "mounts:\n  - ./x:/./workspace/:ro\n",
        2,
        5,
        "would hide the workspace",
    ),
    ("mounts:\n  - ./x:/.\n", 2, 5, "would hide the container's root"),
    (
        "mounts:\n  - ./a:/data\n  - ./b:/data/.\n",
        3,
        5,
        "target \"/data\" is already mounted",
    ),
    // 20c. moat's own files in the container
    (
        "mounts:\n  - ./a:/etc/moat/ca-bundle.pem:ro\n",
        2,
        5,
        "is where moat puts the run's own /etc/moat",
    ),
    ("mounts:\n  - ./a:/etc//passwd\n", 2, 5, "own /etc/passwd"),
    ("mounts:\n  - ./a:/run/moat\n", 2, 5, "own /run/moat"),
    // 20d. one host's rules in two entries: the second would never be read
    (
        "network:\n  rules:\n    - api.example.com: [\"allow GET /a\"]\n    - api.example.com: [\"deny * /**\"]\n",
        4,
        7,
        "api.example.com is listed twice (first at line 3)",
    ),
    // 21. unsupported secret scheme
    (
        "secrets:\n  TOKEN: vault://kv/token\n",
        2,
        10,
        "secrets.TOKEN: unsupported secret backend \"vault://\"",
    ),
    // 22. a secret value instead of a reference
    (
        "secrets:\n  TOKEN: sk-live-abc\n",
        2,
        10,
        "a secret must be a reference to a secret store, not a value",
    ),
    // 23. malformed op reference
    (
        "secrets:\n  TOKEN: op://vault/item\n",
        2,
        10,
        "must look like op://vault/item/field",
    ),
    // 24. malformed ssm reference
    (
        "secrets:\n  TOKEN: ssm://\n",
        2,
        10,
        "must look like ssm:///path or ssm://region/path",
    ),
    // 25. key in env and secrets
    (
        "env:\n  API_KEY: x\nsecrets:\n  API_KEY: op://a/b/c\n",
        4,
        3,
        "\"API_KEY\" is in both env and secrets; keep one",
    ),
    // 26. unknown grant provider with suggestion
    (
        "grants:\n  - githb\n",
        2,
        5,
        "unknown grant provider \"githb\" (did you mean \"github\"?)",
    ),
    // 27. ssh grant without host
    (
        "grants:\n  - ssh\n",
        2,
        5,
        "ssh grants name a host, as in \"ssh:github.com\"",
    ),
    // 28. ssh grant with wildcard
    (
        "grants:\n  - ssh:*.github.com\n",
        2,
        5,
        "ssh grants name one host, without wildcards or a port",
    ),
    // 29. scope on a provider that has none
    (
        "grants:\n  - openai:admin\n",
        2,
        5,
        "openai grants take no scope",
    ),
    // 30. duplicate top-level key
    (
        "name: a\nenv: {}\nname: b\n",
        3,
        1,
        "duplicate key \"name\" (first defined at line 1)",
    ),
    // 31. duplicate nested key
    (
        "ports:\n  web: 3000\n  web: 3001\n",
        3,
        3,
        "duplicate key \"web\" (first defined at line 2)",
    ),
    // 32. bad policy name with suggestion
    (
        "network:\n  policy: strcit\n",
        2,
        11,
        "network.policy: unknown network policy \"strcit\" (did you mean \"strict\"?)",
    ),
    // 33. bad policy name without suggestion
    (
        "network:\n  policy: paranoid\n",
        2,
        11,
        "unknown network policy \"paranoid\" (expected \"permissive\" or \"strict\")",
    ),
    // 34. malformed allow pattern: wildcard in the middle
    (
        "network:\n  allow:\n    - \"api.*.com\"\n",
        3,
        7,
        "\"*\" may only stand at the left",
    ),
    // 35. allow pattern with a scheme
    (
        "network:\n  allow:\n    - https://api.github.com\n",
        3,
        7,
        "must be a host name, not a url",
    ),
    // 36. allow pattern that matches everything
    (
        "network:\n  allow: [\"*\"]\n",
        2,
        11,
        "matches every host; use policy: permissive instead",
    ),
    // 37. allow pattern with a bad port
    (
        "network:\n  allow: [\"api.github.com:99999\"]\n",
        2,
        11,
        "port \"99999\" is not a number from 1 to 65535",
    ),
    // 38. YAML syntax error
    ("name: a\nenv:\n  A: [1, 2\n", 4, 1, "invalid yaml"),
    // 39. bad indentation / tab
    ("env:\n  A: 1\n\tB: 2\n", 3, 1, "invalid yaml"),
    // 40. interactive not a boolean
    (
        "interactive: yes\n",
        1,
        14,
        "interactive: expected true or false, found a string",
    ),
    // 41. command as a shell string
    (
        "command: npm start\n",
        1,
        10,
        "command: expected a list such as [\"npm\", \"start\"]",
    ),
    // 42. empty command
    ("command: []\n", 1, 10, "command: empty list"),
    // 43. unknown dependency with suggestion
    (
        "dependencies:\n  - nodejs@20\n",
        2,
        5,
        "unknown dependency \"nodejs\" (did you mean \"node\"?)",
    ),
    // 44. bad dependency version
    (
        "dependencies:\n  - node@\n",
        2,
        5,
        "dependency \"node@\": \"\" is not a version",
    ),
    // 45. a tool with a version
    (
        "dependencies:\n  - node@20\n  - git@2.40\n",
        3,
        5,
        "dependency \"git@2.40\": git is a tool, installed from the base image's Debian packages; it takes no version",
    ),
    // 46. invalid env key
    (
        "env:\n  1BAD: x\n",
        2,
        3,
        "env: \"1BAD\" is not a valid environment variable name",
    ),
    // 47. reserved env key
    (
        "env:\n  HTTPS_PROXY: http://evil:3128\n",
        2,
        3,
        "env: \"HTTPS_PROXY\" is set by moat and cannot be overridden",
    ),
    // 48. env with no value
    ("env:\n  EMPTY:\n", 2, 3, "env.EMPTY: no value"),
    // 49. root is a list
    (
        "- name: a\n",
        1,
        1,
        "expected a mapping of fields (name, grants, ...), found a list",
    ),
    // 50. two documents
    (
        "name: a\n---\nname: b\n",
        2,
        1,
        "expected one yaml document, found several",
    ),
    // 51. image with whitespace
    (
        "image: \"node 20\"\n",
        1,
        8,
        "image: \"node 20\" is not an image reference",
    ),
    // 52. mapping used as key
    (
        "? [a, b]\n: 1\n",
        1,
        3,
        "mapping keys must be plain strings",
    ),
    // 53. a NUL byte, which yaml-rust2 takes for the end of the document:
    // the rest of the file (a grant here) would be lost without a word.
    (
        "name: a\0b\ngrants: [github]\n",
        1,
        8,
        "a NUL byte (U+0000), which yaml does not allow",
    ),
    // 54. other control characters, anywhere
    (
        "name: ok\nenv:\n  A: \"x\u{7}y\"\n",
        3,
        8,
        "control character U+0007",
    ),
    // 55. a C1 control character in a comment
    ("name: ok # \u{9b}\n", 1, 12, "control character U+009B"),
];

#[test]
fn invalid_configs_are_located() {
    assert!(INVALID.len() >= 30);
    let mut failures = Vec::new();
    for (i, (text, line, column, needle)) in INVALID.iter().enumerate() {
        let err = match parse(text) {
            Ok(_) => {
                failures.push(format!("#{}: accepted, expected {needle:?}\n{text}", i + 1));
                continue;
            }
            Err(e) => e,
        };
        assert!(err.is_config(), "#{}: kind {:?}", i + 1, err.kind());
        let loc = err.location().cloned();
        let got = err.to_string();
        let want_prefix = format!("agent.yaml:{line}:{column}: ");
        if !got.starts_with(&want_prefix) || !got.to_lowercase().contains(&needle.to_lowercase()) {
            failures.push(format!(
                "#{}: got {got:?}\n   want {want_prefix}...{needle}",
                i + 1
            ));
        }
        assert!(loc.is_some(), "#{}: no location", i + 1);
        assert_eq!(
            err.diagnostics().len(),
            1,
            "#{}: {:?}",
            i + 1,
            err.diagnostics()
        );
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn all_problems_are_reported_in_file_order() {
    let err = parse("name: Bad\nports:\n  web: 0\ngrnats: []\n").unwrap_err();
    let lines: Vec<u32> = err
        .diagnostics()
        .iter()
        .map(|d| d.location.as_ref().unwrap().line)
        .collect();
    assert_eq!(lines, [1, 3, 4]);
}

#[test]
fn merge_cli_over_file_over_defaults() {
    let file = ok("name: from-file\nimage: base:1\ngrants: [github]\nenv:\n  A: file\n  B: file\ncommand: [npm, start]\n");
    let merged = file
        .merge(&Overrides {
            name: Some("from-cli".into()),
            image: None,
            grants: vec!["anthropic,github".into(), "ssh:github.com".into()],
            env: vec!["B=cli".into(), "C=x=y".into()],
            command: Some(vec!["npm".into(), "test".into()]),
            interactive: Some(true),
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(merged.name.as_deref(), Some("from-cli"));
    assert_eq!(merged.image.as_deref(), Some("base:1"));
    let grants: Vec<String> = merged.grants.iter().map(ToString::to_string).collect();
    assert_eq!(grants, ["github", "anthropic", "ssh:github.com"]);
    assert_eq!(merged.env["A"], "file");
    assert_eq!(merged.env["B"], "cli");
    assert_eq!(merged.env["C"], "x=y");
    assert_eq!(merged.command.unwrap(), ["npm", "test"]);
    assert!(merged.interactive);
}

#[test]
fn merge_empty_command_keeps_file_command() {
    let merged = ok("command: [a]\n")
        .merge(&Overrides {
            command: Some(vec![]),
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(merged.command.unwrap(), ["a"]);
}

/// The merge problems of bad overrides, one per line, in `spelling`.
fn merge_problems(spelling: Spelling) -> String {
    let err = ok("secrets:\n  TOKEN: op://a/b/c\n")
        .merge(&Overrides {
            name: Some("Bad_Name".into()),
            grants: vec!["githb".into(), "github,".into()],
            env: vec![
                "NOEQUALS".into(),
                "TOKEN=supersecretvalue".into(),
                "1X=alsosecret".into(),
            ],
            image: Some("".into()),
            policy: Some("lax".into()),
            allow: vec!["*".into()],
            runtime: Some("lxc".into()),
            spelling,
            ..Overrides::default()
        })
        .unwrap_err();
    assert!(err.is_invalid_argument());
    let all: Vec<String> = err.diagnostics().iter().map(ToString::to_string).collect();
    let text = all.join("\n");
    assert!(
        !text.contains("supersecretvalue") && !text.contains("alsosecret"),
        "{text}"
    );
    assert_eq!(all.len(), 10, "{text}");
    text
}

#[test]
fn merge_errors_name_the_flag_and_never_echo_values() {
    let text = merge_problems(Spelling::Flags);
    for want in [
        "--name: invalid agent name \"Bad_Name\"",
        "--grant githb: unknown grant provider \"githb\" (did you mean \"github\"?)",
        "--grant github,: empty grant name",
        "-e NOEQUALS: expected KEY=VALUE",
        "-e TOKEN: \"TOKEN\" is also a secret",
        "-e 1X:",
        "--image: empty image name",
        "--policy: ",
        "--allow * (allow[0]): ",
        "--runtime: ",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
}

/// The libraries (Python's keywords, C's option keys) get the problems
/// named by the configuration's fields, never by the CLI's flags.
#[test]
fn merge_errors_for_the_libraries_name_the_field() {
    let text = merge_problems(Spelling::Fields);
    for want in [
        "name: invalid agent name \"Bad_Name\"",
        "grants \"githb\": unknown grant provider \"githb\" (did you mean \"github\"?)",
        "grants \"github,\": empty grant name",
        "env.NOEQUALS: expected KEY=VALUE",
        "env.TOKEN: \"TOKEN\" is also a secret",
        "env.1X:",
        "image: empty image name",
        "network.policy: ",
        "network.allow[0] \"*\": ",
        "runtime: ",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
    assert!(!text.contains("--") && !text.contains("-e "), "{text}");
}

#[test]
fn resolved_view_serializes() {
    let c = ok(SEED_README);
    let json = serde_json::to_value(c.resolved().unwrap()).unwrap();
    assert_eq!(json["image"], "node:20-bookworm");
    assert_eq!(json["image_source"], "dependencies");
    assert_eq!(json["network"]["policy"], "strict");
    assert_eq!(json["network"]["allow"][1], "*.amazonaws.com");
    assert_eq!(json["mounts"][0]["mode"], "ro");
    assert_eq!(json["grants"][0], "github:repo");
    assert_eq!(
        json["secrets"]["DATABASE_URL"],
        "ssm:///production/database/url"
    );
    assert_eq!(json["command"][1], "start");
    let yaml = serde_yaml::to_string(&c.resolved().unwrap()).unwrap();
    assert!(yaml.contains("image: node:20"), "{yaml}");
}

#[test]
fn load_finds_files_and_refuses_both() {
    let dir = tempfile::tempdir().unwrap();
    let c = load(dir.path()).unwrap();
    assert!(c.config_file.is_none());
    assert!(c.workspace.is_absolute());

    std::fs::write(dir.path().join("moat.yaml"), "name: from-moat\n").unwrap();
    assert_eq!(load(dir.path()).unwrap().name.as_deref(), Some("from-moat"));

    std::fs::write(dir.path().join("agent.yaml"), "name: from-agent\n").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.is_config());
    assert!(
        err.to_string()
            .ends_with("both agent.yaml and moat.yaml exist; keep one of them"),
        "{err}"
    );

    // A path to the file itself chooses it.
    let c = load(&dir.path().join("agent.yaml")).unwrap();
    assert_eq!(c.name.as_deref(), Some("from-agent"));
    assert_eq!(c.workspace, std::fs::canonicalize(dir.path()).unwrap());
}

#[test]
fn load_locates_errors_with_the_given_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, "name: ok\nports:\n  web: 99999\n").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert_eq!(err.location().unwrap().path, file);
    assert_eq!(err.location().unwrap().line, 3);
}

#[test]
fn load_refuses_non_utf8_and_huge_files_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, b"name: a\nenv:\n  X: \xff\xfe\n").unwrap();
    let err = load(dir.path()).unwrap_err();
    let loc = err.location().unwrap();
    assert_eq!((loc.line, loc.column), (3, 6), "{err}");
    assert!(err.message().contains("not valid utf-8"));

    std::fs::write(&file, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("may be at most"), "{err}");
}

#[test]
fn load_refuses_a_config_file_it_cannot_read() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    // A symlink loop, a dangling symlink, a FIFO (which would block a read)
    // and a directory: each is there, so none may be taken for "no file".
    type Make<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Make<'_>)> = vec![
        (
            "symbolic links",
            Box::new(|| {
                symlink(dir.path().join("loop2"), dir.path().join("agent.yaml")).unwrap();
                symlink(dir.path().join("agent.yaml"), dir.path().join("loop2")).unwrap();
            }),
        ),
        (
            "no such file",
            Box::new(|| symlink(dir.path().join("gone"), dir.path().join("agent.yaml")).unwrap()),
        ),
        (
            "not a regular file",
            Box::new(|| {
                let c = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            }),
        ),
        (
            "not a regular file",
            Box::new(|| std::fs::create_dir(dir.path().join("agent.yaml")).unwrap()),
        ),
    ];
    for (want, make) in cases {
        let _ = std::fs::remove_file(dir.path().join("loop2"));
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir(&file);
        make();
        let started = std::time::Instant::now();
        let err = load(dir.path()).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let text = err.to_string();
        assert!(text.contains("agent.yaml"), "{text}");
        assert!(text.contains(want), "want {want:?}: {text}");
        assert!(text.contains("cannot read"), "{text}");
    }
    // No permission (root reads anything, so only as another user).
    let _ = std::fs::remove_dir(&file);
    std::fs::write(&file, "name: secret\nnetwork: {policy: strict}\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&file).is_err() {
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{err}");
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(load(dir.path()).unwrap().name.as_deref(), Some("secret"));
}

#[test]
fn empty_items_in_override_lists_are_refused() {
    let base = Config::defaults(Path::new("/ws"));
    for grants in [
        vec!["github,,".to_string()],
        vec![",github".into()],
        vec!["".into()],
    ] {
        let err = base
            .clone()
            .merge(&Overrides {
                grants: grants.clone(),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("empty grant"), "{grants:?}: {err}");
    }
    let ok = base
        .merge(&Overrides {
            grants: vec!["github, anthropic".into()],
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(ok.grants.len(), 2);
}

#[test]
fn load_missing_workspace_is_io_error() {
    let err = load(Path::new("/nonexistent/moat-ws")).unwrap_err();
    assert!(err.is_io());
    assert_eq!(
        err.to_string(),
        "/nonexistent/moat-ws: cannot open workspace: no such file or directory"
    );
}

#[test]
fn an_empty_value_at_the_end_is_located_inside_the_file() {
    // Found by the fuzzer: a null document root at the end of the text.
    let err = parse("&ame: \0r").unwrap_err();
    for d in err.diagnostics() {
        assert_eq!(d.location.as_ref().unwrap().line, 1, "{d}");
    }
    let err = parse("name:").unwrap_err();
    assert_eq!(err.location().unwrap().line, 1, "{err}");
}

#[test]
fn claude_version_is_read_and_checked_where_it_is() {
    let c = ok("claude:\n  version: 2.1.332\n");
    assert_eq!(c.claude_version.as_deref(), Some("2.1.332"));
    assert_eq!(c.resolved().unwrap().claude_version, Some("2.1.332"));
    let err = parse("claude:\n  version: \"1; rm -rf /\"\n")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("agent.yaml:2:12")
            && err.contains("claude.version")
            && err.contains("not a version"),
        "{err}"
    );
    let err = parse("claude:\n  verison: 1\n")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("agent.yaml:2:3") && err.contains("claude.verison") && err.contains("version"),
        "{err}"
    );
    let err = parse("claude: 2\n").map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("claude"), "{err}");
}

#[test]
fn network_rules_are_read_with_their_places() {
    let c = ok("network:\n  policy: strict\n  rules:\n    - pypi.org\n    - api.github.com:\n        - allow GET /repos/**\n        - deny git-push refs/heads/main\n");
    assert_eq!(c.network.rules.len(), 2);
    assert!(c.network.rules[0].rules.is_empty());
    assert_eq!(
        c.network.rules[1].rules[1].text,
        "deny git-push refs/heads/main"
    );
    // Round trip through the plan's JSON.
    let json = serde_json::to_string(&c.network).unwrap_or_default();
    let back: Network = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(back, c.network);
    let err = parse("network:\n  rules:\n    - api.github.com:\n        - allow GET repos\n")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("agent.yaml:4:11") && err.contains("must start with /"),
        "{err}"
    );
    let err = parse("network:\n  rules:\n    - {a.test: [], b.test: []}\n")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("agent.yaml:3:7") && err.contains("a host with its rules"),
        "{err}"
    );
}

/// A mount goes to the supervisor inside the run plan as JSON and must come
/// back as it was (it once came back as an error, and no run with `mounts:`
/// could start).
#[test]
fn mounts_survive_a_round_trip_through_json() {
    let ws = Path::new("/ws");
    for text in ["./data:/data:ro", "/abs:/x", "/abs:/y:rw"] {
        let m = Mount::parse(text, ws).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let back: Mount = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m, "{text}: {json}");
    }
    let bad = serde_json::from_str::<Mount>(r#"{"source":"/a","target":"/b","mode":"rx"}"#)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("neither ro nor rw"), "{bad}");
}
