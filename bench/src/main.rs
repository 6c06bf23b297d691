//! moat-bench: measures the moat proxy against direct connections and
//! mitmproxy. `scripts/bench.sh` runs everything; see `bench/README.md`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod load;
mod net;
mod procfs;
mod proxy_cmd;
mod rules;
mod sink;
mod suite;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "moat-bench",
    about = "Benchmarks of the moat proxy (loopback only)"
)]
struct Cli {
    /// Tokio worker threads (moat's own runtime uses 2).
    #[arg(long, global = true, default_value_t = 2)]
    workers: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a moat proxy in this process; print its URL, serve until killed.
    Proxy(proxy_cmd::ProxyArgs),
    /// One load point (direct or through a proxy); JSON on stdout.
    Load(load::LoadArgs),
    /// An upload sink that reads whole request bodies.
    Sink(sink::SinkArgs),
    /// Every measurement in one run; writes the Markdown report.
    Suite(Box<suite::SuiteArgs>),
    /// The cost of judging requests against 100 request rules.
    Rules(rules::RulesArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Two workers by default, like moat's own runtime (moat_core::blocking).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moat-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Proxy(a) => proxy_cmd::main(a).await,
            Cmd::Load(a) => load::main(a).await,
            Cmd::Sink(a) => sink::main(a).await,
            Cmd::Suite(a) => suite::main(*a).await,
            Cmd::Rules(a) => rules::main(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
