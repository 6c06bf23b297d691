use std::collections::BTreeMap;
use std::sync::Mutex;

use super::build::{Script, Watch};
use super::*;
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{Runtime, BUILT_LABEL, HOME_LABEL, RUN_LABEL};

fn deps(list: &[&str]) -> Vec<Dependency> {
    list.iter()
        .map(|d| parse(d).unwrap_or_else(|e| panic!("{d}: {e}")).1)
        .collect()
}

fn recipe(list: &[&str]) -> Recipe {
    plan(&deps(list), "", "ubuntu:22.04").unwrap_or_else(|| panic!("no recipe for {list:?}"))
}

#[test]
fn one_runtime_is_its_official_bookworm_image() {
    for (dep, image) in [
        ("node@20", "node:20-bookworm"),
        ("python@3.11", "python:3.11-bookworm"),
        ("go@1.22", "golang:1.22-bookworm"),
        ("go@1.22.5", "golang:1.22.5-bookworm"),
        ("node", "node:bookworm"),
    ] {
        let r = recipe(&[dep]);
        assert_eq!(r.image, image, "{dep}");
        assert!(!r.is_built(), "{dep}");
        assert_eq!(r.base.dependency.as_deref(), Some(dep));
    }
    let r = plan(&deps(&["python@3.11"]), "localhost:5000/library/", "x").unwrap();
    assert_eq!(r.image, "localhost:5000/library/python:3.11-bookworm");
    assert!(plan(&[], "", "ubuntu:22.04").is_none());
}

#[test]
fn several_runtimes_make_one_image_on_the_first() {
    let r = recipe(&["node@20", "python@3.11", "go@1.22"]);
    assert!(r.is_built());
    let hash = r.image.strip_prefix("moat-deps:").unwrap();
    assert_eq!(hash.len(), 16);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(r.base.image, "node:20-bookworm");
    assert_eq!(r.base.dependency.as_deref(), Some("node@20"));
    let copied: Vec<(&str, &str)> = r
        .copies
        .iter()
        .map(|c| (c.dependency.as_str(), c.image.as_str()))
        .collect();
    assert_eq!(
        copied,
        [
            ("python@3.11", "python:3.11-bookworm"),
            ("go@1.22", "golang:1.22-bookworm")
        ]
    );
    assert_eq!(r.copies[0].paths, ["/usr/local/bin", "/usr/local/lib"]);
    assert_eq!(r.copies[1].paths, ["/usr/local/go"]);
    assert_eq!(r.copies[1].paths_if_present, ["/go"]);
    assert_eq!(
        r.env,
        [
            "PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "GOPATH=/go",
            "GOTOOLCHAIN=local"
        ]
    );
    assert_eq!(r.cmd, ["node"]);
    let checks: Vec<&str> = r.checks.iter().map(|c| c.command.as_str()).collect();
    assert_eq!(
        checks,
        [
            "node --version",
            "python3 -c 'import sys, ssl, sqlite3, ctypes, zlib, bz2, lzma; print(\"Python\", sys.version.split()[0])'",
            "go version"
        ]
    );
}

#[test]
fn the_tag_is_a_hash_of_the_content() {
    let a = recipe(&["node@20", "python@3.11"]).image;
    assert_eq!(a, recipe(&["node@20", "python@3.11"]).image, "stable");
    // The same for the same content: the tag of today's recipe is pinned
    // here, so that a change to what is hashed is a deliberate one.
    let others = [
        recipe(&["node@20", "python@3.12"]).image,
        recipe(&["python@3.11", "node@20"]).image,
        recipe(&["node@22", "python@3.11"]).image,
        recipe(&["node@20", "python@3.11", "git"]).image,
        plan(&deps(&["node@20", "python@3.11"]), "mirror.local/lib", "x")
            .unwrap()
            .image,
    ];
    for other in &others {
        assert_ne!(&a, other);
    }
    // Tools are a set: their order does not matter.
    assert_eq!(
        recipe(&["node@20", "git", "jq"]).image,
        recipe(&["jq", "node@20", "git"]).image
    );
    // The default base matters only without a runtime.
    assert_eq!(
        plan(&deps(&["node@20", "git"]), "", "a").unwrap().image,
        plan(&deps(&["node@20", "git"]), "", "b").unwrap().image
    );
    assert_ne!(
        plan(&deps(&["git"]), "", "a").unwrap().image,
        plan(&deps(&["git"]), "", "b").unwrap().image
    );
}

