//! The filtering agent's decisions, over its real socket, with a stand-in
//! for the user's agent that records what reaches it (the end-to-end tests
//! in tests/python/test_ssh_runs.py use a real ssh-agent and sshd).

use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signer, SigningKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;
use crate::trace::MemorySink;

fn ed25519_blob(public: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-ed25519");
    put_string(&mut blob, public);
    blob
}

fn ed25519_line(public: &[u8; 32]) -> String {
    use base64::Engine;
    format!(
        "ssh-ed25519 {}",
        base64::engine::general_purpose::STANDARD.encode(ed25519_blob(public))
    )
}

struct Key {
    signing: SigningKey,
}

impl Key {
    fn new(seed: u8) -> Key {
        Key {
            signing: SigningKey::from_bytes(&[seed; 32]),
        }
    }
    fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }
    fn blob(&self) -> Vec<u8> {
        ed25519_blob(&self.public())
    }
    fn line(&self) -> String {
        ed25519_line(&self.public())
    }
    /// An SSH signature blob over `data`.
    fn sign(&self, data: &[u8]) -> Vec<u8> {
        let mut sig = Vec::new();
        put_string(&mut sig, b"ssh-ed25519");
        put_string(&mut sig, &self.signing.sign(data).to_bytes());
        sig
    }
}

/// The user's agent: holds `keys`, answers every sign request with a fixed
/// signature, and records each request it gets.
async fn fake_upstream(dir: &Path, keys: Vec<Vec<u8>>) -> (PathBuf, Arc<Mutex<Vec<Vec<u8>>>>) {
    let path = dir.join("user-agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let keys = keys.clone();
            let log = log.clone();
            tokio::spawn(async move {
                while let Ok(Some(msg)) = read_message(&mut s).await {
                    log.lock().unwrap().push(msg.clone());
                    let reply = match msg[0] {
                        REQUEST_IDENTITIES => {
                            let mut out = vec![IDENTITIES_ANSWER];
                            out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                            for k in &keys {
                                put_string(&mut out, k);
                                put_string(&mut out, b"someone@test");
                            }
                            out
                        }
                        SIGN_REQUEST => {
                            let mut out = vec![SIGN_RESPONSE];
                            put_string(&mut out, b"signature");
                            out
                        }
                        _ => vec![SUCCESS],
                    };
                    write_message(&mut s, &reply).await.unwrap();
                }
            });
        }
    });
    (path, seen)
}

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    upstream_seen: Arc<Mutex<Vec<Vec<u8>>>>,
    audit: Arc<MemorySink>,
    user_a: Key,
    user_b: Key,
    host_a: Key,
    stranger: Key,
    _cancel: tokio_util::sync::DropGuard,
}

impl Harness {
    /// Key A granted for git-a.test (host key `host_a`); key B held by the
    /// user's agent but not granted.
    async fn new() -> Harness {
        Harness::with_audit(None).await
    }

    /// As `new`, with the audit log failing with `broken` when given.
    async fn with_audit(broken: Option<&'static str>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (user_a, user_b, host_a, stranger) =
            (Key::new(1), Key::new(2), Key::new(3), Key::new(4));
        let (upstream, upstream_seen) =
            fake_upstream(dir.path(), vec![user_a.blob(), user_b.blob()]).await;
        let grant =
            HostGrant::new("git-a.test", &fingerprint(&user_a.blob()), &[host_a.line()]).unwrap();
        let audit = Arc::new(MemorySink::default());
        let sink: Arc<dyn AuditSink> = match broken {
            Some(why) => Arc::new(Broken(audit.clone(), why)),
            None => audit.clone(),
        };
        let agent = Arc::new(FilterAgent::new(
            "run_test",
            vec![grant],
            &upstream,
            Some(sink),
        ));
        let listener = bind_socket(&dir.path().join("ssh")).unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(agent.serve(listener, cancel.clone()));
        Harness {
            socket: dir.path().join("ssh").join("agent.sock"),
            _dir: dir,
            upstream_seen,
            audit,
            user_a,
            user_b,
            host_a,
            stranger,
            _cancel: cancel.drop_guard(),
        }
    }

    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).await.unwrap()
    }

    fn upstream_signs(&self) -> usize {
        self.upstream_seen
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m[0] == SIGN_REQUEST)
            .count()
    }

    /// Was `op` refused, audited with a reason that holds `why`?
    fn refused_with(&self, op: &str, why: &str) -> bool {
        self.decisions().iter().any(|(o, allowed, reason)| {
            o == op && !allowed && reason.as_deref().is_some_and(|r| r.contains(why))
        })
    }

    fn decisions(&self) -> Vec<(String, bool, Option<String>)> {
        self.audit
            .events()
            .into_iter()
            .filter_map(|e| match e {
                AuditEvent::SshAgent {
                    op,
                    allowed,
                    reason,
                    ..
                } => Some((op, allowed, reason)),
                _ => None,
            })
            .collect()
    }
}

