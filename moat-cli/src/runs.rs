//! `moat run`, `attach`, `list`, `status`, `stop`, `destroy`, `clean`,
//! `logs`, `trace`: argument handling and printing over `moat_core::run`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use moat_core::config::{Overrides, Spelling};
use moat_core::run::{self, logs, trace_view, Launcher, RunMeta, RunPlan};
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
    /// The container engine: docker or podman (default: runtime: in
    /// agent.yaml, else MOAT_RUNTIME, else the one present)
    #[arg(long, value_name = "ENGINE")]
    pub runtime: Option<String>,
}

impl RunArgs {
    /// The flags that change the workspace's configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            name: self.name.clone(),
            image: self.image.clone(),
            grants: self.grants.clone(),
            env: self.env.clone(),
            command: (!self.command.is_empty()).then(|| self.command.clone()),
            interactive: self.interactive.then_some(true),
            runtime: self.runtime.clone(),
            spelling: Spelling::Flags,
            ..Overrides::default()
        }
    }
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
    /// List what would be removed; remove nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the images moat built (the next run reuses them at once)
    #[arg(long)]
    pub keep_images: bool,
    /// Print what was removed (or would be, with --dry-run) as JSON
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
    /// The network trace: one line per request through the proxy, in local
    /// time (the default: it is the trace moat keeps)
    #[arg(long)]
    pub network: bool,
    /// Show headers (credentials redacted), sizes and captured bodies too
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Print the records as JSON lines
    #[arg(long, conflicts_with = "har")]
    pub json: bool,
    /// Write the trace as HAR 1.2 to FILE (`-`: standard output), for a
    /// browser's devtools or mitmproxy
    #[arg(long, value_name = "FILE")]
    pub har: Option<PathBuf>,
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

/// The exit status of a run that moat itself could not start or keep (the
/// engine, the image, the configuration, the run's setup), as `docker run`
/// has it; a command's own status is kept as it is.
pub const MOAT_FAILED: u8 = 125;

fn exit_code_of(meta: &RunMeta) -> ExitCode {
    // Codes outside 0..=255 (the engine reports -1 when it lost the
    // process) are failures, never success.
    match meta.exit_code.map(u8::try_from) {
        Some(Ok(code)) => ExitCode::from(code),
        None if meta.state == run::RunState::Failed => ExitCode::from(MOAT_FAILED),
        _ => ExitCode::FAILURE,
    }
}

/// The state as `list` shows it: a stopped run with its exit code.
fn state_text(r: &RunMeta) -> String {
    match (r.state, r.exit_code) {
        (run::RunState::Stopped, Some(code)) => format!("exited({code})"),
        (s, _) => s.to_string(),
    }
}

/// Says, on stderr, why a failed run failed (or what a stopped one could
/// not do), once.
fn say_problem(meta: &RunMeta) {
    match (meta.state, &meta.error) {
        (run::RunState::Failed, Some(e)) => {
            eprintln!("moat: run {} ({}) failed: {e}", meta.name, meta.id)
        }
        (run::RunState::Failed, None) => eprintln!(
            "moat: run {} ({}) failed before it could say why; see its supervisor.log in the run's directory",
            meta.name, meta.id
        ),
        (_, Some(e)) => eprintln!("moat: run {} ({}): {e}", meta.name, meta.id),
        _ => {}
    }
}

/// The run's endpoints and their URLs, one per line, for stderr.
fn endpoint_lines(meta: &RunMeta) -> String {
    meta.urls
        .iter()
        .map(|(name, url)| format!("  {name}: {url}\n"))
        .collect()
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
            let end = run::stop(home, meta, 10)?;
            Ok(exit_code_of(&end))
        }
        Interrupt::None => {
            let end = run::wait(home, &meta.id, None)?;
            if end.state == run::RunState::Failed {
                say_problem(&end);
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
/// detaches, or `Ctrl-/ k` stops it. A run just started (`held`) starts
/// once this terminal is attached.
fn interact(home: &Path, meta: &RunMeta, held: Option<run::Held>) -> Result<ExitCode, Error> {
    use moat_core::run::attach::{attach_tty, AttachEnd};
    eprint!(
        "Attached to {} ({}): Ctrl-/ d detaches, Ctrl-/ k stops.\r\n",
        meta.name, meta.id
    );
    let release = held.map(|held| {
        Box::new(move || {
            // In raw mode by now: lines end in \r\n.
            let meta = held.release(&mut |message| eprint!("{message}\r\n"))?;
            if !meta.urls.is_empty() {
                eprint!(
                    "Endpoints of {}:\r\n{}",
                    meta.name,
                    endpoint_lines(&meta).replace('\n', "\r\n")
                );
            }
            Ok(())
        }) as Box<dyn FnOnce() -> Result<(), Error> + Send>
    });
    let end = {
        let _raw = RawMode::enter();
        attach_tty(
            home,
            &meta.id,
            Box::new(std::io::stdin()),
            Box::new(std::io::stdout()),
            &terminal_size,
            release,
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
    let plan = RunPlan::new(&args.path, &args.overrides())?;
    start_and_follow(&plan, args.detach, args.json)
}

/// Which of standard input and output is not a terminal, if one is not.
fn not_a_terminal() -> Option<&'static str> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        Some("standard input")
    } else if !std::io::stdout().is_terminal() {
        Some("standard output")
    } else {
        None
    }
}

/// An interactive run attached here needs a terminal on both ends: without
/// one its output would be mixed with raw TTY traffic and lost. Refused
/// before anything starts, as `docker run -it` does.
fn need_terminal(plan: &RunPlan, detach: bool) -> Result<(), Error> {
    if !plan.interactive || detach {
        return Ok(());
    }
    match not_a_terminal() {
        None => Ok(()),
        Some(which) => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "an interactive run (-i, or interactive: true in agent.yaml) needs a terminal, and {which} is not one; run it from a terminal, start it with -d and `moat attach -i` from one, or run it without -i (set interactive: false) to pipe its input and output"
            ),
        )),
    }
}

