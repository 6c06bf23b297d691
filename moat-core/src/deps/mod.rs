//! Dependencies: what `dependencies:` in agent.yaml may name, and the one
//! image they make.
//!
//! **Runtimes** (`node`, `python`, `go`) come from their official images,
//! always in their Debian 12 (bookworm) variant: `node@20` is
//! `node:20-bookworm`, `go@1.22` is `golang:1.22-bookworm`, and a runtime
//! without a version is the image's newest (`node:bookworm`). One runtime
//! alone is its image, used as it is.
//!
//! **Several runtimes** make one image, which moat builds: the first
//! runtime's image is the base, and each further runtime is copied in from a
//! container of its own image. The official images keep a runtime in a few
//! directories ([`Known::copy`]: `/usr/local/bin` and `/usr/local/lib` for
//! Python, `/usr/local/go` for Go, ...), built against the same Debian
//! release as the base, so that the shared libraries they link to are
//! there. The built image's environment adds what each runtime needs
//! (`PATH`, `GOPATH`, ...), and every runtime's version command must run in
//! it before it is committed.
//!
//! **Tools** (`git`, `ripgrep`, ...) are Debian packages, installed with
//! apt-get in the build container, which then needs the Debian (or Ubuntu)
//! mirror through the engine's default network. A tool whose command the
//! base image already has is not installed again. With tools and no runtime
//! the base is moat's default image.
//!
//! **The tag** of a built image is `moat-deps:<hash>`, a hash of its
//! [`Recipe`]: the images, what is copied, the tools, the environment and
//! the checks. [`plan`] is pure (`moat config` shows the tag); [`ensure`]
//! builds the image on an engine, or finds it there and uses it at once.
//! The images it is built from are pulled when missing and never refreshed
//! by moat, as with any image a run uses.
//!
//! **Mirrors.** [`REGISTRY_ENV`] (`MOAT_DEPS_REGISTRY=mirror.example/library`)
//! puts a prefix before every runtime image's name.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod build;

pub use build::ensure;

#[cfg(test)]
mod tests;

/// The variable that puts a registry (and path) before every runtime
/// image's name: `MOAT_DEPS_REGISTRY=localhost:5000/library` makes `node@20`
/// `localhost:5000/library/node:20-bookworm`.
pub const REGISTRY_ENV: &str = "MOAT_DEPS_REGISTRY";

/// The Debian release of every runtime image.
pub const DEBIAN: &str = "bookworm";

/// The repository of images moat builds from several dependencies.
pub const IMAGE_REPOSITORY: &str = "moat-deps";

/// The `PATH` of a built image that adds directories to it: Debian's.
const STANDARD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bumped when the way an image is built changes, so that images built the
/// old way are not taken for new ones.
const RECIPE_FORMAT: u32 = 1;

/// What a dependency is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A language runtime, from its official image.
    Runtime,
    /// A tool, from the base image's Debian packages.
    Tool,
}

impl Kind {
    /// `runtime` or `tool`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Runtime => "runtime",
            Kind::Tool => "tool",
        }
    }
}

/// A dependency moat knows.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    /// Its name in `dependencies:` (`go`).
    pub name: &'static str,
    /// Runtime or tool.
    pub kind: Kind,
    /// What it is, in a few words.
    pub about: &'static str,
    /// A runtime's official image repository (`golang`); empty for a tool.
    pub repository: &'static str,
    /// Examples of versions it takes; empty for a tool (it takes none).
    pub versions: &'static [&'static str],
    /// A runtime's directories, copied from its image when it is not the
    /// first runtime; each must be there.
    pub copy: &'static [&'static str],
    /// Directories copied too when its image has them.
    pub copy_if_present: &'static [&'static str],
    /// Directories put before `PATH` in a built image.
    pub path: &'static [&'static str],
    /// Other variables set in a built image.
    pub env: &'static [(&'static str, &'static str)],
    /// The default command of an image built on a runtime's image.
    pub cmd: &'static [&'static str],
    /// A tool's Debian packages.
    pub packages: &'static [&'static str],
    /// A shell command that must run in a built image (it prints the
    /// version); a tool is installed only when it does not run already.
    pub check: &'static str,
}

