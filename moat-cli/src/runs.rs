//! `moat run`, `attach`, `list`, `status`, `stop`, `destroy`, `clean`,
//! `logs`, `trace`: argument handling and printing over `moat_core::run`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use moat_core::config::{self, Overrides};
use moat_core::run::{self, logs, Launcher, RunMeta, RunSpec};
use moat_core::{paths, Error, ErrorKind};

use crate::write_stdout;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Workspace directory (mounted at /workspace), or its agent.yaml
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// The command to run (after --); overrides command: in agent.yaml
    #[arg(last = true)]
    pub command: Vec<String>,
    /// Run name (overrides name: in agent.yaml); unique among running runs
    #[arg(long)]
    pub name: Option<String>,
    /// Image to use as is (overrides image: and dependencies:)
    #[arg(long)]
    pub image: Option<String>,
    /// Credential to inject (repeatable, or a comma list): github, anthropic, aws, ...
    #[arg(long = "grant", value_name = "PROVIDER")]
    pub grants: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run in the background; prints the run id
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Interactive mode (TTY and stdin)
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Print the run's description as JSON when it starts (with -d)
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunRef {
    /// Run id, id prefix or name (default: the most recent run)
    pub run: Option<String>,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Run id, id prefix or name
    pub run: String,
    /// Interactive (-i) or output-only (-i=false); default: the run's mode
    #[arg(short = 'i', long = "interactive", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub interactive: Option<bool>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Run id, id prefix or name (default: the most recent run)
    pub run: Option<String>,
    /// Seconds to wait after SIGTERM before SIGKILL
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub grace: u32,
}

#[derive(Args, Debug)]
pub struct CleanArgs {
    /// Do not ask for confirmation
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Print what was removed as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Run id, id prefix or name (default: the most recent run)
    pub run: Option<String>,
    /// Only the last N lines
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<usize>,
    /// Keep printing output as it arrives, until the run ends
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print one JSON object per chunk (time, stream, text)
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Run id, id prefix or name (default: the most recent run)
    pub run: Option<String>,
    /// Show the network trace (the HTTP requests through the proxy)
    #[arg(long)]
    pub network: bool,
    /// Show headers too
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Print JSON lines
    #[arg(long)]
    pub json: bool,
}

fn home() -> Result<PathBuf, Error> {
    paths::moat_home()
}

fn launcher() -> Launcher {
    match std::env::current_exe() {
        Ok(exe) => Launcher::new(vec![exe.into(), "_supervise".into()]),
        Err(_) => Launcher::default(),
    }
}

// Ctrl+C: a count of SIGINTs, read by the loops that follow a run.
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