/// Starts a planned run, then follows it (or, detached, says how to).
fn start_and_follow(plan: &RunPlan, detach: bool, json: bool) -> Result<ExitCode, Error> {
    need_terminal(plan, detach)?;
    let home = home()?;
    if plan.interactive && !detach {
        // Attached before the container starts, as `docker run -it` is:
        // what the command prints first (a shell's prompt) is not lost.
        let held = run::start_held(&home, plan, &launcher(), &mut |message| {
            eprintln!("{message}");
        })?;
        let meta = held.meta().clone();
        return interact(&home, &meta, Some(held));
    }
    let meta = run::start(&home, plan, &launcher(), &mut |message| {
        eprintln!("{message}");
    })?;
    if detach {
        if json {
            write_stdout(&(to_json(&meta)? + "\n"))?;
        } else {
            write_stdout(&format!("{}\n", meta.id))?;
            eprint!(
                "Started {} ({}) in the background. Follow it with `moat logs -f {}`; attach with `moat attach {}`.\n{}",
                meta.name,
                meta.id,
                meta.id,
                meta.id,
                if meta.urls.is_empty() { String::new() } else { format!("Endpoints:\n{}", endpoint_lines(&meta)) }
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !meta.urls.is_empty() {
        eprint!("Endpoints of {}:\n{}", meta.name, endpoint_lines(&meta));
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
        // A run without a TTY is refused as such by `interact`; one with a
        // TTY needs a terminal here.
        if let Some(which) = not_a_terminal().filter(|_| meta.interactive) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "attaching to interactive run {} needs a terminal, and {which} is not one; attach from a terminal, or follow its output without one: `moat attach -i=false {}` or `moat logs -f {}`",
                    meta.name, meta.id, meta.id
                ),
            ));
        }
        return interact(&home, &meta, None);
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
    // Columns as wide as their widest value, as docker's tables are.
    let states: Vec<String> = runs.iter().map(state_text).collect();
    let name_w = runs.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let state_w = states.iter().map(String::len).max().unwrap_or(0).max(5);
    let mut out = format!(
        "{:<name_w$}  {:<16}  {:<state_w$}  {:<5}  {}\n",
        "NAME", "RUN ID", "STATE", "AGE", "ENDPOINTS"
    );
    for (r, state) in runs.iter().zip(&states) {
        // An endpoint with its URL while the run serves it, else its name.
        let endpoints: Vec<String> = r
            .ports
            .keys()
            .map(|name| match r.urls.get(name) {
                Some(url) if !r.state.is_terminal() => url.clone(),
                _ => name.clone(),
            })
            .collect();
        out.push_str(&format!(
            "{:<name_w$}  {:<16}  {:<state_w$}  {:<5}  {}\n",
            r.name,
            r.id,
            state,
            age(&r.created_at),
            endpoints.join(", ")
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("  ! {}\n", e.replace('\n', " ")));
        }
    }
    write_stdout(&out)
}