/// An audit log that can no longer be written (a full disk): it still
/// shows what was offered to it.
struct Broken(Arc<MemorySink>, &'static str);

impl AuditSink for Broken {
    fn event(&self, event: AuditEvent) {
        self.0.event(event);
    }
    fn healthy(&self) -> std::result::Result<(), String> {
        Err(self.1.to_string())
    }
}

async fn ask(s: &mut UnixStream, msg: &[u8]) -> Vec<u8> {
    write_message(s, msg).await.unwrap();
    read_message(s).await.unwrap().unwrap()
}

fn bind_msg(host_key: &Key, session_id: &[u8], signature: &[u8], forwarding: bool) -> Vec<u8> {
    let mut m = vec![EXTENSION];
    put_string(&mut m, b"session-bind@openssh.com");
    put_string(&mut m, &host_key.blob());
    put_string(&mut m, session_id);
    put_string(&mut m, signature);
    m.push(u8::from(forwarding));
    m
}

fn userauth(session_id: &[u8], key: &[u8], hostbound: Option<&[u8]>) -> Vec<u8> {
    let mut d = Vec::new();
    put_string(&mut d, session_id);
    d.push(USERAUTH_REQUEST);
    put_string(&mut d, b"git");
    put_string(&mut d, b"ssh-connection");
    match hostbound {
        None => put_string(&mut d, b"publickey"),
        Some(_) => put_string(&mut d, b"publickey-hostbound-v00@openssh.com"),
    }
    d.push(1);
    put_string(&mut d, b"ssh-ed25519");
    put_string(&mut d, key);
    if let Some(h) = hostbound {
        put_string(&mut d, h);
    }
    d
}

fn sign_msg(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = vec![SIGN_REQUEST];
    put_string(&mut m, key);
    put_string(&mut m, data);
    m.extend_from_slice(&0u32.to_be_bytes());
    m
}

const SID: &[u8] = b"an exchange hash of thirty-two b";

#[tokio::test]
async fn lists_only_granted_keys() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    let answer = ask(&mut s, &[REQUEST_IDENTITIES]).await;
    let keys = parse_identities(&answer).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].0, h.user_a.blob().as_slice());
    assert!(!answer
        .windows(32)
        .any(|w| w == h.user_b.public().as_slice()));
    assert_eq!(
        h.decisions(),
        vec![("list".into(), true, Some("1 shown, 1 withheld".into()))]
    );
}

#[tokio::test]
async fn signs_a_login_to_a_bound_granted_host() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    let bind = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), false);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let data = userauth(SID, &h.user_a.blob(), None);
    let answer = ask(&mut s, &sign_msg(&h.user_a.blob(), &data)).await;
    assert_eq!(answer[0], SIGN_RESPONSE);
    // The host-bound method names the same host key.
    let data = userauth(SID, &h.user_a.blob(), Some(&h.host_a.blob()));
    let answer = ask(&mut s, &sign_msg(&h.user_a.blob(), &data)).await;
    assert_eq!(answer[0], SIGN_RESPONSE);
    assert_eq!(h.upstream_signs(), 2);
    let events = h.audit.events();
    assert!(events.iter().any(|e| matches!(e,
        AuditEvent::SshAgent { op, host: Some(host), fingerprint: Some(fp), allowed: true, .. }
            if op == "sign" && host == "git-a.test" && *fp == fingerprint(&h.user_a.blob()))));
}