fn catch_interrupts() {
    // SAFETY: the handler only touches an atomic (async-signal-safe).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// What the user asked for with Ctrl+C while following a run.
#[derive(Debug, PartialEq, Eq)]
enum Interrupt {
    None,
    Detach,
    Stop,
}

/// Ctrl+C detaches; a second Ctrl+C within 500 ms stops the run.
struct Interrupts {
    first: Option<Instant>,
}

impl Interrupts {
    fn check(&mut self) -> Interrupt {
        let n = INTERRUPTS.load(Ordering::SeqCst);
        match (n, self.first) {
            (0, _) => Interrupt::None,
            (1, None) => {
                self.first = Some(Instant::now());
                Interrupt::None
            }
            (1, Some(t)) if t.elapsed() < Duration::from_millis(500) => Interrupt::None,
            (1, Some(_)) => Interrupt::Detach,
            _ => Interrupt::Stop,
        }
    }
}

fn exit_code_of(meta: &RunMeta) -> ExitCode {
    // Codes outside 0..=255 (the engine reports -1 when it lost the
    // process) are failures, never success.
    match meta.exit_code.map(u8::try_from) {
        Some(Ok(code)) => ExitCode::from(code),
        _ => ExitCode::FAILURE,
    }
}

/// Prints a run's output from `offset` until it ends or the user presses
/// Ctrl+C. Returns the exit status to leave with.
fn follow_run(home: &Path, meta: &RunMeta, offset: u64) -> Result<ExitCode, Error> {
    catch_interrupts();
    let dir = run::run_dir(home, &meta.id);
    let mut interrupts = Interrupts { first: None };
    let mut outcome = Interrupt::None;
    let mut watch = run::Watch::new(home, &meta.id);
    let mut done = || {
        outcome = interrupts.check();
        if outcome != Interrupt::None {
            return true;
        }
        watch.is_over()
    };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut each = |chunk: logs::Chunk| {
        let _ = match chunk.stream {
            logs::Stream::Stdout => out.write_all(&chunk.data).and_then(|()| out.flush()),
            _ => err.write_all(&chunk.data),
        };
        true
    };
    logs::follow(&dir.join("logs.jsonl"), offset, &mut done, &mut each)?;
    match outcome {
        Interrupt::Detach => {
            eprintln!(
                "\nDetached from {} ({}); it keeps running. Reattach with `moat attach {}`, stop with `moat stop {}`.",
                meta.name, meta.id, meta.id, meta.id
            );
            Ok(ExitCode::SUCCESS)
        }
        Interrupt::Stop => {
            eprintln!("\nStopping {} ({})...", meta.name, meta.id);
            let end = run::stop(home, &meta.id, 10)?;
            Ok(exit_code_of(&end))
        }
        Interrupt::None => {
            let end = run::wait(home, &meta.id, None)?;
            if let Some(e) = &end.error {
                eprintln!("moat: run {} failed: {e}", end.id);
            }
            Ok(exit_code_of(&end))
        }
    }
}

/// The terminal in raw mode until dropped (when stdin is a terminal).
struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return RawMode { saved: None };
        }
        // SAFETY: termios calls on fd 0 with a zeroed struct they fill.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawMode { saved: None };
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawMode { saved: Some(saved) }
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the attributes read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize struct.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

/// Wires this terminal to a run's TTY until it exits, or `Ctrl-/ d`
/// detaches, or `Ctrl-/ k` stops it.
fn interact(home: &Path, meta: &RunMeta) -> Result<ExitCode, Error> {
    use moat_core::run::attach::{attach_tty, AttachEnd};
    eprint!(
        "Attached to {} ({}): Ctrl-/ d detaches, Ctrl-/ k stops.\r\n",
        meta.name, meta.id
    );
    let end = {
        let _raw = RawMode::enter();
        attach_tty(
            home,
            &meta.id,
            Box::new(std::io::stdin()),
            Box::new(std::io::stdout()),
            &terminal_size,
        )?
    };
    match end {
        AttachEnd::Exited(m) => Ok(exit_code_of(&m)),
        AttachEnd::Detached => {
            eprintln!(
                "\nDetached from {} ({}); it keeps running. Reattach with `moat attach {}`.",
                meta.name, meta.id, meta.id
            );
            Ok(ExitCode::SUCCESS)
        }
        AttachEnd::Stopped(m) => {
            eprintln!("\nStopped {} ({})", meta.name, meta.id);
            Ok(exit_code_of(&m))
        }
    }
}

pub fn cmd_run(args: &RunArgs) -> Result<ExitCode, Error> {
    let home = home()?;
    let config = config::load(&args.path)?.merge(&Overrides {
        name: args.name.clone(),
        image: args.image.clone(),
        grants: args.grants.clone(),
        env: args.env.clone(),
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        interactive: args.interactive.then_some(true),
    })?;
    let spec = RunSpec::from_config(&config);
    let meta = run::start(&home, &spec, &launcher(), &mut |message| {
        eprintln!("{message}");
    })?;
    if args.detach {
        if args.json {
            write_stdout(&(to_json(&meta)? + "\n"))?;
        } else {
            write_stdout(&format!("{}\n", meta.id))?;
            eprintln!(
                "Started {} ({}) in the background. Follow it with `moat logs -f {}`; attach with `moat attach {}`.",
                meta.name, meta.id, meta.id, meta.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if meta.interactive {
        return interact(&home, &meta);
    }
    follow_run(&home, &meta, 0)
}

pub fn cmd_attach(args: &AttachArgs) -> Result<ExitCode, Error> {
    let home = home()?;
    let meta = run::find(&home, Some(&args.run))?;
    if meta.state.is_terminal() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "run {} ({}) has {}; see its output with `moat logs {}`",
                meta.name, meta.id, meta.state, meta.id
            ),
        ));
    }
    if args.interactive.unwrap_or(meta.interactive) {
        return interact(&home, &meta);
    }
    let path = run::run_dir(&home, &meta.id).join("logs.jsonl");
    let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "Attached to {} ({}); Ctrl+C detaches, twice stops it.",
        meta.name, meta.id
    );
    follow_run(&home, &meta, offset)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string_pretty(value)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot encode json: {e}")))
}

