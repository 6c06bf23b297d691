//! `moat system images`, `moat system containers`: what moat owns on the
//! container engines, over `moat_core::run::system`.

use clap::{Args, Subcommand};
use moat_core::run::system;
use moat_core::{paths, Error, ErrorKind};

use crate::write_stdout;

#[derive(Subcommand, Debug)]
pub enum SystemCommand {
    /// List the images moat built (agent images), with the runs and
    /// containers that use them
    Images(SystemListArgs),
    /// List the containers of moat's runs, running or not
    Containers(SystemListArgs),
}

#[derive(Args, Debug)]
pub struct SystemListArgs {
    /// Those of every moat home on the engines, not only this one's
    #[arg(long)]
    pub all: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_system(command: &SystemCommand) -> Result<(), Error> {
    let home = paths::moat_home()?;
    match command {
        SystemCommand::Images(args) => {
            let images = system::images(&home, args.all)?;
            if args.json {
                return write_stdout(&(to_json(&images)? + "\n"));
            }
            if images.is_empty() {
                eprintln!("No images built by moat{}.", scope(args.all));
                return Ok(());
            }
            let mut out = format!(
                "{:<30} {:<14} {:<7} {:<8} {:>9}  {}\n",
                "IMAGE", "ID", "ENGINE", "CREATED", "SIZE", "USED BY"
            );
            for i in &images {
                let mut used: Vec<String> = i.runs.clone();
                if !i.containers.is_empty() {
                    used.push(format!("{} container(s)", i.containers.len()));
                }
                out.push_str(&format!(
                    "{:<30} {:<14} {:<7} {:<8} {:>9}  {}\n",
                    i.display_name(),
                    short_id(&i.id),
                    i.engine.as_str(),
                    age(&i.created),
                    format!("{:.1} MB", i.size as f64 / 1e6),
                    if used.is_empty() {
                        "-".to_string()
                    } else {
                        used.join(", ")
                    }
                ));
            }
            write_stdout(&out)
        }
        SystemCommand::Containers(args) => {
            let containers = system::containers(&home, args.all)?;
            if args.json {
                return write_stdout(&(to_json(&containers)? + "\n"));
            }
            if containers.is_empty() {
                eprintln!("No containers of moat runs{}.", scope(args.all));
                return Ok(());
            }
            let mut out = format!(
                "{:<14} {:<24} {:<17} {:<9} {:<7} {:<8} {}\n",
                "ID", "NAME", "RUN ID", "STATE", "ENGINE", "CREATED", "IMAGE"
            );
            for c in &containers {
                out.push_str(&format!(
                    "{:<14} {:<24} {:<17} {:<9} {:<7} {:<8} {}{}\n",
                    short_id(&c.id),
                    c.name,
                    c.run,
                    c.state,
                    c.engine.as_str(),
                    age(&c.created),
                    c.image,
                    if args.all {
                        format!("  (home {})", c.home)
                    } else {
                        String::new()
                    }
                ));
            }
            write_stdout(&out)
        }
    }
}

fn scope(all: bool) -> &'static str {
    if all {
        ""
    } else {
        " for this moat home (--all shows every home's)"
    }
}

/// The first 12 hex digits of an engine id, as the engines show them.
fn short_id(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

fn age(created: &str) -> String {
    let Ok(t) = moat_core::run::parse_time(created) else {
        return "?".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match (now - t).max(0) {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string_pretty(value)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot encode json: {e}")))
}
