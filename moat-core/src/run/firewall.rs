//! Strict mode's enforcement, on the host where the agent cannot reach it:
//! a netfilter chain per run (`MOAT-<12 hex>`, in iptables and ip6tables)
//! that lets the run's bridge reach the proxy's port (and the SSH
//! forwarders' ports of `ssh:` grants) on the gateway address and drops everything else it sends, to the host or through it.
//!
//! The run's network is also `internal` (no route out) and the container
//! runs without capabilities; these rules are what holds even if something
//! inside gained them, since they live in the host's network namespace.

use std::net::IpAddr;
use std::process::Command;

use crate::error::{Error, ErrorKind, Result};

fn chain(run_id: &str) -> String {
    format!("MOAT-{}", run_id.trim_start_matches("run_"))
}

fn guard_chain(run_id: &str) -> String {
    format!("MOAT-G-{}", run_id.trim_start_matches("run_"))
}

/// Installs the guard of the run's listeners (the proxy, the SSH
/// forwarders): TCP to `gateway:port` is accepted only from the run's
/// bridge and from the host itself (`lo`); other networks' containers,
/// which the host would otherwise route there, are dropped. Used in both
/// modes where the host firewall can be changed.
pub(crate) fn guard(run_id: &str, bridge: &str, gateway: IpAddr, ports: &[u16]) -> Result<()> {
    let name = guard_chain(run_id);
    let gw = gateway.to_string();
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut rules: Vec<Vec<&str>> = vec![
        vec!["-N", &name],
        vec!["-A", &name, "-i", "lo", "-j", "RETURN"],
        vec!["-A", &name, "-i", bridge, "-j", "RETURN"],
        vec!["-A", &name, "-j", "DROP"],
    ];
    for port in &ports {
        rules.push(vec![
            "-I", "INPUT", "1", "-p", "tcp", "-d", &gw, "--dport", port, "-j", &name,
        ]);
    }
    for args in &rules {
        if let Err(e) = run(false, args) {
            let _ = remove_chain(false, &name);
            return Err(Error::new(
                ErrorKind::Runtime,
                format!("installing the proxy's guard rules: {e}"),
            ));
        }
    }
    Ok(())
}

fn ipv6_present() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

fn tool(ip6: bool) -> &'static str {
    if ip6 {
        "ip6tables"
    } else {
        "iptables"
    }
}

fn run(ip6: bool, args: &[&str]) -> std::result::Result<String, String> {
    // Wait at most 10 s for the xtables lock, never forever.
    let out = Command::new(tool(ip6))
        .args(["-w", "10"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tool(ip6)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{} {}` failed: {}",
            tool(ip6),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn refuse(detail: String) -> Error {
    Error::new(
        ErrorKind::Runtime,
        format!(
            "strict network policy cannot be enforced on this host, so the run was not started: {detail}. \
             Strict mode needs iptables (and ip6tables when IPv6 is on) and the right to change the host's \
             firewall: run moat as root or with CAP_NET_ADMIN"
        ),
    )
}

/// Checks that the rules can be installed here.
pub(crate) fn check() -> Result<()> {
    run(false, &["-S", "INPUT"]).map_err(refuse)?;
    if ipv6_present() {
        run(true, &["-S", "INPUT"]).map_err(refuse)?;
    }
    Ok(())
}

/// Installs the run's rules: from `bridge`, only TCP to `gateway:port` for
/// each of `ports` (the proxy's, the SSH forwarders').
pub(crate) fn install(run_id: &str, bridge: &str, gateway: IpAddr, ports: &[u16]) -> Result<()> {
    let name = chain(run_id);
    let gw = gateway.to_string();
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut v4: Vec<Vec<&str>> = vec![
        vec!["-N", &name],
        // Replies on connections the host opened (the router reaching an
        // endpoint); the container cannot open one itself.
        vec![
            "-A",
            &name,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ],
    ];
    for port in &ports {
        v4.push(vec![
            "-A", &name, "-p", "tcp", "-d", &gw, "--dport", port, "-j", "ACCEPT",
        ]);
    }
    v4.extend([
        vec!["-A", &name, "-j", "DROP"],
        vec!["-I", "INPUT", "1", "-i", bridge, "-j", &name],
        vec!["-I", "FORWARD", "1", "-i", bridge, "-j", &name],
        vec!["-I", "FORWARD", "1", "-o", bridge, "-j", &name],
    ]);
    let v6: Vec<Vec<&str>> = vec![
        vec!["-N", &name],
        vec!["-A", &name, "-j", "DROP"],
        vec!["-I", "INPUT", "1", "-i", bridge, "-j", &name],
        vec!["-I", "FORWARD", "1", "-i", bridge, "-j", &name],
        vec!["-I", "FORWARD", "1", "-o", bridge, "-j", &name],
    ];
    let result = (|| {
        for args in &v4 {
            run(false, args)?;
        }
        if ipv6_present() {
            for args in &v6 {
                run(true, args)?;
            }
        }
        Ok::<(), String>(())
    })();
    if let Err(e) = result {
        let _ = remove(run_id);
        return Err(refuse(e));
    }
    Ok(())
}

/// Removes the jumps to a chain and the chain. Another process removing
/// the same rules at the same time is fine: what matters is that they are
/// gone at the end.
fn remove_chain(ip6: bool, name: &str) -> std::result::Result<(), String> {
    let jump = format!("-j {name}");
    let mut last_error = None;
    for builtin in ["INPUT", "FORWARD"] {
        let rules = run(ip6, &["-S", builtin])?;
        for rule in rules.lines().filter(|r| r.ends_with(&jump)) {
            let mut args: Vec<&str> = rule.split_whitespace().collect();
            if args.first() == Some(&"-A") {
                args[0] = "-D";
                if let Err(e) = run(ip6, &args) {
                    last_error = Some(e);
                }
            }
        }
    }
    if run(ip6, &["-S", name]).is_ok() {
        let _ = run(ip6, &["-F", name]);
        if let Err(e) = run(ip6, &["-X", name]) {
            last_error = Some(e);
        }
    }
    let jumps_left = ["INPUT", "FORWARD"]
        .iter()
        .any(|b| run(ip6, &["-S", b]).is_ok_and(|rules| rules.lines().any(|r| r.ends_with(&jump))));
    if jumps_left || run(ip6, &["-S", name]).is_ok() {
        return Err(last_error.unwrap_or_else(|| format!("chain {name} is still there")));
    }
    Ok(())
}

/// Removes a run's rules; nothing to remove is fine. Hosts where iptables
/// is missing or not ours to change have no rules of moat's to remove.
pub(crate) fn remove(run_id: &str) -> Result<()> {
    if run(false, &["-S", "INPUT"]).is_err() {
        return Ok(());
    }
    let name = chain(run_id);
    remove_chain(false, &guard_chain(run_id))
        .map_err(|e| Error::new(ErrorKind::Runtime, format!("removing firewall rules: {e}")))?;
    remove_chain(false, &name)
        .map_err(|e| Error::new(ErrorKind::Runtime, format!("removing firewall rules: {e}")))?;
    if ipv6_present() && run(true, &["-S", "INPUT"]).is_ok() {
        remove_chain(true, &name)
            .map_err(|e| Error::new(ErrorKind::Runtime, format!("removing firewall rules: {e}")))?;
    }
    Ok(())
}
