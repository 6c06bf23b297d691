//! `moat`: the command-line consumer of moat-core. Argument parsing, printing
//! and exit codes only; every decision is made in moat-core.

// The workspace forbids printing; the CLI is the one crate that prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod completions;
mod deps_cmd;
mod promote_cmd;
mod proxy_cmd;
mod runs;
mod system_cmd;
use moat_core::config::{self, Overrides};
use moat_core::credential::{self, TokenInput};
use moat_core::paths;
use moat_core::secret::Secret;
use moat_core::Error;

const ABOUT: &str = "Run AI agents locally with one command. Zero Docker knowledge. Zero secret copying. Full visibility.";

const AFTER_HELP: &str = "\
Agents run in isolated containers; credentials are injected at the network
layer by a TLS-intercepting proxy, so the agent never sees your tokens.

Examples:
  moat run -- echo hi         Run a command in a container in ./
  moat run --grant github -- curl -s https://api.github.com/user
  moat run -d ./my-project    Run in the background; `moat logs -f` follows it
  moat list                   Runs, with their state
  moat config                 Check ./agent.yaml and show what a run would use
  moat config ./my-project    Check another workspace
  moat config --json          The same, as JSON for scripts
  moat grant github           Store a GitHub token (from GITHUB_TOKEN, gh, or a prompt)
  moat grant list             Show stored credentials (never the tokens)";

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
    /// Store credentials for a provider (github, anthropic, openai, or a custom one), or `list` them
    #[command(after_help = "\
The token is read from the provider's environment variable (GITHUB_TOKEN or
GH_TOKEN, ANTHROPIC_API_KEY, OPENAI_API_KEY), else, on a terminal, from the gh
CLI or Claude Code (after asking), else from a hidden prompt. Without a
terminal moat never prompts. Tokens are stored encrypted in
~/.moat/credentials/ and injected by the proxy; the agent never sees them.")]
    Grant(GrantArgs),
    /// Remove stored credentials
    Revoke(RevokeArgs),
    /// Run an agent in a container: moat run [PATH] [-- COMMAND...]
    #[command(after_help = "\
The workspace is mounted at /workspace; the agent runs as your uid, without
capabilities, behind the run's own proxy. Output is streamed: Ctrl+C
detaches (the run goes on), Ctrl+C twice within 500 ms stops it.

Exit status: the command's; 125 when moat itself failed (the engine, the
image, the configuration, or the run's setup), as with `docker run`.")]
    Run(runs::RunArgs),
    /// Run Claude Code in a sealed run (easiest way to start), or list its `sessions`
    #[command(after_help = "\
Claude Code runs in a container with the workspace at /workspace, your
anthropic grant (moat grant anthropic: a Claude Code login or an API key)
injected by the run's proxy; the container holds only placeholders. Without
-p it is interactive, with a terminal (Ctrl-/ d detaches, Ctrl-/ k stops;
moat attach returns to it); with -p it answers and exits with claude's status. moat builds the image (the base image plus the
pinned Claude Code) on first use and reuses it. Claude Code's sessions for a
workspace are kept under ~/.moat/claude/, so --continue and --resume work
across runs: moat claude -- --continue.")]
    Claude(runs::ClaudeArgs),
    /// Follow the output of a running run
    Attach(runs::AttachArgs),
    /// List runs
    List(runs::ListArgs),
    /// Show runs, images, disk use and health
    Status(runs::ListArgs),
    /// Stop a run (SIGTERM, then SIGKILL)
    Stop(runs::StopArgs),
    /// Remove a run and its artifacts (stopping it first)
    Destroy(runs::RunRef),
    /// Remove stopped runs, images moat built that no run uses, and anything
    /// moat left behind (--dry-run lists them)
    Clean(runs::CleanArgs),
    /// Copy a run's artifacts (logs, trace, audit log and its proof bundle)
    /// to persistent storage that `destroy` and `clean` leave alone
    Promote(promote_cmd::PromoteArgs),
    /// What moat owns on the container engines: `images` it built,
    /// `containers` of its runs
    #[command(subcommand)]
    System(system_cmd::SystemCommand),
    /// Print a run's output
    Logs(runs::LogsArgs),
    /// Show a run's network trace
    Trace(runs::TraceArgs),
    /// Replay a run's requests against the current policy (`check`), or
    /// propose a strict policy from them (`suggest`)
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Verify an audit log (hash chain, Merkle tree, signed checkpoints)
    Audit(AuditArgs),
    /// Verify an exported proof bundle offline
    VerifyBundle(VerifyBundleArgs),
    /// Show the dependencies agent.yaml may name: `list`, `info NAME`
    #[command(after_help = deps_cmd::AFTER_HELP)]
    Deps(deps_cmd::DepsArgs),
    /// Manage the routing proxy (https://<endpoint>.<agent>.localhost:8080)
    Proxy(proxy_cmd::ProxyArgs),
    /// Print a shell completion script: moat completions bash|zsh|fish
    #[command(after_help = "\