#[tokio::test]
async fn refuses_to_sign_without_a_binding() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    let data = userauth(SID, &h.user_a.blob(), None);
    assert_eq!(
        ask(&mut s, &sign_msg(&h.user_a.blob(), &data)).await,
        vec![FAILURE]
    );
    // Arbitrary data (a git commit signature, a challenge) is refused too.
    assert_eq!(
        ask(&mut s, &sign_msg(&h.user_a.blob(), b"SSHSIG anything")).await,
        vec![FAILURE]
    );
    assert_eq!(
        h.upstream_signs(),
        0,
        "a refused request reached the user's agent"
    );
    let d = h.decisions();
    assert!(d.iter().all(|(op, allowed, _)| op == "sign" && !allowed));
    assert!(d[0].2.as_deref().unwrap().contains("session-bind"));
}

#[tokio::test]
async fn refuses_a_server_whose_host_key_is_not_granted() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    // A real server, correctly signed, but not git-a.test.
    let bind = bind_msg(&h.stranger, SID, &h.stranger.sign(SID), false);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let data = userauth(SID, &h.user_a.blob(), None);
    assert_eq!(
        ask(&mut s, &sign_msg(&h.user_a.blob(), &data)).await,
        vec![FAILURE]
    );
    assert_eq!(h.upstream_signs(), 0);
    let reason = h.decisions().last().unwrap().2.clone().unwrap();
    assert!(reason.contains("not a known key of a host"), "{reason}");
}

#[tokio::test]
async fn refuses_a_binding_with_a_forged_signature() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    // The granted host's key, signed by someone else: the agent in the
    // container cannot claim git-a.test for a session it holds elsewhere.
    let forged = bind_msg(&h.host_a, SID, &h.stranger.sign(SID), false);
    assert_eq!(ask(&mut s, &forged).await, vec![FAILURE]);
    let garbage = bind_msg(&h.host_a, SID, b"\x00\x00\x00\x01x", false);
    assert_eq!(ask(&mut s, &garbage).await, vec![FAILURE]);
    let data = userauth(SID, &h.user_a.blob(), None);
    assert_eq!(
        ask(&mut s, &sign_msg(&h.user_a.blob(), &data)).await,
        vec![FAILURE]
    );
    assert_eq!(h.upstream_signs(), 0);
}

#[tokio::test]
async fn signs_only_the_login_of_the_bound_session_with_the_asked_key() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    let bind = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), false);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let a = h.user_a.blob();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("another session", userauth(b"another session id", &a, None)),
        (
            "another key in the data",
            userauth(SID, &h.user_b.blob(), None),
        ),
        (
            "another host key",
            userauth(SID, &a, Some(&h.stranger.blob())),
        ),
        ("trailing bytes", {
            let mut d = userauth(SID, &a, None);
            d.push(0);
            d
        }),
        ("not a login", {
            let mut d = Vec::new();
            put_string(&mut d, SID);
            d.push(80);
            d
        }),
    ];
    for (what, data) in cases {
        assert_eq!(
            ask(&mut s, &sign_msg(&a, &data)).await,
            vec![FAILURE],
            "{what}"
        );
    }
    // Key B is held by the user's agent but granted to no host.
    let data = userauth(SID, &h.user_b.blob(), None);
    assert_eq!(
        ask(&mut s, &sign_msg(&h.user_b.blob(), &data)).await,
        vec![FAILURE]
    );
    assert_eq!(h.upstream_signs(), 0);
    assert!(h
        .decisions()
        .iter()
        .any(|(_, _, r)| r.as_deref() == Some("the key is not granted to this run")));
}

#[tokio::test]
async fn refuses_forwarding_and_a_second_binding() {
    let h = Harness::new().await;
    let a = h.user_a.blob();
    let mut s = h.connect().await;
    let bind = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), true);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let data = userauth(SID, &a, None);
    assert_eq!(ask(&mut s, &sign_msg(&a, &data)).await, vec![FAILURE]);

    let mut s = h.connect().await;
    let bind = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), false);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    // The same binding again is fine; a different one is not, and it
    // spoils the connection.
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let other = b"a second session of thirty-two b";
    let second = bind_msg(&h.stranger, other, &h.stranger.sign(other), false);
    assert_eq!(ask(&mut s, &second).await, vec![FAILURE]);
    assert_eq!(ask(&mut s, &sign_msg(&a, &data)).await, vec![FAILURE]);
    assert_eq!(h.upstream_signs(), 0);
}