fn age(created: &str) -> String {
    let Ok(t) = moat_core::run::parse_time(created) else {
        return "?".into();
    };
    let secs = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        - t)
        .max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

pub fn cmd_list(args: &ListArgs) -> Result<(), Error> {
    let runs = run::list(&home()?)?;
    if args.json {
        return write_stdout(&(to_json(&runs)? + "\n"));
    }
    if runs.is_empty() {
        eprintln!("No runs. Start one with `moat run`.");
        return Ok(());
    }
    let mut out = format!(
        "{:<20} {:<17} {:<9} {:<5} {}\n",
        "NAME", "RUN ID", "STATE", "AGE", "ENDPOINTS"
    );
    for r in &runs {
        let state = match (r.state, r.exit_code) {
            (run::RunState::Stopped, Some(code)) => format!("exited({code})"),
            (s, _) => s.to_string(),
        };
        let endpoints: Vec<&str> = r.ports.keys().map(String::as_str).collect();
        out.push_str(&format!(
            "{:<20} {:<17} {:<9} {:<5} {}\n",
            r.name,
            r.id,
            state,
            age(&r.created_at),
            endpoints.join(", ")
        ));
    }
    write_stdout(&out)
}

pub fn cmd_status(args: &ListArgs) -> Result<(), Error> {
    let home = home()?;
    let status = run::status(&home)?;
    if args.json {
        return write_stdout(&(to_json(&status)? + "\n"));
    }
    let mut out = String::new();
    out.push_str(&format!(
        "Runs:    {} running, {} stopped, {} failed\n",
        status.running, status.stopped, status.failed
    ));
    out.push_str(&format!(
        "Disk:    {:.1} MB in {}\n",
        status.disk_bytes as f64 / 1e6,
        status.runs_dir.display()
    ));
    out.push_str("Images:\n");
    if status.images.is_empty() {
        out.push_str("  (none used yet)\n");
    }
    for image in &status.images {
        out.push_str(&format!(
            "  {:<40} {} run(s){}\n",
            image.image,
            image.runs,
            match image.present {
                Some(true) => ", present",
                Some(false) => ", not pulled",
                None => "",
            }
        ));
    }
    out.push_str("Health:\n");
    for check in &status.health {
        out.push_str(&format!(
            "  {:<8} {:<14} {}\n",
            if check.ok { "ok" } else { "PROBLEM" },
            check.name,
            check.detail
        ));
    }
    write_stdout(&out)
}

pub fn cmd_stop(args: &StopArgs) -> Result<(), Error> {
    let home = home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    if meta.state.is_terminal() {
        eprintln!("{} ({}) has already {}", meta.name, meta.id, meta.state);
        return Ok(());
    }
    let end = run::stop(&home, &meta.id, args.grace)?;
    if !end.state.is_terminal() {
        return Err(Error::new(
            ErrorKind::Runtime,
            format!("{} ({}) did not stop within 30 s", end.name, end.id),
        ));
    }
    eprintln!("Stopped {} ({})", end.name, end.id);
    Ok(())
}

pub fn cmd_destroy(args: &RunRef) -> Result<(), Error> {
    let home = home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    run::destroy(&home, &meta.id)?;
    eprintln!("Removed {} ({}) and its artifacts", meta.name, meta.id);
    Ok(())
}

