//! The proxy's worker threads end with the proxy. Its own test binary,
//! so that no other test's proxy adds threads to the count.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use moat_core::policy::PolicyMode;
use moat_core::proxy::{ClientSpec, Limits, ProxyBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The threads of this process named `moat-proxy-*`.
fn workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("moat-proxy-"))
        .count()
}

/// An upstream that answers every request on a connection with a short 200.
async fn upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tcp.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One keep-alive request through the proxy (which then holds a pooled
/// upstream connection on a worker); the connection is left open.
async fn request(proxy: std::net::SocketAddr, url: &str) -> TcpStream {
    use base64::Engine;
    let token = url
        .trim_start_matches("http://moat:")
        .split('@')
        .next()
        .unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("moat:{token}"));
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "GET http://up.test/ HTTP/1.1\r\nHost: up.test\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"ok") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tcp
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxys_workers_end_when_it_is_shut_down_or_dropped() {
    let home = tempfile::tempdir().unwrap();
    let up = upstream().await;
    assert_eq!(workers(), 0);
    for shut_down in [true, false] {
        let proxy = ProxyBuilder::new()
            .home(home.path())
            .resolve("up.test", 80, up)
            .limits(Limits {
                workers: 3,
                ..Limits::default()
            })
            .start()
            .await
            .unwrap();
        // Each worker names its thread as it starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while workers() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(workers(), 3, "three workers while it serves");
        let client = proxy
            .register(ClientSpec {
                policy: PolicyMode::Permissive,
                ..ClientSpec::new("run_workers")
            })
            .unwrap();
        let url = client.proxy_url(proxy.local_addr()).expose().clone();
        // Open client connections and pooled upstream ones, on workers.
        let _open = [
            request(proxy.local_addr(), &url).await,
            request(proxy.local_addr(), &url).await,
        ];
        if shut_down {
            proxy.shutdown().await;
            // Joined: gone at once (the kernel may take a moment to drop
            // an exited thread from /proc).
            let deadline = Instant::now() + Duration::from_secs(1);
            while workers() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(workers(), 0, "shutdown returns once its workers ended");
        } else {
            drop(proxy);
            let deadline = Instant::now() + Duration::from_secs(10);
            while workers() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(workers(), 0, "a dropped proxy's workers end");
        }
    }
}