/// `moat status`: exits 1 when a health check found a problem, so a script
/// can tell (what it found is printed either way).
pub fn cmd_status(args: &ListArgs) -> Result<ExitCode, Error> {
    let home = home()?;
    let status = run::status(&home)?;
    let healthy = status.health.iter().all(|c| c.ok);
    let code = if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if args.json {
        write_stdout(&(to_json(&status)? + "\n"))?;
        return Ok(code);
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
    let failed: Vec<RunMeta> = run::list(&home)?
        .into_iter()
        .filter(|r| r.state == run::RunState::Failed)
        .collect();
    if !failed.is_empty() {
        out.push_str("Failed runs:\n");
        for r in &failed {
            out.push_str(&format!(
                "  {} ({}): {}\n",
                r.name,
                r.id,
                r.error
                    .as_deref()
                    .unwrap_or("no reason recorded")
                    .replace('\n', " ")
            ));
        }
    }
    write_stdout(&out)?;
    Ok(code)
}

pub fn cmd_stop(args: &StopArgs) -> Result<(), Error> {
    let home = home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    if meta.state.is_terminal() {
        eprintln!("{} ({}) has already {}", meta.name, meta.id, meta.state);
        return Ok(());
    }
    let end = run::stop(&home, &meta, args.grace)?;
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
    use run::CleanOptions;
    let home = home()?;
    let options = |dry_run| CleanOptions {
        dry_run,
        keep_images: args.keep_images,
    };
    if args.dry_run {
        let plan = run::clean_with(&home, options(true))?;
        if args.json {
            return write_stdout(&(to_json(&plan)? + "\n"));
        }
        let mut out = String::new();
        for (what, names) in [
            ("run", &plan.runs),
            ("image", &plan.images),
            ("container", &plan.containers),
            ("network", &plan.networks),
            ("firewall", &plan.firewall),
        ] {
            for name in names {
                out.push_str(&format!("{what:<10} {name}\n"));
            }
        }
        write_stdout(&out)?;
        eprintln!(
            "Would remove {}; nothing was removed.",
            clean_summary(&plan)
        );
        return Ok(());
    }
    if !args.force {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "moat clean asks before removing anything; pass -f to clean without a terminal (--dry-run lists what would go)",
            ));
        }
        // Found as the cleaning finds it, so the question counts what goes.
        let plan = run::clean_with(&home, options(true))?;
        eprintln!(
            "This removes {} stopped run(s) and their artifacts (logs, traces, audit logs), {} image(s) moat built that no run uses, and {} container(s), {} network(s) and {} firewall chain set(s) moat left behind. `moat clean --dry-run` lists them.",
            plan.runs.len(),
            plan.images.len(),
            plan.containers.len(),
            plan.networks.len(),
            plan.firewall.len()
        );
        eprint!("Continue? [y/N] ");
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("Nothing removed.");
            return Ok(());
        }
    }
    let cleaned = run::clean_with(&home, options(false))?;
    if args.json {
        return write_stdout(&(to_json(&cleaned)? + "\n"));
    }
    eprintln!("Removed {}", clean_summary(&cleaned));
    Ok(())
}

