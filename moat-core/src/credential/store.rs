//! The encrypted credential store: `$MOAT_HOME/credentials/<provider>.enc`.
//!
//! File format (version 1), all of it binary:
//!
//! ```text
//! "MOATCRED" (8 bytes) | version = 1 (1 byte) | nonce (12 bytes) | AES-256-GCM ciphertext and tag
//! ```
//!
//! The associated data is `moat-credential-v1:<provider>`, so a file renamed
//! or copied to another provider's name does not decrypt. The plaintext is
//! the JSON of a [`StoredGrant`]. Every write uses a fresh random nonce and
//! replaces the file atomically (temporary file, fsync, rename; 0600 in a
//! 0700 directory).
//!
//! The 32-byte key lives in the OS keyring (service `moat`, user
//! `encryption-key`); where none works it lives in `$MOAT_HOME/encryption.key`
//! (0600; refused when group or others can read it).
//! `MOAT_KEYRING_BACKEND=file` forces the file, `=keyring` forbids the
//! fallback. Creating the key and writing files happen under a lock
//! (`credentials/.lock`), so concurrent `moat grant`s never race.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::paths;
use crate::secret::Secret;

const MAGIC: &[u8; 8] = b"MOATCRED";
const VERSION: u8 = 1;
const KEYRING_SERVICE: &str = "moat";
const KEYRING_USER: &str = "encryption-key";

/// A stored grant: the secret and what moat knows about it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredGrant {
    /// The provider (`github`, `anthropic`, a custom provider's name).
    pub provider: String,
    /// The secret. Serialized only inside the encrypted file.
    #[serde(with = "secret_string")]
    pub token: Secret<String>,
    /// Where the token came from (`env:GITHUB_TOKEN`, `gh`, `prompt`,
    /// `claude-code`, `api`), never the token.
    pub source: String,
    /// When it was stored (RFC 3339).
    pub created: String,
    /// When it expires (RFC 3339), if known.
    #[serde(default)]
    pub expires: Option<String>,
    /// The kind of token, when a provider has several (`api_key`, `oauth`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Non-secret facts (the GitHub login, scopes, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for StoredGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredGrant")
            .field("provider", &self.provider)
            .field("token", &self.token)
            .field("source", &self.source)
            .field("created", &self.created)
            .field("expires", &self.expires)
            .field("kind", &self.kind)
            .field("metadata", &self.metadata)
            .finish()
    }
}

mod secret_string {
    use super::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Secret<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret<String>, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Where the store's key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The OS keyring.
    Keyring,
    /// `$MOAT_HOME/encryption.key`; `reason` says why not the keyring.
    File {
        /// The key file.
        path: PathBuf,
        /// Why the keyring was not used.
        reason: String,
    },
}

/// The credential store of one moat home.
pub struct CredentialStore {
    dir: PathBuf,
    key: Secret<[u8; 32]>,
    key_source: KeySource,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("dir", &self.dir)
            .field("key", &self.key)
            .field("key_source", &self.key_source)
            .finish()
    }
}

/// Holds `credentials/.lock` for as long as it lives.
pub(crate) struct Lock(#[allow(dead_code)] File);

pub(crate) fn lock(dir: &Path) -> Result<Lock> {
    paths::private_dir(dir)?;
    let path = dir.join(".lock");
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).truncate(false).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(&path).map_err(|e| Error::io(&path, "open", e))?;
    file.lock().map_err(|e| Error::io(&path, "lock", e))?;
    Ok(Lock(file))
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("no randomness: {e}")))?;
    Ok(out)
}

/// Runs a keyring call on its own thread with a time limit: a keyring that
/// does not answer (a stuck D-Bus) must not hang moat.
fn keyring_call<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> std::result::Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("moat-keyring".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start the keyring thread: {e}"))?;
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| Err("the keyring did not answer within 5 s".to_string()))
}

fn key_from_keyring() -> std::result::Result<[u8; 32], String> {
    let created: [u8; 32] = random().map_err(|e| e.to_string())?;
    keyring_call(move || {
        if let Err(e) = keyring::Entry::store_status() {
            return Err(format!("no system keyring: {e}"));
        }
        let entry =
            keyring::Entry::new(KEYRING_SERVICE, KEYRING_USER).map_err(|e| e.to_string())?;
        match entry.get_secret() {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| "the keyring holds a moat key of the wrong length".to_string()),
            Err(keyring::Error::NoEntry) => {
                entry.set_secret(&created).map_err(|e| e.to_string())?;
                Ok(created)
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

fn key_from_file(path: &Path) -> Result<[u8; 32]> {
    if !paths::nothing_at(path, "the encryption key")? {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| Error::io(path, "read", e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{}: the encryption key is readable by other users; run chmod 600 {}",
                        path.display(),
                        path.display()
                    ),
                ));
            }
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
        return <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{}: not a moat encryption key (expected 32 bytes, found {})",
                    path.display(),
                    bytes.len()
                ),
            )
        });
    }
    let key: [u8; 32] = random()?;
    paths::write_private(path, &key, 0o600)?;
    Ok(key)
}