/// Nothing: what a dependency's fields are unless it says otherwise.
const NONE: Known = Known {
    name: "",
    kind: Kind::Tool,
    about: "",
    repository: "",
    versions: &[],
    copy: &[],
    copy_if_present: &[],
    path: &[],
    env: &[],
    cmd: &[],
    packages: &[],
    check: "",
};

/// Every dependency moat knows: the runtimes, then the tools.
pub const KNOWN: &[Known] = &[
    Known {
        name: "node",
        kind: Kind::Runtime,
        about: "Node.js, with npm (and corepack and yarn where its image has them)",
        repository: "node",
        versions: &["20", "20.11", "20.11.1"],
        copy: &["/usr/local/bin", "/usr/local/lib/node_modules"],
        copy_if_present: &["/usr/local/include/node", "/opt"],
        cmd: &["node"],
        check: "node --version",
        ..NONE
    },
    Known {
        name: "python",
        kind: Kind::Runtime,
        about: "Python (CPython), with pip",
        repository: "python",
        versions: &["3.12", "3.11", "3.11.9"],
        copy: &["/usr/local/bin", "/usr/local/lib"],
        copy_if_present: &["/usr/local/include"],
        env: &[("LANG", "C.UTF-8")],
        cmd: &["python3"],
        // Its extension modules' libraries too, not just the interpreter.
        check: "python3 -c 'import sys, ssl, sqlite3, ctypes, zlib, bz2, lzma; print(\"Python\", sys.version.split()[0])'",
        ..NONE
    },
    Known {
        name: "go",
        kind: Kind::Runtime,
        about: "Go, its toolchain in /usr/local/go, GOPATH=/go",
        repository: "golang",
        versions: &["1.22", "1.22.5"],
        copy: &["/usr/local/go"],
        copy_if_present: &["/go"],
        path: &["/go/bin", "/usr/local/go/bin"],
        env: &[("GOPATH", "/go"), ("GOTOOLCHAIN", "local")],
        cmd: &["bash"],
        check: "go version",
        ..NONE
    },
    Known {
        name: "build-essential",
        about: "gcc, g++, make and the C library's headers",
        packages: &["build-essential"],
        check: "gcc --version",
        ..NONE
    },
    Known {
        name: "curl",
        about: "curl",
        packages: &["curl", "ca-certificates"],
        check: "curl --version",
        ..NONE
    },
    Known {
        name: "git",
        about: "git",
        packages: &["git", "ca-certificates"],
        check: "git --version",
        ..NONE
    },
    Known {
        name: "jq",
        about: "jq, the JSON processor",
        packages: &["jq"],
        check: "jq --version",
        ..NONE
    },
    Known {
        name: "make",
        about: "GNU make",
        packages: &["make"],
        check: "make --version",
        ..NONE
    },
    Known {
        name: "ripgrep",
        about: "ripgrep (rg), the recursive search",
        packages: &["ripgrep"],
        check: "rg --version",
        ..NONE
    },
    Known {
        name: "ssh",
        about: "the OpenSSH client",
        packages: &["openssh-client"],
        check: "ssh -V",
        ..NONE
    },
    Known {
        name: "unzip",
        about: "unzip",
        packages: &["unzip"],
        check: "unzip -v",
        ..NONE
    },
];

/// The dependency called `name`.
pub fn find(name: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.name == name)
}