pub fn cmd_clean(args: &CleanArgs) -> Result<(), Error> {
    let home = home()?;
    let candidates = run::cleanable(&home)?;
    if !args.force {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "moat clean asks before removing anything; pass -f to clean without a terminal",
            ));
        }
        eprintln!(
            "This removes {} stopped run(s) and their artifacts (logs, traces, audit logs), and any container, network or firewall rule moat left behind.",
            candidates.len()
        );
        eprint!("Continue? [y/N] ");
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("Nothing removed.");
            return Ok(());
        }
    }
    let cleaned = run::clean(&home)?;
    if args.json {
        return write_stdout(&(to_json(&cleaned)? + "\n"));
    }
    eprintln!(
        "Removed {} run(s), {} leftover container(s), {} leftover network(s)",
        cleaned.runs.len(),
        cleaned.containers.len(),
        cleaned.networks.len()
    );
    Ok(())
}

pub fn cmd_logs(args: &LogsArgs) -> Result<ExitCode, Error> {
    let home = home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    let path = run::run_dir(&home, &meta.id).join("logs.jsonl");
    // One reader from the start: following goes on exactly where the
    // output shown so far ends.
    let mut follower = logs::Follower::new(&path, 0);
    let chunks = follower.poll()?;
    let shown = match args.lines {
        Some(n) => logs::tail(&chunks, n),
        None => &chunks[..],
    };
    let print = |chunk: &logs::Chunk| {
        if args.json {
            let line = serde_json::json!({
                "time": chunk.time,
                "stream": chunk.stream,
                "text": String::from_utf8_lossy(&chunk.data),
            });
            let _ = writeln!(std::io::stdout(), "{line}");
        } else {
            let _ = std::io::stdout().write_all(&chunk.data);
        }
    };
    for c in shown {
        print(c);
    }
    if args.follow && !meta.state.is_terminal() {
        catch_interrupts();
        let mut watch = run::Watch::new(&home, &meta.id);
        let mut done = || INTERRUPTS.load(Ordering::SeqCst) > 0 || watch.is_over();
        logs::follow(&path, follower.offset(), &mut done, &mut |c| {
            print(&c);
            true
        })?;
    }
    let _ = std::io::stdout().flush();
    Ok(ExitCode::SUCCESS)
}

pub fn cmd_trace(args: &TraceArgs) -> Result<(), Error> {
    let home = home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    let records = run::trace(&home, &meta.id)?;
    if args.json {
        let mut out = String::new();
        for r in &records {
            out.push_str(&r.to_string());
            out.push('\n');
        }
        return write_stdout(&out);
    }
    if records.is_empty() {
        eprintln!("No requests recorded for {} ({})", meta.name, meta.id);
        return Ok(());
    }
    let mut out = String::new();
    for r in &records {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let status = r
            .get("status")
            .and_then(|v| v.as_u64())
            .map_or("-".to_string(), |v| v.to_string());
        let ms = r.get("duration_ms").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let mut line = format!(
            "{} {:<7} {} {} {:.0}ms",
            s("time"),
            s("method"),
            s("url"),
            status,
            ms
        );
        if let Some(g) = r.get("grant").and_then(|v| v.as_str()) {
            line.push_str(&format!(" [grant: {g}]"));
        }
        if let Some(d) = r.get("denied").and_then(|v| v.as_str()) {
            line.push_str(&format!(" [denied: {d}]"));
        }
        if let Some(e) = r.get("error").and_then(|v| v.as_str()) {
            line.push_str(&format!(" [error: {e}]"));
        }
        out.push_str(&line);
        out.push('\n');
        if args.verbose {
            for (key, label) in [("request_headers", ">"), ("response_headers", "<")] {
                if let Some(headers) = r.get(key).and_then(|v| v.as_array()) {
                    for h in headers {
                        if let Some(pair) = h.as_array() {
                            out.push_str(&format!(
                                "    {label} {}: {}\n",
                                pair.first().and_then(|v| v.as_str()).unwrap_or(""),
                                pair.get(1).and_then(|v| v.as_str()).unwrap_or("")
                            ));
                        }
                    }
                }
            }
        }
    }
    write_stdout(&out)
}