impl CredentialStore {
    /// Opens the store under `home`, finding or creating its key as
    /// `MOAT_KEYRING_BACKEND` says (unset: keyring, else the key file).
    pub fn open(home: &Path) -> Result<CredentialStore> {
        let backend = std::env::var("MOAT_KEYRING_BACKEND").unwrap_or_default();
        Self::open_with(home, &backend, &key_from_keyring)
    }

    /// [`CredentialStore::open`] with the backend named and the keyring
    /// access given (tests pass a keyring that fails).
    pub(crate) fn open_with(
        home: &Path,
        backend: &str,
        keyring: &dyn Fn() -> std::result::Result<[u8; 32], String>,
    ) -> Result<CredentialStore> {
        let dir = home.join("credentials");
        let _lock = lock(&dir)?;
        let key_path = home.join("encryption.key");
        let file_source = |reason: String| KeySource::File {
            path: key_path.clone(),
            reason,
        };
        let (key, key_source) = match backend {
            "file" => (
                key_from_file(&key_path)?,
                file_source("MOAT_KEYRING_BACKEND=file".into()),
            ),
            "keyring" => {
                let key = keyring().map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!("the system keyring is not available ({e}) and MOAT_KEYRING_BACKEND=keyring forbids the file fallback"),
                    )
                })?;
                (key, KeySource::Keyring)
            }
            // A key file made earlier (on a headless host, say) stays in use.
            "" if key_path.exists() => (
                key_from_file(&key_path)?,
                file_source("an encryption key file exists".into()),
            ),
            "" => match keyring() {
                Ok(key) => (key, KeySource::Keyring),
                Err(reason) => {
                    tracing::warn!(%reason, "no system keyring; using the key file");
                    (key_from_file(&key_path)?, file_source(reason))
                }
            },
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("MOAT_KEYRING_BACKEND=\"{other}\" is not \"file\" or \"keyring\""),
                ))
            }
        };
        Ok(CredentialStore {
            dir,
            key: Secret::new(key),
            key_source,
        })
    }

    /// Where the key came from (to tell the user about a file fallback).
    pub fn key_source(&self) -> &KeySource {
        &self.key_source
    }

    /// The file a provider's grant lives in.
    pub fn path_of(&self, provider: &str) -> PathBuf {
        self.dir.join(format!("{provider}.enc"))
    }

    fn aad(provider: &str) -> Vec<u8> {
        format!("moat-credential-v1:{provider}").into_bytes()
    }

    fn cipher(&self) -> Result<Aes256Gcm> {
        Aes256Gcm::new_from_slice(self.key.expose())
            .map_err(|_| Error::new(ErrorKind::Internal, "bad key length"))
    }

    /// Encrypts and writes `grant`, replacing any earlier one.
    pub fn save(&self, grant: &StoredGrant) -> Result<PathBuf> {
        check_provider_name(&grant.provider)?;
        let plain = serde_json::to_vec(grant)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot encode a grant: {e}")))?;
        let nonce: [u8; 12] = random()?;
        let sealed = self
            .cipher()?
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &Self::aad(&grant.provider),
                },
            )
            .map_err(|_| Error::new(ErrorKind::Internal, "encryption failed"))?;
        let mut file = Vec::with_capacity(21 + sealed.len());
        file.extend_from_slice(MAGIC);
        file.push(VERSION);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&sealed);
        let path = self.path_of(&grant.provider);
        let _lock = lock(&self.dir)?;
        paths::write_private(&path, &file, 0o600)?;
        Ok(path)
    }

    /// Reads and decrypts a provider's grant; `Ok(None)` when there is none.
    pub fn load(&self, provider: &str) -> Result<Option<StoredGrant>> {
        check_provider_name(provider)?;
        let path = self.path_of(provider);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "read", e)),
        };
        let advice = |why: &str| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{}: cannot decrypt the stored {provider} credential ({why}); run `moat grant {provider}` again",
                    path.display()
                ),
            )
        };
        if data.len() < 21 + 16 || &data[..8] != MAGIC {
            return Err(advice("not a moat credential file"));
        }
        if data[8] != VERSION {
            return Err(advice(&format!("unknown format version {}", data[8])));
        }
        let plain = self
            .cipher()?
            .decrypt(
                Nonce::from_slice(&data[9..21]),
                Payload {
                    msg: &data[21..],
                    aad: &Self::aad(provider),
                },
            )
            .map_err(|_| {
                advice("it was written with another key, for another provider, or changed")
            })?;
        let grant: StoredGrant =
            serde_json::from_slice(&plain).map_err(|_| advice("its contents are not a grant"))?;
        if grant.provider != provider {
            return Err(advice("it belongs to another provider"));
        }
        Ok(Some(grant))
    }

    /// Removes a provider's grant; `Ok(false)` when there was none.
    pub fn remove(&self, provider: &str) -> Result<bool> {
        check_provider_name(provider)?;
        let path = self.path_of(provider);
        let _lock = lock(&self.dir)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(&path, "remove", e)),
        }
    }

    /// The providers that have a stored grant, sorted.
    pub fn providers(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.dir, "list", e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".enc"))
                    .map(str::to_string)
            })
            .filter(|n| check_provider_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Provider names become file names: lowercase letters, digits, `-` and `_`.
pub(crate) fn check_provider_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("\"{name}\" is not a provider name (lowercase letters, digits, - and _)"),
        ))
    }
}
