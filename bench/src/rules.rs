//! `moat-bench rules`: the cost of judging a request against a host's
//! request rules (`network.rules`), in process: 100 rules (the matching one
//! last, the worst case: every rule is tried), paths with normalisation
//! work in them. Prints the distribution per request; the goal is under
//! 5 µs at p99.

use std::time::Instant;

use moat_core::policy::rules::{parse_entries, Verdict};

#[derive(Debug, clap::Args)]
pub struct RulesArgs {
    /// Requests judged.
    #[arg(long, default_value_t = 200_000)]
    requests: usize,
    /// Rules in the host's entry.
    #[arg(long, default_value_t = 100)]
    rules: usize,
    /// Rules that start with `**` (no literal prefix to reject on): the
    /// worst case for the matcher.
    #[arg(long)]
    wildcards: bool,
}

pub async fn main(args: RulesArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut rules: Vec<String> = (0..args.rules.saturating_sub(1))
        .map(|i| {
            if args.wildcards {
                format!("deny * /**/admin{i}/**")
            } else {
                format!("deny * /orgs/org{i}/repos/*/admin/**")
            }
        })
        .collect();
    rules.push("allow GET /repos/**".to_string());
    let entries = parse_entries(&[("api.github.com".to_string(), rules)])?;
    let entry = &entries[0];
    let paths = [
        "/repos/octo/hello/pulls?state=open&per_page=100",
        "/repos/octo/hello//contents/src/main.rs/",
        "//repos/Octo/%68ello/issues/12/comments;x=1",
        "/repos/octo/hello/git/refs/heads/agent/feature/deep/branch/name",
    ];
    let mut samples = Vec::with_capacity(args.requests);
    let mut allowed = 0usize;
    for i in 0..args.requests {
        let path = paths[i % paths.len()];
        let t = Instant::now();
        let verdict = entry.judge("GET", path);
        samples.push(t.elapsed().as_nanos() as u64);
        if matches!(verdict, Verdict::Allow(_)) {
            allowed += 1;
        }
    }
    if allowed != args.requests {
        return Err(format!(
            "{allowed} of {} allowed: the rules are wrong",
            args.requests
        )
        .into());
    }
    samples.sort_unstable();
    let q = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0
    };
    let out = serde_json::json!({
        "rules": args.rules,
        "wildcards": args.wildcards,
        "requests": args.requests,
        "p50_us": q(0.50),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": q(1.0),
    });
    println!("{out}");
    Ok(())
}