impl Known {
    /// Whether `version` is one of this runtime's: one to three numbers
    /// separated by dots (`20`, `3.11`, `1.22.5`).
    pub fn takes_version(&self, version: &str) -> bool {
        if self.kind != Kind::Runtime {
            return false;
        }
        let parts: Vec<&str> = version.split('.').collect();
        (1..=3).contains(&parts.len())
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 6 && p.chars().all(|c| c.is_ascii_digit()))
    }

    /// A runtime's image for `version` (the newest without one), after the
    /// `registry` prefix (`""`: Docker Hub's official images).
    pub fn image(&self, version: Option<&str>, registry: &str) -> String {
        let tag = match version {
            Some(v) => format!("{v}-{DEBIAN}"),
            None => DEBIAN.to_string(),
        };
        let registry = registry.trim_end_matches('/');
        if registry.is_empty() {
            format!("{}:{tag}", self.repository)
        } else {
            format!("{registry}/{}:{tag}", self.repository)
        }
    }

    /// What this dependency is and does, for `moat deps`; with `version`,
    /// the image of that version.
    pub fn describe(&self, version: Option<&str>, registry: &str) -> Described {
        let runtime = self.kind == Kind::Runtime;
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Described {
            name: self.name.to_string(),
            kind: self.kind,
            about: self.about.to_string(),
            version: version.map(str::to_string),
            versions: strings(self.versions),
            image: runtime.then(|| match version {
                Some(v) => self.image(Some(v), registry),
                None => self.image(Some("VERSION"), registry),
            }),
            image_without_version: runtime.then(|| self.image(None, registry)),
            copies: strings(self.copy),
            copies_if_present: strings(self.copy_if_present),
            path: strings(self.path),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cmd: strings(self.cmd),
            packages: strings(self.packages),
            check: self.check.to_string(),
        }
    }
}

/// What a dependency is and does, as `moat deps` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Described {
    /// Its name.
    pub name: String,
    /// Runtime or tool.
    pub kind: Kind,
    /// What it is.
    pub about: String,
    /// The version asked about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Examples of versions it takes (none for a tool).
    pub versions: Vec<String>,
    /// A runtime's image: of the version asked about, else with `VERSION`
    /// standing for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A runtime's image when no version is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_without_version: Option<String>,
    /// Directories copied from its image into a built image.
    pub copies: Vec<String>,
    /// Directories copied when its image has them.
    pub copies_if_present: Vec<String>,
    /// Directories put before `PATH`.
    pub path: Vec<String>,
    /// Other variables set.
    pub env: std::collections::BTreeMap<String, String>,
    /// The default command of an image built on its image.
    pub cmd: Vec<String>,
    /// A tool's Debian packages.
    pub packages: Vec<String>,
    /// The command that must run in a built image.
    pub check: String,
}

/// A dependency as written in `dependencies:` (`node@20`, `git`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dependency {
    /// Its name (`node`, `python`, `go`, `git`, ...).
    pub name: String,
    /// The version, if one was given (`20`, `3.11`); tools take none.
    pub version: Option<String>,
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The names moat knows, for messages: `node, python, go` and the tools.
pub fn known_names() -> String {
    let of = |kind: Kind| {
        KNOWN
            .iter()
            .filter(|k| k.kind == kind)
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "the runtimes {} and the tools {}",
        of(Kind::Runtime),
        of(Kind::Tool)
    )
}

/// Reads `name[@version]`: a dependency moat knows, with a version it
/// takes. The error says what is wrong (without a location: the caller
/// adds it).
pub fn parse(text: &str) -> std::result::Result<(&'static Known, Dependency), String> {
    let (name, version) = match text.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (text, None),
    };
    let Some(known) = find(name) else {
        let names: Vec<&str> = KNOWN.iter().map(|k| k.name).collect();
        let hint = names
            .iter()
            .map(|c| (strsim::damerau_levenshtein(name, c), *c))
            .filter(|(d, c)| *d <= 2 && *d < c.len().max(name.len()))
            .min_by_key(|(d, _)| *d)
            .map(|(_, c)| format!(" (did you mean \"{c}\"?)"))
            .unwrap_or_default();
        return Err(format!(
            "unknown dependency \"{name}\"{hint}; moat knows {} (moat deps list); for anything else set image:",
            known_names()
        ));
    };
    if let Some(v) = version {
        if known.kind == Kind::Tool {
            return Err(format!(
                "dependency \"{text}\": {name} is a tool, installed from the base image's Debian packages; it takes no version (write {name})"
            ));
        }
        if !known.takes_version(v) {
            return Err(format!(
                "dependency \"{text}\": \"{v}\" is not a version of {name} (such as {})",
                known.versions.join(", ")
            ));
        }
    }
    Ok((
        known,
        Dependency {
            name: name.to_string(),
            version: version.map(str::to_string),
        },
    ))
}