#[tokio::test]
async fn refuses_to_change_the_users_agent() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    for (request, op) in [
        (17u8, "add_identity"),
        (25, "add_id_constrained"),
        (18, "remove_identity"),
        (19, "remove_all_identities"),
        (20, "add_smartcard_key"),
        (21, "remove_smartcard_key"),
        (22, "lock"),
        (23, "unlock"),
        (99, "request 99"),
    ] {
        let mut m = vec![request];
        put_string(&mut m, b"payload");
        assert_eq!(ask(&mut s, &m).await, vec![FAILURE], "{op}");
        assert_eq!(h.decisions().last().unwrap().0, op);
        assert!(!h.decisions().last().unwrap().1);
    }
    let mut query = vec![EXTENSION];
    put_string(&mut query, b"query");
    assert_eq!(ask(&mut s, &query).await, vec![FAILURE]);
    // None of it reached the user's agent, and the connection still works.
    assert!(h.upstream_seen.lock().unwrap().is_empty());
    let answer = ask(&mut s, &[REQUEST_IDENTITIES]).await;
    assert_eq!(parse_identities(&answer).unwrap().len(), 1);
}

#[tokio::test]
async fn malformed_and_oversized_messages_end_the_connection_not_the_agent() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    // Truncated fields get a failure.
    assert_eq!(
        ask(&mut s, &[SIGN_REQUEST, 0, 0, 0, 9, 1]).await,
        vec![FAILURE]
    );
    assert_eq!(ask(&mut s, &[EXTENSION, 0, 0]).await, vec![FAILURE]);
    let mut bind = vec![EXTENSION];
    put_string(&mut bind, b"session-bind@openssh.com");
    put_string(&mut bind, b"truncated");
    assert_eq!(ask(&mut s, &bind).await, vec![FAILURE]);
    // A length over the limit closes this connection.
    s.write_all(&(MAX_MESSAGE as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // And the close is audited, as every decision is.
    assert!(h.refused_with("close", "malformed message"));
    // Others are served.
    let mut s = h.connect().await;
    let answer = ask(&mut s, &[REQUEST_IDENTITIES]).await;
    assert_eq!(parse_identities(&answer).unwrap().len(), 1);
}

#[tokio::test]
async fn socket_paths_longer_than_a_socket_address_work() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
    let listener = bind_socket(&deep).unwrap();
    let path = deep.join("agent.sock");
    assert!(path.as_os_str().len() > 108);
    assert!(path.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o666);
    drop(listener);
}

#[test]
fn a_grant_needs_a_host_key() {
    let err = HostGrant::new("git-a.test", "SHA256:x", &[]).unwrap_err();
    assert!(err.to_string().contains("known_hosts"), "{err}");
    let err = HostGrant::new("git-a.test", "SHA256:x", &["ssh-ed25519 !!".into()]).unwrap_err();
    assert!(err.to_string().contains("does not parse"), "{err}");
}

/// Lines made by OpenSSH's ssh-keygen: `-H` hashed `git-a.test` (first) and
/// `[git-c.test]:2222` (second).
const HASHED: &str = "\
|1|zcs7KEKuoNoZVTWJWSLhekT87KU=|hNcaOGZ7WEqoTTfhDIo/2e13mZg= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINpW5SE+drSEU2gXiSZW+YD1r0jbF4Ft11PKAv/K5oEs
|1|TYu80KAxdxnnJ0dAOwrRo6Ssw84=|PFWkymWcIz4X5ckKJYCNL/vRsas= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKe1yarwZCI/ZKDBgnxdkM8SMnajfhJfgUiYOjYLTG5z
";
const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINpW5SE+drSEU2gXiSZW+YD1r0jbF4Ft11PKAv/K5oEs";
const KEY_C: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKe1yarwZCI/ZKDBgnxdkM8SMnajfhJfgUiYOjYLTG5z";

