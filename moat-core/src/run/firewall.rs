//! Strict mode's enforcement, on the host where the agent cannot reach it:
//! a netfilter chain per run (`MOAT-<12 hex>`, in iptables and ip6tables)
//! that lets the run's bridge reach the proxy's port (and the SSH
//! forwarders' ports of `ssh:` grants) on the gateway address and drops
//! everything else it sends, to the host or through it.
//!
//! The chain is in the `mangle` table, hooked first in `PREROUTING` (what
//! the bridge sends, before any routing) and `FORWARD` (what is routed to
//! it). The engines manage the `filter` and `nat` tables and put their own
//! jumps first in `FORWARD` whenever they find them missing (CNI's firewall
//! plugin on a container's start, dockerd on its restart), with `ACCEPT`
//! rules for their containers; a chain there would be overtaken. Nothing of
//! theirs touches `mangle`.
//!
//! On Docker the run's network is also `internal` (no route out); on every
//! engine the container runs without capabilities. These rules are what
//! holds even if something inside gained them, since they live in the
//! host's network namespace.

use std::net::IpAddr;
use std::process::Command;

use crate::error::{Error, ErrorKind, Result};

/// The host-side bridge of a run's network (`mt-<12 hex>`), which its
/// chains name.
pub(crate) fn bridge(run_id: &str) -> String {
    format!("mt-{}", run_id.trim_start_matches("run_"))
}

