//! The credential store: encryption, keys, permissions, concurrency.

use std::os::unix::fs::PermissionsExt;

use super::store::CredentialStore;
use super::*;

const TOKEN: &str = "ghp_storeTESTsecret0123456789abcdefghij";

fn no_keyring() -> std::result::Result<[u8; 32], String> {
    Err("no keyring in tests".into())
}

fn open(home: &Path) -> CredentialStore {
    CredentialStore::open_with(home, "", &no_keyring).unwrap()
}

fn grant(provider: &str) -> StoredGrant {
    StoredGrant {
        provider: provider.into(),
        token: Secret::new(TOKEN.into()),
        source: "env:GITHUB_TOKEN".into(),
        created: "2026-11-22T00:00:00Z".into(),
        expires: None,
        kind: None,
        metadata: BTreeMap::from([("login".to_string(), "octocat".to_string())]),
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn round_trip_with_private_files() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    let path = store.save(&grant("github")).unwrap();
    assert_eq!(store.load("github").unwrap().unwrap(), grant("github"));
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&home.path().join("credentials")), 0o700);
    assert_eq!(mode(&home.path().join("encryption.key")), 0o600);
    assert!(
        matches!(store.key_source(), KeySource::File { reason, .. } if reason.contains("no keyring"))
    );
    // A new store on the same home reads it.
    assert_eq!(
        open(home.path()).load("github").unwrap().unwrap(),
        grant("github")
    );
    assert_eq!(store.load("openai").unwrap(), None);
    assert_eq!(store.providers().unwrap(), ["github"]);
}

#[test]
fn a_fresh_nonce_every_write() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    let path = store.save(&grant("github")).unwrap();
    let first = std::fs::read(&path).unwrap();
    store.save(&grant("github")).unwrap();
    let second = std::fs::read(&path).unwrap();
    assert_eq!(&first[..9], b"MOATCRED\x01");
    assert_ne!(first[9..21], second[9..21], "nonce reused");
}

#[test]
fn no_token_in_any_file_or_debug() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    store.save(&grant("github")).unwrap();
    for entry in walk(home.path()) {
        let data = std::fs::read(&entry).unwrap();
        assert!(
            !data.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "token in {}",
            entry.display()
        );
    }
    let debug = format!("{:?} {:?}", grant("github"), store);
    assert!(!debug.contains(TOKEN), "{debug}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_wrong_key_gives_the_seeds_advice() {
    let home = tempfile::tempdir().unwrap();
    open(home.path()).save(&grant("github")).unwrap();
    std::fs::write(home.path().join("encryption.key"), [7u8; 32]).unwrap();
    let err = open(home.path()).load("github").unwrap_err();
    assert!(
        err.to_string().contains("run `moat grant github` again"),
        "{err}"
    );
    assert!(!err.to_string().contains(TOKEN));
}

#[test]
fn a_flipped_byte_anywhere_is_detected() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    let path = store.save(&grant("github")).unwrap();
    let good = std::fs::read(&path).unwrap();
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let err = store.load("github").unwrap_err();
        assert!(
            err.to_string().contains("moat grant github"),
            "byte {i}: {err}"
        );
    }
    std::fs::write(&path, &good[..30]).unwrap();
    assert!(store.load("github").is_err(), "a truncated file");
}

#[test]
fn files_swapped_between_providers_do_not_decrypt() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    let gh = store.save(&grant("github")).unwrap();
    let oa = store.save(&grant("openai")).unwrap();
    std::fs::copy(&gh, &oa).unwrap();
    let err = store.load("openai").unwrap_err();
    assert!(err.to_string().contains("moat grant openai"), "{err}");
}