fn clean_summary(c: &run::Cleaned) -> String {
    format!(
        "{} run(s), {} unused image(s), {} leftover container(s), {} leftover network(s), {} leftover firewall chain set(s)",
        c.runs.len(),
        c.images.len(),
        c.containers.len(),
        c.networks.len(),
        c.firewall.len()
    )
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
    // Whether the reader is still there: `moat logs -f RUN | head` ends
    // when head does, not when the run does.
    let print = |chunk: &logs::Chunk| -> bool {
        let mut out = std::io::stdout();
        if args.json {
            let line = serde_json::json!({
                "time": chunk.time,
                "stream": chunk.stream,
                "text": String::from_utf8_lossy(&chunk.data),
            });
            writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
        } else {
            out.write_all(&chunk.data)
                .and_then(|()| out.flush())
                .is_ok()
        }
    };
    for c in shown {
        if !print(c) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    if args.follow && !meta.state.is_terminal() {
        catch_interrupts();
        let mut watch = run::Watch::new(&home, &meta.id);
        let mut done = || INTERRUPTS.load(Ordering::SeqCst) > 0 || watch.is_over();
        let mut reader_there = true;
        logs::follow(&path, follower.offset(), &mut done, &mut |c| {
            reader_there = print(&c);
            reader_there
        })?;
        if !reader_there {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let _ = std::io::stdout().flush();
    // The output may be empty (a run that never started has none): say
    // what went wrong, after it, where a reader looks last.
    say_problem(&run::find(&home, Some(&meta.id)).unwrap_or(meta));
    Ok(ExitCode::SUCCESS)
}

pub fn cmd_trace(args: &TraceArgs) -> Result<(), Error> {
    let home = home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    if let Some(file) = &args.har {
        if file.as_os_str() == "-" {
            let doc = trace_view::run_har(&home, &meta)?;
            let text = serde_json::to_string_pretty(&doc).map_err(|e| {
                Error::new(ErrorKind::Internal, format!("cannot write the HAR: {e}"))
            })?;
            return write_stdout(&(text + "\n"));
        }
        let n = trace_view::write_har(&home, Some(&meta.id), file)?;
        eprintln!(
            "Wrote {n} request(s) of {} ({}) to {}",
            meta.name,
            meta.id,
            file.display()
        );
        return Ok(());
    }
    if args.json {
        let mut out = String::new();
        for r in run::trace(&home, &meta.id)? {
            out.push_str(&r.to_string());
            out.push('\n');
        }
        return write_stdout(&out);
    }
    let records = trace_view::load(&home, &meta.id)?;
    if records.is_empty() {
        eprintln!("No requests recorded for {} ({})", meta.name, meta.id);
        return Ok(());
    }
    let mut out = String::new();
    for r in &records {
        out.push_str(&trace_view::line(r, trace_view::Zone::Local));
        out.push('\n');
        if args.verbose {
            out.push_str(&trace_view::details(r));
            out.push('\n');
        }
    }
    write_stdout(&out)
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ClaudeArgs {
    #[command(subcommand)]
    pub sessions: Option<ClaudeCommand>,
    /// Workspace directory (mounted at /workspace)
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// Answer this prompt and exit (claude -p); interactive without it
    #[arg(short = 'p', long = "prompt", value_name = "PROMPT")]
    pub prompt: Option<String>,
    /// More arguments for claude (after --), like --model or --continue
    #[arg(last = true)]
    pub args: Vec<String>,
    /// Claude Code's version (default: claude.version in agent.yaml, else the
    /// one pinned in moat)
    #[arg(long = "claude-version", value_name = "VERSION")]
    pub claude_version: Option<String>,
    /// Run name; unique among running runs
    #[arg(long)]
    pub name: Option<String>,
    /// Base image for Claude Code (overrides image: and dependencies:)
    #[arg(long)]
    pub image: Option<String>,
    /// More credentials to inject (anthropic is implied): github, aws, ...
    #[arg(long = "grant", value_name = "PROVIDER")]
    pub grants: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run in the background; prints the run id
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Print the run's description as JSON when it starts (with -d)
    #[arg(long)]
    pub json: bool,
    /// The container engine: docker or podman
    #[arg(long, value_name = "ENGINE")]
    pub runtime: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClaudeCommand {
    /// List Claude Code sessions (runs of moat claude)
    Sessions(ListArgs),
}

pub fn cmd_claude(args: &ClaudeArgs) -> Result<ExitCode, Error> {
    if let Some(ClaudeCommand::Sessions(list)) = &args.sessions {
        return claude_sessions(list).map(|()| ExitCode::SUCCESS);
    }
    let overrides = Overrides {
        name: args.name.clone(),
        image: args.image.clone(),
        grants: args.grants.clone(),
        env: args.env.clone(),
        runtime: args.runtime.clone(),
        spelling: Spelling::Flags,
        ..Overrides::default()
    };
    let options = moat_core::agent::AgentOptions {
        prompt: args.prompt.clone(),
        version: args.claude_version.clone(),
        args: args.args.clone(),
    };
    let plan = RunPlan::claude(&args.path, &overrides, &options)?;
    start_and_follow(&plan, args.detach, args.json)
}

/// `moat claude sessions`: the runs of Claude Code, newest first.
fn claude_sessions(args: &ListArgs) -> Result<(), Error> {
    let runs: Vec<RunMeta> = run::list(&home()?)?
        .into_iter()
        .filter(|r| r.agent == Some(moat_core::agent::Agent::Claude))
        .collect();
    if args.json {
        let out: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "id": r.id,
                    "state": r.state,
                    "exit_code": r.exit_code,
                    "created_at": r.created_at,
                    "workspace": r.workspace,
                    "interactive": r.interactive,
                })
            })
            .collect();
        return write_stdout(&(to_json(&out)? + "\n"));
    }
    if runs.is_empty() {
        eprintln!("No Claude Code sessions. Start one with `moat claude`.");
        return Ok(());
    }
    let mut out = format!(
        "{:<20} {:<17} {:<12} {:<5} {}\n",
        "NAME", "RUN ID", "STATE", "AGE", "WORKSPACE"
    );
    for r in &runs {
        let state = match (r.state, r.exit_code) {
            (run::RunState::Stopped, Some(code)) => format!("exited({code})"),
            (s, _) => s.to_string(),
        };
        out.push_str(&format!(
            "{:<20} {:<17} {:<12} {:<5} {}\n",
            r.name,
            r.id,
            state,
            age(&r.created_at),
            // A directory's name may hold control characters.
            moat_core::run::trace_view::printable(&r.workspace.display().to_string())
        ));
    }
    write_stdout(&out)
}