#[test]
fn known_hosts_lookup_follows_openssh() {
    use crate::credential::ssh::known_host_keys;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known_hosts");
    let k1 = Key::new(11).line();
    let k2 = Key::new(12).line();
    let k3 = Key::new(13).line();
    let text = format!(
        "{HASHED}\
         # a comment\n\
         \n\
         git-b.test,10.0.0.2 {k1} comment\n\
         *.wild.test,!evil.wild.test {k2}\n\
         [git-b.test]:22 {k3}\n\
         [git-b.test]:2200 {KEY_C}\n\
         this line does not parse\n\
         @cert-authority git-b.test {KEY_C}\n"
    );
    std::fs::write(&file, text).unwrap();
    let files = vec![file.clone(), dir.path().join("missing")];
    assert_eq!(known_host_keys("git-a.test", &files).keys, vec![KEY_A]);
    assert_eq!(known_host_keys("GIT-A.test.", &files).keys, vec![KEY_A]);
    assert_eq!(
        known_host_keys("git-b.test", &files).keys,
        vec![k1.clone(), k3.clone()]
    );
    assert_eq!(
        known_host_keys("a.wild.test", &files).keys,
        vec![k2.clone()]
    );
    assert!(known_host_keys("evil.wild.test", &files).keys.is_empty());
    assert!(
        known_host_keys("git-c.test", &files).keys.is_empty(),
        "port 2222 is not 22"
    );
    assert!(known_host_keys("nothing.test", &files).keys.is_empty());
    // A revoked key is never a host's, wherever it is listed.
    std::fs::write(dir.path().join("revoked"), format!("@revoked * {k1}\n")).unwrap();
    let files = vec![file, dir.path().join("revoked")];
    let found = known_host_keys("git-b.test", &files);
    assert_eq!(found.keys, vec![k3.clone()]);
    assert_eq!(found.revoked, vec![k1.clone()]);
    assert!(found.unreadable_files.is_empty());
    // A byte that is not UTF-8 (in a comment) loses nothing else of the
    // file: the revocation after it still counts.
    let mixed = dir.path().join("mixed");
    let mut bytes = b"# caf\xe9\n".to_vec();
    bytes.extend_from_slice(format!("@revoked * {k1}\n").as_bytes());
    std::fs::write(&mixed, bytes).unwrap();
    let found = known_host_keys("git-b.test", &[files[0].clone(), mixed]);
    assert_eq!(found.revoked, vec![k1]);
    assert!(found.unreadable_files.is_empty());
    // A file that exists but cannot be read is named, never skipped as
    // if absent: here a FIFO (opening it would block) and a directory.
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let found = known_host_keys(
        "git-b.test",
        &[files[0].clone(), fifo.clone(), dir.path().to_path_buf()],
    );
    assert_eq!(
        found.unreadable_files.len(),
        2,
        "{:?}",
        found.unreadable_files
    );
    assert!(found.unreadable_files[0].contains("fifo: not a regular file"));
}

#[tokio::test]
async fn a_repeated_binding_cannot_undo_forwarding() {
    let h = Harness::new().await;
    let a = h.user_a.blob();
    let mut s = h.connect().await;
    let forwarded = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), true);
    let direct = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), false);
    assert_eq!(ask(&mut s, &forwarded).await, vec![SUCCESS]);
    assert_eq!(ask(&mut s, &direct).await, vec![SUCCESS]);
    let data = userauth(SID, &a, None);
    assert_eq!(ask(&mut s, &sign_msg(&a, &data)).await, vec![FAILURE]);
    assert_eq!(h.upstream_signs(), 0);
}

