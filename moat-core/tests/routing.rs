//! The routing proxy against real clients on loopback: curl over HTTP and
//! HTTPS on one port, a WebSocket echo through it, and the pages for names
//! it does not route.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use moat_core::routing::{table, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A backend answering every request with `body` (and echoing WebSocket
/// messages prefixed with `body`).
async fn backend(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(key) = head.lines().find_map(|l| {
                    l.strip_prefix("Sec-WebSocket-Key: ")
                        .or_else(|| l.strip_prefix("sec-websocket-key: "))
                }) {
                    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                        key.trim().as_bytes(),
                    );
                    let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                    s.write_all(resp.as_bytes()).await.unwrap();
                    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        s,
                        tokio_tungstenite::tungstenite::protocol::Role::Server,
                        None,
                    )
                    .await;
                    while let Some(Ok(msg)) = ws.next().await {
                        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                            ws.send(format!("{body}:{t}").into()).await.unwrap();
                        }
                    }
                    return;
                }
                let host = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("host: ")
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                let text = format!("{body} (host {host})");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

async fn curl(args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn resolve(name: &str, port: u16) -> String {
    format!("{name}:{port}:127.0.0.1")
}

async fn setup(home: &Path) -> (Router, u16) {
    let a = backend("agent a").await;
    let b = backend("agent b").await;
    table::register(
        home,
        "a",
        "run_00000000000a",
        BTreeMap::from([("web".into(), a.to_string())]),
    )
    .unwrap();
    table::register(
        home,
        "b",
        "run_00000000000b",
        BTreeMap::from([("web".into(), b.to_string())]),
    )
    .unwrap();
    let router = Router::start(home, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = router.local_addr().port();
    (router, port)
}

#[tokio::test]
async fn two_agents_on_one_port_over_http_and_https() {
    let home = tempfile::tempdir().unwrap();
    let (router, port) = setup(home.path()).await;
    let ca = home.path().join("proxy/ca/ca.crt");
    let ca = ca.to_str().unwrap();
    for (agent, want) in [("a", "agent a"), ("b", "agent b")] {
        let name = format!("web.{agent}.localhost");
        let url = format!("http://{name}:{port}/");
        let (code, body) = curl(&["--resolve", &resolve(&name, port), &url]).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with(want), "{body}");
        assert!(
            body.contains(&format!("host {name}:{port}")),
            "the Host is kept: {body}"
        );
        let url = format!("https://{name}:{port}/");
        let (code, body) = curl(&["--cacert", ca, "--resolve", &resolve(&name, port), &url]).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with(want), "{body}");
    }
    router.shutdown().await;
}

#[tokio::test]
async fn unknown_and_foreign_names_get_pages_never_an_agents_content() {
    let home = tempfile::tempdir().unwrap();
    let (router, port) = setup(home.path()).await;
    let r = |n: &str| resolve(n, port);
    let (code, body) = curl(&[
        "--resolve",
        &r("web.c.localhost"),
        &format!("http://web.c.localhost:{port}/"),
    ])
    .await;
    assert_eq!(code, 404);
    assert!(
        body.contains("No endpoint") && body.contains("web.a.localhost"),
        "{body}"
    );
    assert!(!body.contains("agent a (host"), "{body}");
    let (code, body) = curl(&[
        "--resolve",
        &r("a.localhost"),
        &format!("http://a.localhost:{port}/"),
    ])
    .await;
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!("http://web.a.localhost:{port}")) && !body.contains("web.b"),
        "{body}"
    );
    // DNS rebinding: a name outside .localhost pointing here gets nothing.
    let (code, body) = curl(&[
        "--resolve",
        &r("evil.test"),
        &format!("http://evil.test:{port}/"),
    ])
    .await;
    assert_eq!(code, 421);
    assert!(
        !body.contains("agent a") && !body.contains("agent b"),
        "{body}"
    );
    // And TLS for such a name is refused outright.
    let ca = home.path().join("proxy/ca/ca.crt");
    let (code, _) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &r("evil.test"),
        &format!("https://evil.test:{port}/"),
    ])
    .await;
    assert_eq!(code, 0);
    // A route removed is gone at once.
    table::unregister(home.path(), "a", "run_00000000000a").unwrap();
    let (code, _) = curl(&[
        "--resolve",
        &r("web.a.localhost"),
        &format!("http://web.a.localhost:{port}/"),
    ])
    .await;
    assert_eq!(code, 404);
    router.shutdown().await;
}

#[tokio::test]
async fn websockets_pass_through() {
    let home = tempfile::tempdir().unwrap();
    let (router, port) = setup(home.path()).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("ws://web.b.localhost:{port}/hot"), stream)
            .await
            .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send("reload?".into()).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "agent b:reload?");
    router.shutdown().await;
}

/// A keep-alive backend that counts its connections.
async fn counting_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_client_connection_keeps_its_connection_to_the_endpoint() {
    let home = tempfile::tempdir().unwrap();
    let (addr, count) = counting_backend().await;
    table::register(
        home.path(),
        "k",
        "run_00000000000c",
        BTreeMap::from([("web".into(), addr.to_string())]),
    )
    .unwrap();
    let router = Router::start(home.path(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = router.local_addr().port();
    let url = format!("http://web.k.localhost:{port}/");
    // curl sends the three requests over one connection.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &resolve("web.k.localhost", port),
            &url,
            &url,
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "okokok");
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    router.shutdown().await;
}

/// A run's own router holds at most 64 connections: an upgraded connection
/// (a WebSocket) keeps its slot for as long as its relay runs, so an agent
/// cannot open thousands through it; the relays end with the router.
#[tokio::test(flavor = "multi_thread")]
async fn a_runs_own_router_counts_upgraded_connections_and_ends_their_relays() {
    let home = tempfile::tempdir().unwrap();
    let a = backend("agent a").await;
    table::register(
        home.path(),
        "a",
        "run_00000000000a",
        BTreeMap::from([("web".into(), a.to_string())]),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = Router::serve_own(home.path(), listener, "a", vec!["web".into()]).unwrap();
    let port = router.local_addr().port();
    let open = |port: u16| async move {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://web.a.localhost:{port}/"), stream)
                .await
                .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(ws)
    };
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut ws = open(port).await.unwrap();
        ws.send("hi".into()).await.unwrap();
        assert!(ws.next().await.unwrap().is_ok());
        held.push(ws);
    }
    // Every slot is a relay's: one more is closed once none frees.
    let more = tokio::time::timeout(std::time::Duration::from_secs(15), open(port)).await;
    assert!(
        matches!(more, Ok(Err(_))),
        "a 65th upgraded connection was served"
    );
    // A relay that ends frees its slot.
    drop(held.pop());
    let again = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            if let Ok(ws) = open(port).await {
                return ws;
            }
        }
    })
    .await
    .expect("a freed slot was not taken again");
    held.push(again);
    // The router's end ends the relays.
    router.shutdown().await;
    for ws in &mut held {
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await;
        assert!(
            matches!(
                ended,
                Ok(None | Some(Err(_)))
                    | Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))))
            ),
            "a relay outlived its router: {ended:?}"
        );
    }
}