/// Every known dependency, as `moat deps list` shows them (images named
/// with the registry prefix of [`REGISTRY_ENV`]).
pub fn list() -> crate::error::Result<Vec<Described>> {
    let registry = registry_from_env()?;
    Ok(KNOWN.iter().map(|k| k.describe(None, &registry)).collect())
}

/// One dependency (`name` or `name@version`), as `moat deps info` shows it;
/// an unknown one is an error naming the known ones.
pub fn info(text: &str) -> crate::error::Result<Described> {
    let (known, dep) = parse(text)
        .map_err(|e| crate::error::Error::new(crate::error::ErrorKind::InvalidArgument, e))?;
    Ok(known.describe(dep.version.as_deref(), &registry_from_env()?))
}

/// The registry prefix from [`REGISTRY_ENV`], `""` when unset or empty;
/// a value that is not UTF-8 is an error (read as unset, it would quietly
/// send the pulls elsewhere than the user asked).
pub fn registry_from_env() -> crate::error::Result<String> {
    registry_from(std::env::var_os(REGISTRY_ENV).as_deref())
}

fn registry_from(value: Option<&std::ffi::OsStr>) -> crate::error::Result<String> {
    let Some(value) = value else {
        return Ok(String::new());
    };
    let text = value.to_str().ok_or_else(|| {
        crate::error::Error::new(
            crate::error::ErrorKind::InvalidArgument,
            format!(
                "{REGISTRY_ENV} is not UTF-8 ({}); set it to a registry such as localhost:5000/library, or unset it",
                value.to_string_lossy()
            ),
        )
    })?;
    Ok(text.trim().trim_end_matches('/').to_string())
}

/// An image a recipe starts from or copies from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The dependency it is the image of (`node@20`); `None` for moat's
    /// default image (tools without a runtime).
    pub dependency: Option<String>,
    /// The image (`node:20-bookworm`).
    pub image: String,
}

/// A runtime copied into a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeCopy {
    /// The dependency (`python@3.11`).
    pub dependency: String,
    /// Its image.
    pub image: String,
    /// Directories copied, each of which must be there.
    pub paths: Vec<String>,
    /// Directories copied when there.
    pub paths_if_present: Vec<String>,
}

/// A tool installed in a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInstall {
    /// The dependency (`ripgrep`).
    pub dependency: String,
    /// Its Debian packages.
    pub packages: Vec<String>,
    /// The command that says it is there.
    pub check: String,
}

/// A command that must run in a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The dependency it checks.
    pub dependency: String,
    /// The shell command.
    pub command: String,
}

/// How a workspace's dependencies become its image: made by [`plan`],
/// carried in a run's plan to its supervisor, built by [`ensure`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// The dependencies as written (`node@20`), in order.
    pub dependencies: Vec<String>,
    /// The image a run uses: the base image itself when nothing is added
    /// to it, else `moat-deps:<hash>`.
    pub image: String,
    /// The image it starts from.
    pub base: Source,
    /// Runtimes copied in, in order.
    pub copies: Vec<RuntimeCopy>,
    /// Tools installed, by name.
    pub tools: Vec<ToolInstall>,
    /// The built image's added environment (`KEY=value`).
    pub env: Vec<String>,
    /// The built image's default command.
    pub cmd: Vec<String>,
    /// Commands that must run in the built image, in order.
    pub checks: Vec<Check>,
}

impl Recipe {
    /// Whether moat builds the image (several runtimes, or tools); else
    /// the image is the base image, pulled.
    pub fn is_built(&self) -> bool {
        !self.copies.is_empty() || !self.tools.is_empty()
    }