#[tokio::test]
async fn login_data_must_be_well_formed() {
    let h = Harness::new().await;
    let a = h.user_a.blob();
    let mut s = h.connect().await;
    let bind = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), false);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let with = |user: &[u8], algorithm: &[u8]| {
        let mut d = Vec::new();
        put_string(&mut d, SID);
        d.push(USERAUTH_REQUEST);
        put_string(&mut d, user);
        put_string(&mut d, b"ssh-connection");
        put_string(&mut d, b"publickey");
        d.push(1);
        put_string(&mut d, algorithm);
        put_string(&mut d, &a);
        d
    };
    for (what, data) in [
        ("a NUL in the user", with(b"git\0root", b"ssh-ed25519")),
        ("a long user", with(&[b'u'; 300], b"ssh-ed25519")),
        ("another algorithm", with(b"git", b"rsa-sha2-512")),
    ] {
        assert_eq!(
            ask(&mut s, &sign_msg(&a, &data)).await,
            vec![FAILURE],
            "{what}"
        );
    }
    // Bytes after the flags.
    let mut trailing = sign_msg(&a, &with(b"git", b"ssh-ed25519"));
    trailing.push(7);
    assert_eq!(ask(&mut s, &trailing).await, vec![FAILURE]);
    assert_eq!(h.upstream_signs(), 0);
    // The well-formed one passes.
    let good = sign_msg(&a, &with(b"git", b"ssh-ed25519"));
    assert_eq!(ask(&mut s, &good).await[0], SIGN_RESPONSE);
    // A session identifier that is no hash's length is not bound.
    let mut s = h.connect().await;
    let odd = [7u8; 124];
    let bind = bind_msg(&h.host_a, &odd, &h.host_a.sign(&odd), false);
    assert_eq!(ask(&mut s, &bind).await, vec![FAILURE]);
}

#[tokio::test]
async fn a_connection_that_keeps_being_refused_is_closed_and_audited_briefly() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    let mut long = vec![EXTENSION];
    put_string(&mut long, &[0xffu8; 100_000]);
    let mut answered = 0;
    for _ in 0..100 {
        if write_message(&mut s, &long).await.is_err() {
            break;
        }
        match read_message(&mut s).await {
            Ok(Some(reply)) => {
                assert_eq!(reply, vec![FAILURE]);
                answered += 1;
            }
            _ => break,
        }
    }
    assert_eq!(answered, MAX_REFUSALS);
    let events = h.audit.events();
    assert_eq!(
        events.len(),
        MAX_REFUSALS + 1,
        "one entry per refusal and one for closing"
    );
    for e in &events {
        let AuditEvent::SshAgent { op, .. } = e else {
            panic!("{e:?}")
        };
        assert!(
            op.len() < 100,
            "{} bytes of attacker text in the audit log",
            op.len()
        );
    }
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let h = Harness::new().await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = h.connect().await;
        // Each opens its connection to the user's agent.
        ask(&mut s, &[REQUEST_IDENTITIES]).await;
        held.push(s);
    }
    let mut extra = h.connect().await;
    let _ = write_message(&mut extra, &[REQUEST_IDENTITIES]).await;
    let mut buf = [0u8; 4];
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a connection over the limit was served");
    let lists = h
        .upstream_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m[0] == REQUEST_IDENTITIES)
        .count();
    assert_eq!(lists, MAX_CONNECTIONS);
    // A slot freed is a slot served.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = h.connect().await;
    assert_eq!(
        ask(&mut again, &[REQUEST_IDENTITIES]).await[0],
        IDENTITIES_ANSWER
    );
}

#[test]
fn known_hosts_fields_may_be_separated_by_any_blanks() {
    use crate::credential::ssh::known_host_keys;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known_hosts");
    let k1 = Key::new(21).line();
    let k2 = Key::new(22).line();
    let (t1, b1) = k1.split_once(' ').unwrap();
    let (t2, b2) = k2.split_once(' ').unwrap();
    std::fs::write(
        &file,
        format!("git-a.test\t{t1}  {b1}\ngit-a.test {t2} {b2}\n@revoked\tgit-a.test\t{t1}\t{b1}\n"),
    )
    .unwrap();
    let found = known_host_keys("git-a.test", std::slice::from_ref(&file));
    assert_eq!(found.keys, vec![k2]);
    assert_eq!(found.revoked, vec![k1]);
    assert!(found.unreadable_revocations.is_empty());
    // A revocation that cannot be read is reported, never ignored.
    std::fs::write(&file, "@revoked git-a.test ssh-ed25519 not-base64!!\n").unwrap();
    let found = known_host_keys("git-a.test", std::slice::from_ref(&file));
    assert_eq!(
        found.unreadable_revocations,
        vec![format!("{}:1", file.display())]
    );
}

