//! `moat proxy start/stop/status` and the hidden `moat _router`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use moat_core::routing::{daemon, table};
use moat_core::{paths, Error, ErrorKind};

use crate::write_stdout;

#[derive(Args, Debug)]
pub struct ProxyArgs {
    #[command(subcommand)]
    pub command: ProxyCommand,
}

#[derive(Subcommand, Debug)]
pub enum ProxyCommand {
    /// Start the routing proxy (stays until `moat proxy stop`)
    Start {
        /// Port on 127.0.0.1 (default MOAT_PROXY_PORT or 8080)
        #[arg(long)]
        port: Option<u16>,
    },
    /// Stop the routing proxy
    Stop,
    /// Show the routing proxy and the agents it routes to
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RouterArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub manual: bool,
}

fn router_command() -> Result<Vec<std::ffi::OsString>, Error> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot find this program: {e}"),
        )
    })?;
    Ok(vec![exe.into(), "_router".into()])
}

pub fn cmd_proxy(args: &ProxyArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    match &args.command {
        ProxyCommand::Start { port } => {
            let port = match port {
                Some(p) => *p,
                None => daemon::default_port()?,
            };
            let before = daemon::status(&home);
            let state = daemon::ensure(&home, &router_command()?, port, true)?;
            if before.is_some() {
                eprintln!(
                    "The routing proxy is already running on port {} (pid {}); it now stays until `moat proxy stop`",
                    state.port, state.pid
                );
            } else {
                eprintln!(
                    "Routing proxy started on 127.0.0.1:{} (pid {})",
                    state.port, state.pid
                );
            }
            Ok(())
        }
        ProxyCommand::Stop => {
            if daemon::stop(&home)? {
                eprintln!("Routing proxy stopped");
            } else {
                eprintln!("The routing proxy is not running");
            }
            Ok(())
        }
        ProxyCommand::Status { json } => {
            let state = daemon::status(&home);
            let routes = table::load(&home)?;
            let ca = home.join("proxy").join("ca").join("ca.crt");
            if *json {
                let value = serde_json::json!({
                    "running": state.is_some(),
                    "port": state.as_ref().map(|s| s.port),
                    "pid": state.as_ref().map(|s| s.pid),
                    "manual": state.as_ref().map(|s| s.manual),
                    "ca": ca,
                    "agents": routes.agents,
                });
                return write_stdout(&format!("{value:#}\n"));
            }
            let mut out = String::from("Routing Proxy\n=============\n");
            match &state {
                Some(s) => out.push_str(&format!(
                    "Status: running (pid {})\nPort: {}\n",
                    s.pid, s.port
                )),
                None => out.push_str("Status: not running\n"),
            }
            out.push_str(&format!("CA: {}\n\nRegistered Agents:\n", ca.display()));
            if routes.agents.is_empty() {
                out.push_str("  (none)\n");
            }
            for (agent, r) in &routes.agents {
                let endpoints: Vec<String> = r
                    .endpoints
                    .iter()
                    .map(|(name, addr)| {
                        format!("{name}:{}", addr.rsplit(':').next().unwrap_or("?"))
                    })
                    .collect();
                out.push_str(&format!("  {agent:<12}{}\n", endpoints.join(", ")));
            }
            write_stdout(&out)
        }
    }
}

pub fn cmd_router(args: &RouterArgs) -> Result<(), Error> {
    let home: PathBuf = paths::moat_home()?;
    daemon::serve(&home, args.port, args.manual)
}
