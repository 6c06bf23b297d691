//! `moat`: the command-line consumer of moat-core. Argument parsing, printing
//! and exit codes only; every decision is made in moat-core.

// The workspace forbids printing; the CLI is the one crate that prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use moat_core::config::{self, Overrides};
use moat_core::Error;

const ABOUT: &str = "Run AI agents locally with one command. Zero Docker knowledge. Zero secret copying. Full visibility.";

const AFTER_HELP: &str = "\
Agents run in isolated containers; credentials are injected at the network
layer by a TLS-intercepting proxy, so the agent never sees your tokens.

Built so far: `moat config`. Runs, grants, the proxy, hostname routing and
the audit log are being built; see the README's status table.

Examples:
  moat config                 Check ./agent.yaml and show what a run would use
  moat config ./my-project    Check another workspace
  moat config --json          The same, as JSON for scripts";

#[derive(Parser, Debug)]
#[command(name = "moat", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a workspace's agent.yaml and print the resolved configuration
    #[command(after_help = "\
Prints the configuration a run would use, with defaults filled in and the
image resolved (image: > dependencies > ubuntu:22.04). Flags are merged as
`moat run` merges them: flags over file over defaults; --grant and -e add to
the file's lists.

Exit status: 0 when valid, 1 when not (each problem on stderr as
FILE:LINE:COLUMN: message).")]
    Config(ConfigArgs),
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// Workspace directory, or the path of its agent.yaml / moat.yaml
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Print JSON instead of YAML
    #[arg(long)]
    json: bool,
    /// Agent name (overrides name: in agent.yaml)
    #[arg(long)]
    name: Option<String>,
    /// Image to use as is (overrides image: and dependencies:)
    #[arg(long)]
    image: Option<String>,
    /// Credential to bind (repeatable, or a comma list): github, ssh:HOST, ...
    #[arg(long = "grant", value_name = "PROVIDER")]
    grants: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Interactive mode (TTY and stdin)
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(args) => cmd_config(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

fn cmd_config(args: &ConfigArgs) -> Result<(), Error> {
    let config = config::load(&args.path)?;
    let config = config.merge(&Overrides {
        name: args.name.clone(),
        image: args.image.clone(),
        grants: args.grants.clone(),
        env: args.env.clone(),
        command: None,
        interactive: args.interactive.then_some(true),
    })?;
    if config.config_file.is_none() {
        eprintln!(
            "note: no agent.yaml or moat.yaml in {}; showing the defaults",
            args.path.display()
        );
    }
    let resolved = config.resolved();
    let text = if args.json {
        serde_json::to_string_pretty(&resolved)
            .map(|s| s + "\n")
            .map_err(internal)?
    } else {
        serde_yaml::to_string(&resolved).map_err(internal)?
    };
    write_stdout(&text)
}

/// Writes data to stdout. A reader that went away (`moat config | head -1`)
/// is not an error; anything else is reported, never a panic.
fn write_stdout(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io(Path::new("<stdout>"), "write", e)),
    }
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::new(
        moat_core::ErrorKind::Internal,
        format!("cannot print the configuration: {e}"),
    )
}

/// Prints every problem of `err` on stderr; a located problem gets the line
/// of source it points at, with a caret under the column.
fn report(err: &Error) {
    for d in err.diagnostics() {
        eprintln!("error: {d}");
        if let Some(loc) = &d.location {
            if let Some(snippet) = snippet(&loc.path, loc.line, loc.column) {
                eprintln!("{snippet}");
            }
        }
    }
}

fn snippet(path: &Path, line: u32, column: u32) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let source = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let number = line.to_string();
    let pad = " ".repeat(number.len());
    // Columns count characters; keep tabs so the caret lines up.
    let lead: String = source
        .chars()
        .take(usize::try_from(column).ok()?.saturating_sub(1))
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    Some(format!(" {number} | {source}\n {pad} | {lead}^"))
}
