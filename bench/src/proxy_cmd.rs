//! `moat-bench proxy`: a moat proxy in its own process, so its CPU time and
//! memory can be read from /proc apart from the client's.
//!
//! Prints the proxy URL (with the client token) on one line, then serves
//! until killed. Each line `stats` on stdin is answered with one JSON line
//! on stdout: `{"mint_count":N,"rss_kib":N}`.

use std::path::PathBuf;

use moat_core::proxy::{ClientSpec, Credential, ProxyBuilder};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::net::{self, Result};

/// Arguments of `moat-bench proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Where to listen (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The moat home (the CA is created in HOME/proxy/ca).
    #[arg(long)]
    pub home: PathBuf,
    /// Extra PEM roots to trust for upstream TLS.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// host:port=127.0.0.1:port; a host containing `{n}` is expanded to
    /// --numbered names (`{n}` = 0000, 0001, ...).
    #[arg(long)]
    pub resolve: Vec<String>,
    /// How many names each `{n}` entry expands to.
    #[arg(long, default_value_t = 0)]
    pub numbered: usize,
    /// host=header=value: a credential injected for host (pattern, optional
    /// :port).
    #[arg(long)]
    pub credential: Vec<String>,
}

/// Expands `{n}` in `entry` to `count` zero-padded numbers.
pub fn expand(entry: &str, count: usize) -> Vec<String> {
    if entry.contains("{n}") {
        (0..count)
            .map(|i| entry.replace("{n}", &format!("{i:04}")))
            .collect()
    } else {
        vec![entry.to_string()]
    }
}

/// Runs `moat-bench proxy`.
pub async fn main(args: ProxyArgs) -> Result<()> {
    let listen = net::loopback(args.listen.parse()?)?;
    let mut builder = ProxyBuilder::new().listen(listen).home(&args.home);
    if let Some(ca) = &args.upstream_ca {
        builder = builder.upstream_ca_file(ca)?;
    }
    for entry in &args.resolve {
        for one in expand(entry, args.numbered) {
            let ((host, port), addr) = net::parse_resolve(&one)?;
            builder = builder.resolve(&host, port, addr);
        }
    }
    let proxy = builder.start().await?;
    let mut spec = ClientSpec::new("bench");
    for c in &args.credential {
        let mut parts = c.splitn(3, '=');
        let (Some(host), Some(header), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("--credential {c}: expected host=header=value").into());
        };
        spec.credentials.push(Credential::new(host, header, value)?);
    }
    let handle = proxy.register(spec)?;
    let mut stdout = tokio::io::stdout();
    let url = handle.proxy_url(proxy.local_addr());
    stdout
        .write_all(format!("{}\n", url.expose()).as_bytes())
        .await?;
    stdout.flush().await?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "stats" {
            let stats = serde_json::json!({
                "mint_count": proxy.ca().mint_count(),
                "rss_kib": crate::procfs::rss_kib(std::process::id()).unwrap_or(0),
            });
            stdout.write_all(format!("{stats}\n").as_bytes()).await?;
            stdout.flush().await?;
        }
    }
    // stdin closed: serve until killed.
    std::future::pending::<()>().await;
    Ok(())
}