    /// The content hash of everything that goes into the built image.
    fn hash(&self) -> String {
        #[derive(Serialize)]
        struct Hashed<'a> {
            format: u32,
            base: &'a str,
            copies: &'a [RuntimeCopy],
            tools: &'a [ToolInstall],
            env: &'a [String],
            cmd: &'a [String],
            checks: &'a [Check],
        }
        let hashed = Hashed {
            format: RECIPE_FORMAT,
            base: &self.base.image,
            copies: &self.copies,
            tools: &self.tools,
            env: &self.env,
            cmd: &self.cmd,
            checks: &self.checks,
        };
        // Serializing plain strings and numbers cannot fail.
        let json = serde_json::to_vec(&hashed).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// The recipe of `dependencies` (validated, as [`parse`] reads them; names
/// moat does not know are left out), with runtime images under `registry`
/// ([`registry_from_env`]) and `default_base` as the base when there is no
/// runtime. `None` when there are no dependencies. Pure.
pub fn plan(dependencies: &[Dependency], registry: &str, default_base: &str) -> Option<Recipe> {
    let known: Vec<(&Known, &Dependency)> = dependencies
        .iter()
        .filter_map(|d| find(&d.name).map(|k| (k, d)))
        .collect();
    if known.is_empty() {
        return None;
    }
    let runtimes: Vec<(&Known, &Dependency)> = known
        .iter()
        .filter(|(k, _)| k.kind == Kind::Runtime)
        .copied()
        .collect();
    let mut tools: Vec<(&Known, &Dependency)> = known
        .iter()
        .filter(|(k, _)| k.kind == Kind::Tool)
        .copied()
        .collect();
    tools.sort_by_key(|(k, _)| k.name);
    let base = match runtimes.first() {
        Some((k, d)) => Source {
            dependency: Some(d.to_string()),
            image: k.image(d.version.as_deref(), registry),
        },
        None => Source {
            dependency: None,
            image: default_base.to_string(),
        },
    };
    let copies: Vec<RuntimeCopy> = runtimes
        .iter()
        .skip(1)
        .map(|(k, d)| RuntimeCopy {
            dependency: d.to_string(),
            image: k.image(d.version.as_deref(), registry),
            paths: k.copy.iter().map(|p| p.to_string()).collect(),
            paths_if_present: k.copy_if_present.iter().map(|p| p.to_string()).collect(),
        })
        .collect();
    let tool_installs: Vec<ToolInstall> = tools
        .iter()
        .map(|(k, d)| ToolInstall {
            dependency: d.to_string(),
            packages: k.packages.iter().map(|p| p.to_string()).collect(),
            check: k.check.to_string(),
        })
        .collect();
    let mut env = Vec::new();
    let path: Vec<&str> = runtimes.iter().flat_map(|(k, _)| k.path).copied().collect();
    if !path.is_empty() {
        env.push(format!("PATH={}:{STANDARD_PATH}", path.join(":")));
    }
    for (k, _) in &runtimes {
        for (key, value) in k.env {
            env.push(format!("{key}={value}"));
        }
    }
    let cmd = match runtimes.first() {
        Some((k, _)) => k.cmd.iter().map(|c| c.to_string()).collect(),
        None => vec!["bash".to_string()],
    };
    let checks = runtimes
        .iter()
        .map(|(k, d)| Check {
            dependency: d.to_string(),
            command: k.check.to_string(),
        })
        .chain(tools.iter().map(|(k, d)| Check {
            dependency: d.to_string(),
            command: k.check.to_string(),
        }))
        .collect();
    let mut recipe = Recipe {
        dependencies: known.iter().map(|(_, d)| d.to_string()).collect(),
        image: String::new(),
        base,
        copies,
        tools: tool_installs,
        env,
        cmd,
        checks,
    };
    recipe.image = if recipe.is_built() {
        format!("{IMAGE_REPOSITORY}:{}", recipe.hash())
    } else {
        recipe.base.image.clone()
    };
    Some(recipe)
}
