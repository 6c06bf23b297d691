//! The run's own endpoints by their URLs from inside its container
//! (`MOAT_URL_WEB`: a service calling itself or a sibling endpoint, an
//! OAuth callback).
//!
//! `https://web.<agent>.localhost:8080` names loopback: clients resolve
//! `*.localhost` to 127.0.0.1 themselves (curl does, without asking DNS) and
//! leave it out of the proxy (`NO_PROXY=localhost` covers its subdomains).
//! Inside the container that is the container's own loopback, where nothing
//! routes. So, in the container's network namespace only, connections to
//! 127.0.0.1 at the router's port are sent (DNAT) to a router of the run's
//! own on its network's gateway ([`crate::routing::Router::serve_own`]): it
//! serves HTTP and HTTPS as the routing proxy does, but judges every
//! request (not only a connection's first) and serves only the run's own
//! endpoints, never a listing of other agents, with a bounded number of
//! connections. The rules live and die with the container's namespace; the
//! agent, without CAP_NET_ADMIN, cannot change them.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, ErrorKind, Result};

/// Sends the container's connections to 127.0.0.1:`router_port` to
/// `forwarder`, in the network namespace of the process `pid` (the
/// container's): a DNAT in its own `nat` table, the source rewritten to the
/// container's address, and `route_localnet` so a loopback-sourced packet
/// may leave. Needs root on the host (it enters the namespace).
///
/// The namespace is opened once and checked not to be the host's (a pid
/// reused after the container's init exited would otherwise point the
/// rules at the host); the commands enter it through that open handle.
pub(super) fn install(pid: u32, router_port: u16, forwarder: SocketAddr) -> Result<()> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path)
        .map_err(|e| Error::io(std::path::Path::new(&path), "open", e))?;
    let host = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| Error::io(std::path::Path::new("/proc/self/ns/net"), "read", e))?;
    let theirs = ns
        .metadata()
        .map_err(|e| Error::io(std::path::Path::new(&path), "read", e))?;
    if (theirs.dev(), theirs.ino()) == (host.dev(), host.ino()) {
        return Err(Error::new(
            ErrorKind::Runtime,
            format!("process {pid} is in the host's network namespace, not the container's (did the container exit?)"),
        ));
    }
    // The handle, inherited by nsenter as fd 3.
    let net = "/proc/self/fd/3";
    let port = router_port.to_string();
    let to = forwarder.to_string();
    let steps: [&[&str]; 3] = [
        &["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
        &[
            "iptables",
            // Wait for the xtables lock at most 10 s (as the host's rules
            // do): a lock held elsewhere must not hang the run's start.
            "-w",
            "10",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "127.0.0.1/32",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
        &[
            "iptables",
            // Wait for the xtables lock at most 10 s (as the host's rules
            // do): a lock held elsewhere must not hang the run's start.
            "-w",
            "10",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "127.0.0.0/8",
            "!",
            "-o",
            "lo",
            "-j",
            "MASQUERADE",
        ],
    ];
    for step in steps {
        let mut command = std::process::Command::new("nsenter");
        command.arg(format!("--net={net}")).arg("--").args(step);
        let handle = ns
            .try_clone()
            .map_err(|e| Error::io(std::path::Path::new(&path), "open", e))?;
        // SAFETY: between fork and exec, dup2 of a descriptor we own onto 3
        // (async-signal-safe); the child's copy is cleared of CLOEXEC by dup2.
        unsafe {
            use std::os::unix::io::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = handle.as_raw_fd();
            command.pre_exec(move || {
                if fd == 3 {
                    // dup2 onto itself keeps CLOEXEC: clear it instead.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = command
            .output()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Runtime,
                    format!("cannot run nsenter (util-linux) to route the run's endpoints inside its container: {e}"),
                )
            })?;
        if !out.status.success() {
            return Err(Error::new(
                ErrorKind::Runtime,
                format!(
                    "cannot route the run's endpoints inside its container ({}): {}",
                    step.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_namespace_is_refused() {
        // This process is in the host's namespace: installing there is
        // exactly what must never happen.
        let err = install(std::process::id(), 8080, "127.0.0.1:1".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("host's network namespace"),
            "{err}"
        );
    }
}
