//! `moat deps list` and `moat deps info NAME`: what `dependencies:` may
//! name, and what moat does with each.

use clap::{Args, Subcommand};
use moat_core::deps::{self, Described, Kind};
use moat_core::{Error, ErrorKind};

use crate::write_stdout;

#[derive(Args, Debug)]
pub struct DepsArgs {
    #[command(subcommand)]
    pub command: DepsCommand,
}

#[derive(Subcommand, Debug)]
pub enum DepsCommand {
    /// The dependencies moat knows: runtimes (the versions they take, their
    /// image) and tools (their Debian packages)
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// What moat does with one dependency: NAME, or NAME@VERSION for the
    /// image of that version
    Info {
        /// `node`, `python@3.11`, `ripgrep`, ...
        name: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

pub const AFTER_HELP: &str = "\
dependencies: in agent.yaml names runtimes and tools. One runtime alone is its
official Debian bookworm image (node@20: node:20-bookworm). Several runtimes,
or any tool, make one image that moat builds on the first runtime's image
(else on ubuntu:22.04), tagged moat-deps:<hash of what goes into it> and
reused by every later run with the same dependencies. MOAT_DEPS_REGISTRY puts
a registry (a mirror) before the runtime images' names. See
docs/configuration.md.";

fn json_text(value: &impl serde::Serialize) -> Result<String, Error> {
    serde_json::to_string_pretty(value)
        .map(|t| t + "\n")
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot print JSON: {e}")))
}

pub fn cmd_deps(args: &DepsArgs) -> Result<(), Error> {
    let registry = deps::registry_from_env()?;
    match &args.command {
        DepsCommand::List { json } => {
            let all: Vec<Described> = deps::list()?;
            if *json {
                return write_stdout(&json_text(&all)?);
            }
            let mut out = format!(
                "{:<16} {:<8} {:<22} {}\n",
                "NAME", "KIND", "VERSIONS", "IMAGE / PACKAGES"
            );
            for d in &all {
                let (versions, from) = match d.kind {
                    Kind::Runtime => (d.versions.join(", "), d.image.clone().unwrap_or_default()),
                    Kind::Tool => ("-".to_string(), format!("apt: {}", d.packages.join(" "))),
                };
                out.push_str(&format!(
                    "{:<16} {:<8} {:<22} {}\n",
                    d.name,
                    d.kind.as_str(),
                    versions,
                    from
                ));
            }
            write_stdout(&out)?;
            eprintln!(
                "A runtime without a version is its image's newest ({}). Several runtimes, or any tool, make one image moat builds (moat-deps:<hash>); `moat deps info NAME` says how.",
                deps::find("node")
                    .map(|k| k.image(None, &registry))
                    .unwrap_or_default()
            );
            Ok(())
        }
        DepsCommand::Info { name, json } => {
            let d = deps::info(name)?;
            if *json {
                return write_stdout(&json_text(&d)?);
            }
            write_stdout(&info_text(&d))
        }
    }
}

fn info_text(d: &Described) -> String {
    let mut out = format!("{}: {} ({})\n", d.name, d.about, d.kind.as_str());
    let mut field = |key: &str, value: String| {
        out.push_str(&format!("  {:<13} {value}\n", format!("{key}:")));
    };
    match d.kind {
        Kind::Runtime => {
            field(
                "versions",
                format!(
                    "one to three numbers, such as {}; none: the newest",
                    d.versions.join(", ")
                ),
            );
            let image = d.image.clone().unwrap_or_default();
            match &d.version {
                Some(v) => field("image", format!("{image} (for {}@{v})", d.name)),
                None => field(
                    "image",
                    format!(
                        "{image} ({} without a version)",
                        d.image_without_version.clone().unwrap_or_default()
                    ),
                ),
            }
            field("alone", "the run uses its image as it is".to_string());
            field(
                "first",
                format!(
                    "the base of the image moat builds; its default command: {}",
                    d.cmd.join(" ")
                ),
            );
            let mut copied = d.copies.join(", ");
            if !d.copies_if_present.is_empty() {
                copied.push_str(&format!(
                    " (and {} when its image has them)",
                    d.copies_if_present.join(", ")
                ));
            }
            field("later", format!("copied from its image: {copied}"));
            let mut env: Vec<String> = Vec::new();
            if !d.path.is_empty() {
                env.push(format!("PATH={}:...", d.path.join(":")));
            }
            env.extend(d.env.iter().map(|(k, v)| format!("{k}={v}")));
            if !env.is_empty() {
                field("environment", env.join(" "));
            }
            field(
                "check",
                format!("`{}` must run in the built image", d.check),
            );
        }
        Kind::Tool => {
            field(
                "packages",
                format!(
                    "{} (apt-get install in the build container, which reaches the mirror through the engine's default network)",
                    d.packages.join(" ")
                ),
            );
            field(
                "skipped",
                format!("when `{}` already runs in the base image", d.check),
            );
            field(
                "base",
                format!(
                    "the first runtime's image, else {}",
                    moat_core::config::DEFAULT_IMAGE
                ),
            );
        }
    }
    out
}