#[tokio::test]
async fn a_refusal_is_told_once_in_the_runs_output() {
    let dir = tempfile::tempdir().unwrap();
    let (user_a, host_a) = (Key::new(1), Key::new(3));
    let (upstream, _) = fake_upstream(dir.path(), vec![user_a.blob()]).await;
    let grant =
        HostGrant::new("git-a.test", &fingerprint(&user_a.blob()), &[host_a.line()]).unwrap();
    let told = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = told.clone();
    let agent = Arc::new(
        FilterAgent::new("run_test", vec![grant], &upstream, None)
            .with_notes(move |n: &str| sink.lock().unwrap().push(n.to_string())),
    );
    let listener = bind_socket(&dir.path().join("ssh")).unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(agent.serve(listener, cancel.clone()));
    let mut s = UnixStream::connect(dir.path().join("ssh").join("agent.sock"))
        .await
        .unwrap();
    let data = userauth(SID, &user_a.blob(), None);
    for _ in 0..3 {
        assert_eq!(
            ask(&mut s, &sign_msg(&user_a.blob(), &data)).await,
            vec![FAILURE]
        );
    }
    let told = told.lock().unwrap().clone();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].starts_with("moat: the run's SSH agent refused to sign: "));
    assert!(told[0].contains("OpenSSH 8.9"), "{}", told[0]);
    cancel.cancel();
}

/// As the proxy does, the agent fails closed: with the audit log broken (a
/// full disk, or filled on purpose by a flood of audited requests) it signs
/// nothing, not even a login it would allow.
#[tokio::test]
async fn nothing_is_signed_when_the_audit_log_cannot_be_written() {
    let h = Harness::with_audit(Some("no space left on device")).await;
    let mut s = h.connect().await;
    let bind = bind_msg(&h.host_a, SID, &h.host_a.sign(SID), false);
    assert_eq!(ask(&mut s, &bind).await, vec![SUCCESS]);
    let data = userauth(SID, &h.user_a.blob(), None);
    assert_eq!(
        ask(&mut s, &sign_msg(&h.user_a.blob(), &data)).await,
        vec![FAILURE]
    );
    assert_eq!(h.upstream_signs(), 0);
    assert!(h.refused_with("sign", "audit log cannot be written"));
}

/// Allowed requests are audited too, so one connection may make only so
/// many: a flood of key listings is closed, and says why.
#[tokio::test]
async fn a_connection_making_too_many_requests_is_closed_and_audited() {
    let h = Harness::new().await;
    let mut s = h.connect().await;
    for _ in 0..MAX_REQUESTS {
        let answer = ask(&mut s, &[REQUEST_IDENTITIES]).await;
        assert_eq!(answer[0], IDENTITIES_ANSWER);
    }
    write_message(&mut s, &[REQUEST_IDENTITIES]).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection was not closed");
    assert!(h.refused_with("close", "more than 256 requests"));
}

/// A forwarded connection's record keeps the bytes that passed however it
/// ends: a client that resets its connection (which any agent can) once
/// recorded 0 bytes each way, hiding what went through the granted host.
#[tokio::test]
async fn a_forwarded_connection_ended_by_a_reset_still_records_its_bytes() {
    // The "SSH server": reads what comes, answers a banner.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = server.accept().await {
            tokio::spawn(async move {
                let _ = c.write_all(b"SSH-2.0-test\r\n").await;
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let mut overrides = crate::proxy::upstream::ResolveMap::new();
    overrides.insert(("git-a.test".into(), SSH_PORT), server_addr);
    let sink = Arc::new(MemorySink::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(forward(
        listener,
        Forward {
            client: "run_test".into(),
            host: "git-a.test".into(),
            overrides: Arc::new(overrides),
            trace: Some(sink.clone()),
            audit: Some(sink.clone()),
        },
        cancel.clone(),
    ));
    let mut c = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut banner = [0u8; 14];
    c.read_exact(&mut banner).await.unwrap();
    c.write_all(&[7u8; 100_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An abortive close: RST, not FIN.
    c.set_zero_linger().unwrap();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        if let Some(r) = sink.records().into_iter().next() {
            break r;
        }
        assert!(Instant::now() < deadline, "no record of the connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record.request_bytes, 100_000, "{record:?}");
    assert_eq!(record.response_bytes, 14, "{record:?}");
    cancel.cancel();
}