#[test]
fn tools_alone_are_built_on_the_default_image() {
    let r = recipe(&["ripgrep", "git"]);
    assert!(r.is_built());
    assert_eq!(r.base.image, "ubuntu:22.04");
    assert_eq!(r.base.dependency, None);
    let tools: Vec<&str> = r.tools.iter().map(|t| t.dependency.as_str()).collect();
    assert_eq!(tools, ["git", "ripgrep"]);
    assert_eq!(r.tools[0].packages, ["git", "ca-certificates"]);
    assert_eq!(r.cmd, ["bash"]);
    assert!(r.env.is_empty());
}

#[test]
fn parse_names_what_is_wrong() {
    let err = |text: &str| parse(text).map(|_| ()).unwrap_err();
    let e = err("nodejs@20");
    assert!(
        e.starts_with("unknown dependency \"nodejs\" (did you mean \"node\"?)"),
        "{e}"
    );
    assert!(e.contains("moat deps list"), "{e}");
    let e = err("git@2.40");
    assert!(
        e.contains("git is a tool") && e.contains("takes no version"),
        "{e}"
    );
    for bad in [
        "node@",
        "node@20-alpine",
        "python@3.11.9.1",
        "go@latest",
        "go@1..2",
    ] {
        let e = err(bad);
        assert!(e.contains("is not a version of"), "{bad}: {e}");
    }
    assert!(parse("python@3.11.9").is_ok());
    assert!(parse("ripgrep").is_ok());
}

#[test]
fn describe_says_where_a_runtime_comes_from() {
    let go = find("go").unwrap().describe(Some("1.22"), "");
    assert_eq!(go.image.as_deref(), Some("golang:1.22-bookworm"));
    assert_eq!(go.image_without_version.as_deref(), Some("golang:bookworm"));
    assert_eq!(go.copies, ["/usr/local/go"]);
    let rg = find("ripgrep").unwrap().describe(None, "");
    assert_eq!(rg.packages, ["ripgrep"]);
    assert!(rg.image.is_none());
}

fn run_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (RUN_LABEL.to_string(), "run_0123456789ab".to_string()),
        (HOME_LABEL.to_string(), "/home/moat".to_string()),
    ])
}

fn messages() -> (
    std::sync::Arc<Mutex<Vec<String>>>,
    impl Fn(&str) + Send + Sync,
) {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (seen, move |m: &str| {
        sink.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m.to_string())
    })
}