#[test]
fn a_key_file_readable_by_others_is_refused() {
    let home = tempfile::tempdir().unwrap();
    open(home.path()).save(&grant("github")).unwrap();
    let key = home.path().join("encryption.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = CredentialStore::open_with(home.path(), "", &no_keyring).unwrap_err();
    assert!(err.to_string().contains("readable by other users"), "{err}");
}

#[test]
fn a_key_that_is_a_link_to_nothing_is_not_replaced() {
    // The key kept on a volume that is not mounted today: the grants it
    // encrypts must not be orphaned by a new key written over the link.
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("encryption.key");
    let gone = home.path().join("volume").join("encryption.key");
    std::os::unix::fs::symlink(&gone, &key).unwrap();
    let err = CredentialStore::open_with(home.path(), "", &no_keyring).unwrap_err();
    assert!(err.to_string().contains("cannot be reached"), "{err}");
    assert!(std::fs::symlink_metadata(&key)
        .unwrap()
        .file_type()
        .is_symlink());
    // So with the audit signing key.
    let audit = home.path().join("audit");
    std::fs::create_dir_all(&audit).unwrap();
    std::os::unix::fs::symlink(&gone, audit.join("signing.key")).unwrap();
    let err = crate::audit::signing_key(home.path()).unwrap_err();
    assert!(err.to_string().contains("cannot be reached"), "{err}");
    assert!(std::fs::symlink_metadata(audit.join("signing.key"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn backends() {
    let home = tempfile::tempdir().unwrap();
    let keyring = || Ok([9u8; 32]);
    let store = CredentialStore::open_with(home.path(), "", &keyring).unwrap();
    assert_eq!(store.key_source(), &KeySource::Keyring);
    assert!(!home.path().join("encryption.key").exists());
    let store = CredentialStore::open_with(home.path(), "file", &keyring).unwrap();
    assert!(matches!(store.key_source(), KeySource::File { .. }));
    let err = CredentialStore::open_with(home.path(), "keyring", &no_keyring).unwrap_err();
    assert!(
        err.to_string().contains("forbids the file fallback"),
        "{err}"
    );
    let err = CredentialStore::open_with(home.path(), "vault", &keyring).unwrap_err();
    assert!(err.is_invalid_argument());
}

#[test]
fn concurrent_writers_never_corrupt_the_store() {
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let home = home_path.clone();
            std::thread::spawn(move || {
                // Each opens its own store: the key is created once, under the lock.
                let store = CredentialStore::open_with(&home, "", &no_keyring).unwrap();
                for _ in 0..10 {
                    let mut g = grant("github");
                    g.source = format!("writer-{i}");
                    store.save(&g).unwrap();
                    store.load("github").unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let g = open(home.path()).load("github").unwrap().unwrap();
    assert!(g.source.starts_with("writer-"));
    let leftovers: Vec<_> = walk(&home_path.join("credentials"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn provider_names_cannot_escape_the_directory() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    for bad in ["../x", "a/b", "", "GitHub", "x.enc"] {
        assert!(store.load(bad).is_err(), "{bad}");
    }
}

#[test]
fn provider_table_renders_headers() {
    let home = tempfile::tempdir().unwrap();
    let gh = lookup(home.path(), "github").unwrap();
    let creds = gh.credentials(&grant("github")).unwrap();
    assert_eq!(creds.len(), 2);
    assert!(creds.iter().all(|c| c.grant() == "github"));
    assert!(creds[0].matches("api.github.com", 443));
    assert!(creds[1].matches("github.com", 443));
    assert_eq!(gh.hosts(), ["api.github.com", "github.com"]);
    assert!(gh
        .placeholders(None)
        .iter()
        .any(|(k, v)| k == "GH_TOKEN" && v.starts_with("ghp_")));

    let an = lookup(home.path(), "anthropic").unwrap();
    let mut oauth = grant("anthropic");
    oauth.kind = Some("oauth".into());
    let headers: Vec<String> = an
        .credentials(&oauth)
        .unwrap()
        .iter()
        .map(|c| c.header().to_string())
        .collect();
    assert_eq!(headers, ["authorization", "anthropic-beta"]);
    let mut key = grant("anthropic");
    key.kind = Some("api_key".into());
    let headers: Vec<String> = an
        .credentials(&key)
        .unwrap()
        .iter()
        .map(|c| c.header().to_string())
        .collect();
    assert_eq!(headers, ["x-api-key"]);

    let err = lookup(home.path(), "githb").unwrap_err();
    assert!(err.to_string().contains("did you mean \"github\""), "{err}");
}

#[test]
fn custom_providers_from_yaml() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("providers");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("stripe.yaml"),
        "hosts: [api.stripe.com]\nheader: Authorization\nprefix: \"Bearer \"\nenv: STRIPE_API_KEY\nplaceholder: sk_test_moat\n",
    )
    .unwrap();
    let p = lookup(home.path(), "stripe").unwrap();
    let creds = p.credentials(&grant("stripe")).unwrap();
    assert!(creds[0].matches("api.stripe.com", 443));
    assert_eq!(p.env, ["STRIPE_API_KEY"]);
    assert_eq!(
        p.placeholders(None),
        [("STRIPE_API_KEY".to_string(), "sk_test_moat".to_string())]
    );

    std::fs::write(
        dir.join("bad.yaml"),
        "hosts: [api.*.com]\nheader: a\nenv: X\n",
    )
    .unwrap();
    let err = lookup(home.path(), "bad").unwrap_err();
    assert!(err.to_string().contains("bad.yaml: hosts:"), "{err}");
    std::fs::write(dir.join("typo.yaml"), "hosts: [a.com]\nheadr: a\nenv: X\n").unwrap();
    let err = lookup(home.path(), "typo").unwrap_err();
    assert!(err.to_string().contains("typo.yaml: "), "{err}");
}

#[test]
fn expired_grants_are_refused_for_the_proxy() {
    let home = tempfile::tempdir().unwrap();
    let store = open(home.path());
    let mut g = grant("anthropic");
    g.kind = Some("oauth".into());
    g.expires = Some("2020-01-01T00:00:00Z".into());
    store.save(&g).unwrap();
    // list() and credentials_for() open the store as the environment says;
    // an existing key file is used whatever the keyring would say.
    let list_problem = list(home.path()).unwrap()[0].problem.clone();
    assert!(list_problem.unwrap().contains("expired"));
    let err = credentials_for(home.path(), &["anthropic".into()]).unwrap_err();
    assert!(
        err.to_string().contains("expired at 2020-01-01T00:00:00Z"),
        "{err}"
    );
    let err = credentials_for(home.path(), &["openai".into()]).unwrap_err();
    assert!(err.to_string().contains("run `moat grant openai`"), "{err}");
}

/// An ssh grant's host keys at run time: known_hosts decides when it lists
/// the host (a key removed there is no longer trusted); the keys recorded at
/// grant time count only when it lists none; revoked keys never count.
#[test]
fn ssh_host_keys_follow_known_hosts() {
    let home = tempfile::tempdir().unwrap();
    let old = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINpW5SE+drSEU2gXiSZW+YD1r0jbF4Ft11PKAv/K5oEs";
    let new = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKe1yarwZCI/ZKDBgnxdkM8SMnajfhJfgUiYOjYLTG5z";
    let grant = ssh::SshGrant {
        host: "git-a.test".into(),
        key: ssh::AgentKey {
            fingerprint: "SHA256:k".into(),
            comment: "me".into(),
            key_type: "ssh-ed25519".into(),
        },
        created: "2026-11-22T00:00:00Z".into(),
        host_keys: vec![old.into()],
    };
    std::fs::write(
        home.path().join("ssh-grants.json"),
        serde_json::to_vec(&[grant]).unwrap(),
    )
    .unwrap();
    let kh = home.path().join("known_hosts");
    let lines = |g: &crate::ssh_agent::HostGrant| g.host_key_lines.clone();
    // No known_hosts: the recorded key.
    let g = ssh_host_in(home.path(), "git-a.test", std::slice::from_ref(&kh)).unwrap();
    assert_eq!(lines(&g), vec![old]);
    // The host's key changed (ssh-keygen -R, then the new one): only the new.
    std::fs::write(&kh, format!("git-a.test {new}\n")).unwrap();
    let g = ssh_host_in(home.path(), "git-a.test", std::slice::from_ref(&kh)).unwrap();
    assert_eq!(lines(&g), vec![new]);
    // Revoked: not even the recorded key is used, and the run cannot start.
    std::fs::write(&kh, format!("@revoked * {old}\n")).unwrap();
    let err = ssh_host_in(home.path(), "git-a.test", std::slice::from_ref(&kh)).unwrap_err();
    assert!(err.to_string().contains("no host key is known"), "{err}");
    std::fs::write(&kh, "@revoked * ssh-ed25519 ???\n").unwrap();
    let err = ssh_host_in(home.path(), "git-a.test", std::slice::from_ref(&kh)).unwrap_err();
    assert!(err.to_string().contains("@revoked line"), "{err}");
    // A known_hosts that exists but cannot be read (here a directory) may
    // revoke anything: the run cannot start, and the message says why.
    std::fs::remove_file(&kh).unwrap();
    std::fs::create_dir(&kh).unwrap();
    let err = ssh_host_in(home.path(), "git-a.test", std::slice::from_ref(&kh)).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot tell which host keys it lists or revokes"),
        "{err}"
    );
    std::fs::remove_dir(&kh).unwrap();
    // No grant at all.
    let err = ssh_host_in(home.path(), "other.test", &[kh]).unwrap_err();
    assert!(
        err.to_string().contains("moat grant ssh --host other.test"),
        "{err}"
    );
}