/// Does the run's bridge exist on this host (whichever engine made it)?
pub(crate) fn bridge_exists(run_id: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(bridge(run_id))
        .exists()
}

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
        vec!["-I", "PREROUTING", "1", "-i", bridge, "-j", &name],
        vec!["-I", "FORWARD", "1", "-o", bridge, "-j", &name],
    ]);
    let v6: Vec<Vec<&str>> = vec![
        vec!["-N", &name],
        vec!["-A", &name, "-j", "DROP"],
        vec!["-I", "PREROUTING", "1", "-i", bridge, "-j", &name],
        vec!["-I", "FORWARD", "1", "-o", bridge, "-j", &name],
    ];
    let result = (|| {
        for args in &v4 {
            run(false, &[&["-t", MANGLE], &args[..]].concat())?;
        }
        if ipv6_present() {
            for args in &v6 {
                run(true, &[&["-t", MANGLE], &args[..]].concat())?;
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

/// The table of the runs' strict-mode chains.
const MANGLE: &str = "mangle";

/// The tables and built-in chains moat's chains are hooked into (`filter`:
/// the guard, and strict mode's chains of earlier versions, which `clean`
/// removes too; `mangle`: strict mode).
const HOOKS: &[(&str, &[&str])] = &[
    ("filter", &["INPUT", "FORWARD"]),
    (MANGLE, &["PREROUTING", "FORWARD"]),
];

/// Removes the jumps to a chain and the chain, in every table it may be
/// in. Another process removing the same rules at the same time is fine:
/// what matters is that they are gone at the end.
fn remove_chain(ip6: bool, name: &str) -> std::result::Result<(), String> {
    let jump = format!("-j {name}");
    let mut last_error = None;
    for (table, builtins) in HOOKS {
        for builtin in *builtins {
            let rules = run(ip6, &["-t", table, "-S", builtin])?;
            for rule in rules.lines().filter(|r| r.ends_with(&jump)) {
                let mut args: Vec<&str> = rule.split_whitespace().collect();
                if args.first() == Some(&"-A") {
                    args[0] = "-D";
                    if let Err(e) = run(ip6, &[&["-t", table], &args[..]].concat()) {
                        last_error = Some(e);
                    }
                }
            }
        }
        if run(ip6, &["-t", table, "-S", name]).is_ok() {
            let _ = run(ip6, &["-t", table, "-F", name]);
            if let Err(e) = run(ip6, &["-t", table, "-X", name]) {
                last_error = Some(e);
            }
        }
    }
    let left = HOOKS.iter().any(|(table, builtins)| {
        run(ip6, &["-t", table, "-S", name]).is_ok()
            || builtins.iter().any(|b| {
                run(ip6, &["-t", table, "-S", b])
                    .is_ok_and(|rules| rules.lines().any(|r| r.ends_with(&jump)))
            })
    });
    if left {
        return Err(last_error.unwrap_or_else(|| format!("chain {name} is still there")));
    }
    Ok(())
}

/// The runs that have moat chains on this host (any moat home's): the run
/// id of every `MOAT-<hex>` and `MOAT-G-<hex>` chain, in iptables and
/// ip6tables, and of every bridge `mt-<hex>` CNI's isolation rules still
/// name. None where the firewall is not ours to read.
pub(crate) fn runs_with_chains() -> Vec<String> {
    let mut runs = Vec::new();
    for chain in CNI_ISOLATION {
        let Ok(rules) = run(false, &["-S", chain]) else {
            continue;
        };
        for word in rules.split_whitespace() {
            let id = format!("run_{}", word.strip_prefix("mt-").unwrap_or(""));
            if crate::run::is_run_id(&id) && !runs.contains(&id) {
                runs.push(id);
            }
        }
    }
    for ip6 in [false, true] {
        if ip6 && !ipv6_present() {
            continue;
        }
        let rules: String = HOOKS
            .iter()
            .filter_map(|(table, _)| run(ip6, &["-t", table, "-S"]).ok())
            .collect();
        for line in rules.lines() {
            let Some(name) = line.strip_prefix("-N ") else {
                continue;
            };
            let hex = name
                .strip_prefix("MOAT-G-")
                .or_else(|| name.strip_prefix("MOAT-"))
                .unwrap_or("");
            let id = format!("run_{hex}");
            if crate::run::is_run_id(&id) && !runs.contains(&id) {
                runs.push(id);
            }
        }
    }
    runs
}

/// The chains where CNI (Podman's networks) isolates each bridge from the
/// others, with rules naming the bridge that stay after its network is
/// removed.
const CNI_ISOLATION: &[&str] = &["CNI-ISOLATION-STAGE-1", "CNI-ISOLATION-STAGE-2"];

/// Removes the rules CNI left for a run's bridge (its container is gone, so
/// they isolate nothing), so that runs do not pile rules up on the host.
fn remove_cni_leftovers(bridge: &str) -> std::result::Result<(), String> {
    let named = |rule: &str| {
        let words: Vec<&str> = rule.split_whitespace().collect();
        words
            .windows(2)
            .any(|w| matches!(w[0], "-i" | "-o") && w[1] == bridge)
    };
    for chain in CNI_ISOLATION {
        let Ok(rules) = run(false, &["-S", chain]) else {
            continue;
        };
        for rule in rules.lines().filter(|r| r.starts_with("-A ") && named(r)) {
            let mut args = shell_words(rule);
            args[0] = "-D".to_string();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(false, &args)?;
        }
    }
    Ok(())
}

/// Splits a rule as `iptables -S` prints it (double-quoted words, such as
/// comments, kept whole).
fn shell_words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut started = false;
    for c in rule.chars() {
        if escaped {
            word.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// Removes a run's rules (and what CNI left naming its bridge); nothing to
/// remove is fine. Hosts where iptables is missing or not ours to change
/// have no rules of moat's to remove.
pub(crate) fn remove(run_id: &str) -> Result<()> {
    if run(false, &["-S", "INPUT"]).is_err() {
        return Ok(());
    }
    remove_cni_leftovers(&bridge(run_id))
        .map_err(|e| Error::new(ErrorKind::Runtime, format!("removing firewall rules: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_as_iptables_prints_them() {
        let rule = r#"-A CNI-ISOLATION-STAGE-1 -i mt-e49b6d46381f ! -o mt-e49b6d46381f -m comment --comment "CNI firewall plugin rules (ingressPolicy: same-bridge)" -j CNI-ISOLATION-STAGE-2"#;
        let words = shell_words(rule);
        assert_eq!(words.len(), 13, "{words:?}");
        assert_eq!(
            words[10],
            "CNI firewall plugin rules (ingressPolicy: same-bridge)"
        );
        assert_eq!(words[12], "CNI-ISOLATION-STAGE-2");
        assert_eq!(
            shell_words(r#"-m comment --comment "a \"b\"""#)[3],
            r#"a "b""#
        );
        assert_eq!(shell_words(r#"--comment """#), vec!["--comment", ""]);
    }
}