Examples:
  moat completions bash > ~/.local/share/bash-completion/completions/moat
  moat completions zsh > \"${fpath[1]}/_moat\"
  moat completions fish > ~/.config/fish/completions/moat.fish")]
    Completions(completions::CompletionsArgs),
    /// (internal) Supervise a run; started by `moat run`
    #[command(name = "_supervise", hide = true)]
    Supervise,
    /// (internal) The routing proxy; started by `moat proxy start` or a run
    #[command(name = "_router", hide = true)]
    Router(proxy_cmd::RouterArgs),
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// List the run's requests the workspace's current policy would decide
    /// otherwise (exit 1 when one would now be denied)
    Check(PolicyArgs),
    /// Print a strict network policy (YAML for agent.yaml) that allows what
    /// the run did
    Suggest(PolicyArgs),
}

#[derive(Args, Debug)]
struct PolicyArgs {
    /// Run id, id prefix or name (default: the most recent run)
    run: Option<String>,
    /// Print JSON (check)
    #[arg(long)]
    json: bool,
}

fn cmd_policy(command: &PolicyCommand) -> Result<ExitCode, Error> {
    let home = paths::moat_home()?;
    match command {
        PolicyCommand::Suggest(args) => {
            write_stdout(&moat_core::run::replay::suggest(
                &home,
                args.run.as_deref(),
            )?)?;
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check(args) => {
            let report = moat_core::run::replay::check(&home, args.run.as_deref())?;
            let newly_denied = report.changes.iter().any(|c| c.now == "denied");
            if args.json {
                let text = serde_json::to_string_pretty(&report).map_err(internal)?;
                write_stdout(&(text + "\n"))?;
            } else if report.changes.is_empty() {
                eprintln!(
                    "All {} requests of {} would be decided as they were.",
                    report.requests, report.run
                );
            } else {
                let mut out = format!(
                    "{:<8} {:<8} {:<7} {:<50} {}\n",
                    "THEN", "NOW", "METHOD", "URL", "RULE"
                );
                for c in &report.changes {
                    out.push_str(&format!(
                        "{:<8} {:<8} {:<7} {:<50} {}\n",
                        c.then,
                        c.now,
                        moat_core::run::trace_view::printable(&c.method),
                        moat_core::run::trace_view::printable(&c.url),
                        c.rule
                    ));
                }
                write_stdout(&out)?;
                eprintln!(
                    "{} of {} requests of {} would be decided otherwise now.",
                    report.changes.len(),
                    report.requests,
                    report.run
                );
            }
            Ok(if newly_denied {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// A run (id, id prefix or name; default: the most recent), or an audit
    /// log's directory (it holds audit.jsonl and checkpoints.jsonl)
    target: Option<String>,
    /// Write a self-contained proof bundle to this file
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// Verify with this verifier key (moat+...) instead of this host's
    #[arg(long, value_name = "VKEY")]
    key: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyBundleArgs {
    /// The bundle (from `moat audit --export`)
    file: PathBuf,
    /// Require this verifier key (moat+...)
    #[arg(long, value_name = "VKEY")]
    key: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct GrantArgs {
    /// Provider to grant, or `list` to show stored grants
    provider: String,
    /// Do not check a GitHub token against api.github.com
    #[arg(long)]
    no_validate: bool,
    /// Print JSON (for `moat grant list` and for the stored grant)
    #[arg(long)]
    json: bool,
    /// For `moat grant anthropic`: import Claude Code's login
    /// (~/.claude/.credentials.json) without asking
    #[arg(long)]
    from_claude_code: bool,
    /// For `moat grant ssh`: the host the key may sign for
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// For `moat grant ssh`: the agent key's fingerprint (default: its first key)
    #[arg(long, value_name = "FINGERPRINT")]
    key: Option<String>,
    /// For `moat grant aws`: the IAM role to assume
    #[arg(long, value_name = "ARN")]
    role: Option<String>,
    /// For `moat grant aws`: the STS region (default us-east-1)
    #[arg(long)]
    region: Option<String>,
    /// For `moat grant aws`: session length, 15m to 12h (default 15m)
    #[arg(long, value_name = "DURATION")]
    session_duration: Option<String>,
    /// For `moat grant aws`: the external id the role's trust policy requires
    #[arg(long)]
    external_id: Option<String>,
}

#[derive(Args, Debug)]
struct RevokeArgs {
    /// Provider to revoke (github, anthropic, ...)
    provider: String,
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
    let cli: Cli = completions::parse();
    let result = match cli.command {
        Command::Supervise => {
            // What the supervisor (or the run's guard) reports goes to its
            // standard error: the run's supervisor.log.
            let _ = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(false)
                .try_init();
            return ExitCode::from(moat_core::run::supervise().clamp(0, 255) as u8);
        }
        Command::Run(args) => return exit_run(runs::cmd_run(&args)),
        Command::Proxy(args) => proxy_cmd::cmd_proxy(&args),
        Command::Deps(args) => deps_cmd::cmd_deps(&args),
        Command::Router(args) => proxy_cmd::cmd_router(&args),
        Command::Claude(args) => return exit_run(runs::cmd_claude(&args)),
        Command::Policy(command) => return exit(cmd_policy(&command)),
        Command::Attach(args) => return exit_run(runs::cmd_attach(&args)),
        Command::Logs(args) => return exit(runs::cmd_logs(&args)),
        Command::List(args) => runs::cmd_list(&args),
        Command::Status(args) => return exit(runs::cmd_status(&args)),
        Command::Stop(args) => runs::cmd_stop(&args),
        Command::Destroy(args) => runs::cmd_destroy(&args),
        Command::Clean(args) => runs::cmd_clean(&args),
        Command::Promote(args) => promote_cmd::cmd_promote(&args),
        Command::System(command) => system_cmd::cmd_system(&command),
        Command::Completions(args) => completions::cmd_completions(&args),
        Command::Trace(args) => runs::cmd_trace(&args),
        Command::Config(args) => cmd_config(&args),
        Command::Grant(args) if args.provider == "list" => cmd_grant_list(&args),
        Command::Grant(args) if args.provider == "ssh" => cmd_grant_ssh(&args),
        Command::Grant(args) if args.provider == "aws" => cmd_grant_aws(&args),
        Command::Grant(args) => cmd_grant(&args),
        Command::Revoke(args) => cmd_revoke(&args),
        Command::Audit(args) => cmd_audit(&args),
        Command::VerifyBundle(args) => cmd_verify_bundle(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

/// `moat run`, `claude` and `attach` leave with the command's status; when
/// moat itself fails (engine, image, configuration, its own setup), with
/// 125, as `docker run` does, so the two are never confused.
fn exit_run(result: Result<ExitCode, Error>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            report(&err);
            ExitCode::from(runs::MOAT_FAILED)
        }
    }
}

fn exit(result: Result<ExitCode, Error>) -> ExitCode {
    match result {
        Ok(code) => code,
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
        spelling: config::Spelling::Flags,
        ..Overrides::default()
    })?;
    if config.config_file.is_none() {
        eprintln!(
            "note: no agent.yaml or moat.yaml in {}; showing the defaults",
            args.path.display()
        );
    }
    let resolved = config.resolved()?;
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
pub(crate) fn write_stdout(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io(Path::new("<stdout>"), "write", e)),
    }
}

fn cmd_grant_list(args: &GrantArgs) -> Result<(), Error> {
    let grants = credential::list(&paths::moat_home()?)?;
    if args.json {
        let text = serde_json::to_string_pretty(&grants).map_err(internal)?;
        return write_stdout(&(text + "\n"));
    }
    if grants.is_empty() {
        eprintln!("no credentials stored; run `moat grant <provider>`");
        return Ok(());
    }
    let mut out = format!(
        "{:<12} {:<18} {:<22} {:<22} {}\n",
        "PROVIDER", "SOURCE", "CREATED", "EXPIRES", "HOSTS"
    );
    for g in &grants {
        let created = g.created.get(..19).unwrap_or(&g.created).replace('T', " ");
        let expires = g.expires.as_deref().map_or("-".to_string(), |e| {
            e.get(..19).unwrap_or(e).replace('T', " ")
        });
        out.push_str(&format!(
            "{:<12} {:<18} {:<22} {:<22} {}\n",
            g.provider,
            g.source,
            created,
            expires,
            g.hosts.join(", ")
        ));
        if let Some(problem) = &g.problem {
            out.push_str(&format!("  ! {problem}\n"));
        }
    }
    write_stdout(&out)
}

fn ask_yes(question: &str) -> bool {
    eprint!("{question} [Y/n]: ");
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    let a = answer.trim().to_ascii_lowercase();
    a.is_empty() || a == "y" || a == "yes"
}

/// Asks for a secret on the terminal without echoing it. Echo is turned
/// off before the prompt is shown, so nothing typed as soon as the prompt
/// appears can be echoed (prompting first and then turning echo off leaves
/// a moment in which it would be).
fn prompt_secret(label: &str) -> Result<Secret<String>, Error> {
    use std::io::{BufRead, Write};
    let io_err = |e: std::io::Error| {
        Error::new(
            moat_core::ErrorKind::Io,
            format!("cannot read from the terminal: {e}"),
        )
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(io_err)?;
    let quiet = NoEcho::on(&tty).map_err(io_err)?;
    let mut out = &tty;
    out.write_all(format!("{label}: ").as_bytes())
        .and_then(|()| out.flush())
        .map_err(io_err)?;
    let mut line = String::new();
    std::io::BufReader::new(&tty)
        .read_line(&mut line)
        .map_err(io_err)?;
    drop(quiet);
    // The newline the user typed was not echoed.
    let _ = out.write_all(b"\n");
    Ok(Secret::new(line.trim().to_string()))
}

/// Echo off on a terminal until dropped.
struct NoEcho<'a> {
    tty: &'a std::fs::File,
    saved: libc::termios,
}

impl<'a> NoEcho<'a> {
    fn on(tty: &'a std::fs::File) -> std::io::Result<NoEcho<'a>> {
        use std::os::unix::io::AsRawFd;
        let fd = tty.as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut quiet = saved;
        quiet.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK);
        quiet.c_lflag |= libc::ECHONL | libc::ICANON;
        // SAFETY: a valid fd and a termios from tcgetattr.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(NoEcho { tty, saved })
    }
}

impl Drop for NoEcho<'_> {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: restores what tcgetattr returned, on the same fd.
        unsafe { libc::tcsetattr(self.tty.as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Finds the token from the provider's sources in their order (the seeds'),
/// asking only on a terminal.
fn token_input(home: &Path, provider: &str) -> Result<TokenInput, Error> {
    use credential::TokenSource;
    use std::io::IsTerminal;
    let spec = credential::lookup(home, provider)?;
    for source in &spec.sources {
        match source {
            TokenSource::Environment => {
                if let Some((_, source)) = credential::token_from_env(&spec) {
                    eprintln!("Using token from {}", source.trim_start_matches("env:"));
                    return Ok(TokenInput::Environment);
                }
                if !std::io::stdin().is_terminal() {
                    // Never prompt without a terminal: the core names the
                    // variables.
                    return Ok(TokenInput::Environment);
                }
            }
            TokenSource::GhCli => {
                if let Some(token) = credential::gh_auth_token() {
                    eprintln!("Found gh CLI authentication");
                    if ask_yes("Use token from gh CLI?") {
                        return Ok(TokenInput::Given(token, "gh".into()));
                    }
                }
            }
            TokenSource::ClaudeCode => {
                let user_home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_default();
                if let Some(oauth) = credential::claude_code_credentials(&user_home)? {
                    eprintln!("Found Claude Code credentials.");
                    eprintln!(
                        "  Subscription: {}",
                        oauth.subscription.as_deref().unwrap_or("unknown")
                    );
                    eprintln!(
                        "  Expires: {}",
                        oauth.expires.as_deref().unwrap_or("unknown")
                    );
                    eprintln!();
                    if ask_yes("Use Claude Code credentials?") {
                        return Ok(TokenInput::ClaudeCode(oauth));
                    }
                }
            }
            TokenSource::Prompt(label) => {
                return Ok(TokenInput::Given(prompt_secret(label)?, "prompt".into()));
            }
        }
    }
    Ok(TokenInput::Environment)
}

fn cmd_grant(args: &GrantArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    let input = if args.from_claude_code {
        if args.provider != "anthropic" {
            return Err(Error::new(
                moat_core::ErrorKind::InvalidArgument,
                "--from-claude-code is for `moat grant anthropic`",
            ));
        }
        let file = credential::oauth::default_credentials_file().ok_or_else(|| {
            Error::new(
                moat_core::ErrorKind::InvalidArgument,
                "cannot find Claude Code's login: HOME is not set",
            )
        })?;
        match credential::claude_code_credentials_at(&file)? {
            Some(oauth) => TokenInput::ClaudeCode(oauth),
            None => {
                return Err(Error::new(
                    moat_core::ErrorKind::Config,
                    format!(
                        "{}: no Claude Code login there; log in with `claude` first",
                        file.display()
                    ),
                ))
            }
        }
    } else {
        token_input(&home, &args.provider)?
    };
    let has_token = !matches!(input, TokenInput::Environment)
        || credential::token_from_env(&credential::lookup(&home, &args.provider)?).is_some();
    if has_token && args.provider == "github" && !args.no_validate {
        eprintln!("Validating token...");
    }
    let outcome = credential::grant(&home, &args.provider, input, !args.no_validate)?;
    if args.json {
        let text = serde_json::to_string_pretty(&outcome).map_err(internal)?;
        return write_stdout(&(text + "\n"));
    }
    if let Some(login) = outcome.grant.metadata.get("login") {
        eprintln!("Authenticated as: {login}");
    }
    if let (Some(file), Some(reason)) = (&outcome.key_file, &outcome.key_reason) {
        if reason.starts_with("no system keyring") {
            eprintln!(
                "note: {reason}; the encryption key is in {}",
                file.display()
            );
        }
    }
    eprintln!(
        "{} credential saved to {}",
        credential::lookup(&home, &args.provider)?.title,
        outcome.path.display()
    );
    Ok(())
}

fn cmd_grant_ssh(args: &GrantArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    let host = args.host.as_deref().ok_or_else(|| {
        Error::new(
            moat_core::ErrorKind::InvalidArgument,
            "moat grant ssh needs --host <host> (the host the key may sign for)",
        )
    })?;
    let socket = credential::ssh::agent_socket();
    let grant = credential::ssh::grant(&home, socket.as_deref(), host, args.key.as_deref())?;
    if args.json {
        let text = serde_json::to_string_pretty(&grant).map_err(internal)?;
        return write_stdout(&(text + "\n"));
    }
    eprintln!(
        "Using key: {} ({})",
        grant.key.comment, grant.key.fingerprint
    );
    eprintln!("Granted SSH access to {}", grant.host);
    if grant.host_keys.is_empty() {
        eprintln!(
            "warning: {}",
            credential::ssh::missing_host_key_warning(&grant.host)
        );
    } else {
        eprintln!(
            "Host keys of {}: {} (from known_hosts)",
            grant.host,
            grant.host_keys.len()
        );
    }
    Ok(())
}

fn cmd_grant_aws(args: &GrantArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    let role = args.role.as_deref().ok_or_else(|| {
        Error::new(
            moat_core::ErrorKind::InvalidArgument,
            "moat grant aws needs --role=ARN (the IAM role runs assume)",
        )
    })?;
    let duration = args
        .session_duration
        .as_deref()
        .map(credential::aws::parse_duration)
        .transpose()?;
    let grant = credential::aws::grant(
        &home,
        role,
        args.region.as_deref(),
        duration,
        args.external_id.as_deref(),
    )?;
    if args.json {
        let text = serde_json::to_string_pretty(&grant).map_err(internal)?;
        return write_stdout(&(text + "\n"));
    }
    eprintln!(
        "Granted AWS role {} (region {}, sessions of {} min)",
        grant.role_arn,
        grant.region,
        grant.session_duration / 60
    );
    eprintln!("Runs with --grant aws assume it with this host's AWS credentials; the long-lived keys stay here.");
    Ok(())
}

fn cmd_revoke(args: &RevokeArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    let title = if !args.provider.starts_with("ssh") && args.provider != "aws" {
        credential::lookup(
            &home,
            args.provider.split(':').next().unwrap_or(&args.provider),
        )?
        .title
    } else {
        args.provider.clone()
    };
    if credential::revoke(&home, &args.provider)? {
        match args.provider.strip_prefix("ssh:") {
            Some(host) => eprintln!("Revoked SSH access to {host}"),
            None if args.provider == "aws" => eprintln!("Revoked the AWS role"),
            None => eprintln!("Revoked {title} credentials"),
        }
        Ok(())
    } else {
        Err(Error::new(
            moat_core::ErrorKind::InvalidArgument,
            format!("no {} credential is stored", args.provider),
        ))
    }
}

fn print_report(what: &str, r: &moat_core::audit::Report) -> Result<(), Error> {
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{t} {n}")).collect();
    let mut out = format!("{what}\n");
    out.push_str(&format!(
        "  entries:     {} ({})\n",
        r.entries,
        types.join(", ")
    ));
    if let (Some(a), Some(b)) = (&r.first_time, &r.last_time) {
        out.push_str(&format!("  time span:   {a} .. {b}\n"));
    }
    match r.checkpoints.last() {
        Some(c) => out.push_str(&format!(
            "  checkpoints: {} (last: {} entries, signed {})\n",
            r.checkpoints.len(),
            c.size,
            c.time
        )),
        None => out.push_str("  checkpoints: none yet\n"),
    }
    out.push_str(&format!("  key:         {}\n", r.vkey));
    out.push_str(&format!("  root:        {}\n", r.root));
    if let Some(torn) = &r.torn_tail {
        out.push_str(&format!("  torn tail:   {torn}\n"));
    }
    write_stdout(&out)
}

fn cmd_audit(args: &AuditArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    let dir = match args.target.as_deref() {
        Some(t) if Path::new(t).join("audit.jsonl").is_file() => PathBuf::from(t),
        other => {
            let meta = moat_core::run::find(&home, other)?;
            moat_core::run::run_dir(&home, &meta.id)
        }
    };
    let args = &ResolvedAudit {
        dir,
        export: args.export.clone(),
        key: args.key.clone(),
        json: args.json,
    };
    let report = moat_core::audit::verify(&args.dir, &home, args.key.as_deref())?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(internal)?;
        write_stdout(&(text + "\n"))?;
    } else {
        print_report(&format!("Audit log {}", args.dir.display()), &report)?;
    }
    if !report.ok {
        return Err(Error::from_diagnostics(
            moat_core::ErrorKind::Config,
            report
                .problems
                .iter()
                .map(|p| moat_core::Diagnostic {
                    location: None,
                    message: format!("audit log {}: {p}", args.dir.display()),
                })
                .collect(),
        ));
    }
    if !args.json {
        eprintln!("{}", verified_line(&report));
    }
    if let Some(out) = &args.export {
        moat_core::audit::export_bundle(&args.dir, &home, out)?;
        eprintln!("Proof bundle written to {}", out.display());
    }
    Ok(())
}

/// What a verification that found no problem can vouch for: a log with no
/// checkpoint, or entries past the last one, is linked but not signed.
fn verified_line(report: &moat_core::audit::Report) -> String {
    let n = report.checkpoints.len();
    if n == 0 {
        return format!(
            "Not signed: the hash chain of {} entries holds, but nothing in this log is signed (no checkpoint), so a cut or rewritten log would look the same",
            report.entries
        );
    }
    let base = format!("Verified: hash chain, Merkle tree and {n} checkpoint signature(s)");
    if report.closed {
        format!("{base}; the log was closed by its writer (final checkpoint)")
    } else if report.unsigned > 0 {
        format!(
            "{base}; but the last {} of {} entries are not covered by a signature (the log is still open, or its writer stopped before signing), so a change to them would not show",
            report.unsigned, report.entries
        )
    } else {
        format!("{base}; the log is still open (no final checkpoint yet)")
    }
}

struct ResolvedAudit {
    dir: PathBuf,
    export: Option<PathBuf>,
    key: Option<String>,
    json: bool,
}

fn cmd_verify_bundle(args: &VerifyBundleArgs) -> Result<(), Error> {
    let report = moat_core::audit::verify_bundle(&args.file, args.key.as_deref())?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(internal)?;
        return write_stdout(&(text + "\n"));
    }
    print_report(&format!("Bundle {}", args.file.display()), &report)?;
    let base = format!(
        "Verified: every entry is in the signed tree, and the log only grew across {} checkpoint(s)",
        report.checkpoints.len()
    );
    if report.closed {
        eprintln!("{base}; the log was closed by its writer (final checkpoint)");
    } else {
        // All of it is signed, but it may not be all there was.
        eprintln!(
            "{base}; but its last checkpoint is not a final one: the log was still open when the bundle was made, or the bundle ends at an earlier checkpoint, so entries after it would not show"
        );
    }
    if args.key.is_none() {
        eprintln!(
            "note: checked against the bundle's own key; pass --key to require the key you trust"
        );
    }
    Ok(())
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::new(
        moat_core::ErrorKind::Internal,
        format!("cannot print the configuration: {e}"),
    )
}

/// Prints every problem of `err` on stderr; a located problem gets the line
/// of source it points at, with a caret under the column.
/// The most problems `report` prints; the rest are counted.
const MAX_REPORTED: usize = 50;
/// The most characters of a line a snippet shows, around its column.
const SNIPPET_WIDTH: usize = 120;

/// Prints every problem of `err` (up to [`MAX_REPORTED`]), each with the
/// line it is on. Control characters in messages and lines are escaped: a
/// configuration or a path may hold terminal escape sequences.
fn report(err: &Error) {
    let printable = moat_core::run::trace_view::printable;
    // Each file is read once (by the same rules as `config::load`: bounded,
    // never blocking, never out of its directory), not once per problem.
    let mut sources: std::collections::HashMap<PathBuf, Option<String>> = Default::default();
    let all = err.diagnostics();
    for d in all.iter().take(MAX_REPORTED) {
        eprintln!("error: {}", printable(&d.to_string()));
        if let Some(loc) = &d.location {
            let text = sources
                .entry(loc.path.clone())
                .or_insert_with(|| config::read_config_source(&loc.path).ok());
            if let Some(snippet) = text
                .as_deref()
                .and_then(|t| snippet(t, loc.line, loc.column))
            {
                eprintln!("{snippet}");
            }
        }
    }
    if all.len() > MAX_REPORTED {
        eprintln!("error: ... and {} more problems", all.len() - MAX_REPORTED);
    }
}

/// Line `line` of `text` with a caret under `column`: at most
/// [`SNIPPET_WIDTH`] characters of it, around the column, escaped.
fn snippet(text: &str, line: u32, column: u32) -> Option<String> {
    let source = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let column = usize::try_from(column).ok()?.saturating_sub(1);
    let chars: Vec<char> = source.chars().collect();
    let start = column.saturating_sub(SNIPPET_WIDTH / 2).min(chars.len());
    let end = (start + SNIPPET_WIDTH).min(chars.len());
    let escape =
        |part: &[char]| moat_core::run::trace_view::printable(&part.iter().collect::<String>());
    let before = escape(&chars[start..column.clamp(start, end)]);
    let shown = format!(
        "{}{}{}",
        if start > 0 { "..." } else { "" },
        escape(&chars[start..end]),
        if end < chars.len() { "..." } else { "" }
    );
    let number = line.to_string();
    let pad = " ".repeat(number.len());
    // Columns count characters; keep tabs so the caret lines up.
    let lead: String = (if start > 0 { "..." } else { "" })
        .chars()
        .chain(before.chars())
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    Some(format!(" {number} | {shown}\n {pad} | {lead}^"))
}