/// The calls that made something, without their container ids.
fn steps(fake: &FakeRuntime) -> Vec<String> {
    fake.calls()
        .into_iter()
        .filter(|c| !c.starts_with("image_id"))
        .map(|c| {
            c.split(' ')
                .map(|w| {
                    if w.len() == 12 && w.starts_with('c') {
                        "C"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[tokio::test]
async fn builds_in_order_and_leaves_only_the_image() {
    let fake = FakeRuntime::default();
    let r = recipe(&["node@20", "python@3.11", "go@1.22"]);
    let (seen, progress) = messages();
    let id = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!id.is_empty());
    assert_eq!(
        steps(&fake),
        [
            "pull_image node:20-bookworm",
            "pull_image python:3.11-bookworm",
            "pull_image golang:1.22-bookworm",
            "create_container ",
            // python@3.11, from a container of its image.
            "create_container ",
            "get_archive C /usr/local/bin",
            "put_archive C /usr/local",
            "get_archive C /usr/local/lib",
            "put_archive C /usr/local",
            "get_archive C /usr/local/include",
            "put_archive C /usr/local",
            "remove C",
            // go@1.22.
            "create_container ",
            "get_archive C /usr/local/go",
            "put_archive C /usr/local",
            "get_archive C /go",
            "put_archive C /",
            "remove C",
            // The script, then the image.
            "attach_output C",
            "start C",
            "wait C",
            &format!("commit C {}", r.image),
            "remove C",
        ]
    );
    assert!(fake.containers().is_empty(), "{:?}", fake.containers());
    let built = fake
        .images_with_label(&format!("{BUILT_LABEL}=/home/moat"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(built.len(), 1);
    assert_eq!(built[0].tags, vec![r.image.clone()]);
    assert_eq!(
        built[0].labels.get("dev.moat.deps").map(String::as_str),
        Some("node@20 python@3.11 go@1.22")
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen[0].starts_with(&format!("Building image {}", r.image)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|m| m.starts_with("Copied python@3.11")),
        "{seen:?}"
    );
    assert!(seen.last().unwrap().starts_with("Built image"), "{seen:?}");

    // Reused at once: one look, nothing made.
    let before = fake.calls().len();
    let again = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, id);
    assert_eq!(
        fake.calls()[before..],
        [format!("image_id {}", r.image)],
        "a second run builds nothing"
    );
}

#[tokio::test]
async fn one_runtime_is_pulled_not_built() {
    let fake = FakeRuntime::default();
    let r = recipe(&["python@3.11"]);
    let (_, progress) = messages();
    ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(steps(&fake), ["pull_image python:3.11-bookworm"]);
}

#[tokio::test]
async fn a_pull_that_fails_names_the_dependency() {
    let fake = FakeRuntime::default();
    fake.add_image("node:20-bookworm", "sha256:node");
    fake.fail("pull_image", "manifest unknown");
    let r = recipe(&["node@20", "python@3.99"]);
    let (_, progress) = messages();
    let e = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dependencies: python@3.99: cannot pull python:3.99-bookworm: "),
        "{e}"
    );
    assert!(e.contains("manifest unknown"), "{e}");
    assert!(e.contains("moat deps info python"), "{e}");
    assert!(e.contains(REGISTRY_ENV), "{e}");
    assert!(fake.containers().is_empty());

    // Alone, too.
    let e = ensure(&fake, &recipe(&["go@1.99"]), &run_labels(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dependencies: go@1.99: cannot pull golang:1.99-bookworm"),
        "{e}"
    );
}

#[tokio::test]
async fn a_runtime_missing_from_its_image_is_named_and_nothing_is_left() {
    let fake = FakeRuntime::default();
    fake.remove_path("golang:1.22-bookworm", "/usr/local/go");
    // An optional directory may be missing.
    fake.remove_path("python:3.11-bookworm", "/usr/local/include");
    let r = recipe(&["node@20", "python@3.11", "go@1.22"]);
    let (_, progress) = messages();
    let e = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dependencies: go@1.22: golang:1.22-bookworm has no /usr/local/go"),
        "{e}"
    );
    assert!(fake.containers().is_empty(), "{:?}", fake.containers());
    assert!(!fake.images().iter().any(|(t, _)| *t == r.image));

    let fake = FakeRuntime::default();
    fake.fail("put_archive", "no space left on device");
    let e = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "dependencies: python@3.11: copying /usr/local/bin from python:3.11-bookworm: "
        ),
        "{e}"
    );
    assert!(e.contains("no space left on device"), "{e}");
    assert!(fake.containers().is_empty(), "{:?}", fake.containers());
}

#[tokio::test]
async fn a_failed_step_of_the_script_names_its_dependency() {
    let r = recipe(&["node@20", "python@3.11", "ripgrep"]);
    let script = Script::of(&r);
    let install = script
        .steps
        .iter()
        .position(|s| s.who == "ripgrep" && s.what.starts_with("apt-get install"))
        .unwrap();
    let fake = FakeRuntime::default();
    fake.set_build_result(
        100,
        &format!(
            "::moat-step {install}\n::moat Installing ripgrep\nReading package lists...\nE: Unable to locate package ripgrep\n"
        ),
    );
    let (seen, progress) = messages();
    let e = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dependencies: ripgrep: apt-get install ripgrep failed in the build container (exit 100): "),
        "{e}"
    );
    assert!(e.contains("E: Unable to locate package ripgrep"), "{e}");
    assert!(fake.containers().is_empty());
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|m| m == "Installing ripgrep"));

    let check = script
        .steps
        .iter()
        .position(|s| s.who == "python@3.11" && s.what.starts_with('`'))
        .unwrap();
    let fake = FakeRuntime::default();
    fake.set_build_result(
        1,
        &format!("::moat-step {check}\npython3: error while loading shared libraries\n"),
    );
    let e = ensure(&fake, &r, &run_labels(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("dependencies: python@3.11: `python3 -c 'import sys, ssl"),
        "{e}"
    );
    assert!(e.contains("copied from python:3.11-bookworm"), "{e}");
}

#[test]
fn the_script_marks_each_step() {
    let r = recipe(&["node@20", "go@1.22", "git"]);
    let script = Script::of(&r);
    let who: Vec<&str> = script.steps.iter().map(|s| s.who.as_str()).collect();
    assert_eq!(who, ["go@1.22", "git", "git", "node@20", "go@1.22", "git"]);
    for n in 0..script.steps.len() {
        assert!(
            script.text.contains(&format!("echo '::moat-step {n}'")),
            "step {n}:\n{}",
            script.text
        );
    }
    // A tool the base has is not installed again.
    assert!(script
        .text
        .contains("if ! ( git --version ) >/dev/null 2>&1; then"));
    assert!(script
        .text
        .contains("apt-get install -y --no-install-recommends git ca-certificates"));
    let checked = std::process::Command::new("sh")
        .args(["-n", "-c", &script.text])
        .status()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    assert!(checked.success(), "{}", script.text);
}

#[test]
fn watch_reads_steps_progress_and_the_last_lines() {
    let (seen, progress) = messages();
    let mut watch = Watch::default();
    watch.feed(0, b"::moat-step 3\n::moat Install", &progress);
    watch.feed(1, b"E: bro", &progress);
    watch.feed(0, b"ing jq\r\n", &progress);
    watch.feed(1, b"ken\n", &progress);
    for n in 0..20 {
        watch.feed(1, format!("line {n}\n").as_bytes(), &progress);
    }
    watch.feed(0, b"last words", &progress);
    watch.finish(&progress);
    assert_eq!(watch.step, Some(3));
    assert_eq!(*seen.lock().unwrap(), ["Installing jq"]);
    assert_eq!(watch.tail.len(), 12);
    assert_eq!(watch.tail.back().map(String::as_str), Some("last words"));
    assert!(!watch.tail.iter().any(|l| l.starts_with("::moat")));
}

#[test]
fn the_registry_variable_is_read_or_refused_never_ignored() {
    use std::os::unix::ffi::OsStrExt;
    assert_eq!(registry_from(None).unwrap(), "");
    assert_eq!(
        registry_from(Some(std::ffi::OsStr::new(" localhost:5000/library/ "))).unwrap(),
        "localhost:5000/library"
    );
    // Not UTF-8: an error naming the variable, not a pull from elsewhere.
    let e = registry_from(Some(std::ffi::OsStr::from_bytes(b"mirror\xff/lib"))).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
    let e = e.to_string();
    assert!(e.contains(REGISTRY_ENV), "{e}");
    assert!(e.contains("not UTF-8"), "{e}");
}
