//! Named, scoped API tokens (`sluice token create|list|revoke`), stored
//! hashed in `<home>/tokens.json` (mode 0600). The server re-reads the file
//! when it changes, so a revoked token is refused with its next request, no
//! restart needed. The single token of `<home>/token` keeps working as a
//! token with every scope.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scope {
    /// Queries: projections, streams, transfers (when reads need a token).
    Read,
    /// Appends and domain commands.
    Write,
    /// Operator actions: dead letters, replay, rebuild, void, forget.
    Operate,
}

/// Every scope: what the legacy single token may do.
pub(crate) const ALL_SCOPES: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Operate];

/// One stored token: never the secret, only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredToken {
    pub(crate) name: String,
    pub(crate) scopes: Vec<Scope>,
    /// Hex SHA-256 of the secret.
    pub(crate) sha256: String,
    /// RFC 3339.
    pub(crate) created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    tokens: Vec<StoredToken>,
}

/// Where the tokens live under `home`.
pub(crate) fn path(home: &Path) -> PathBuf {
    home.join("tokens.json")
}

fn hex_sha256(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_file(path: &Path) -> anyhow::Result<File> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid tokens file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes atomically (temp file, rename), mode 0600.
fn write_file(path: &Path, file: &File) -> anyhow::Result<()> {
    crate::private_file::write_atomic(path, &serde_json::to_vec_pretty(file)?)
}

/// Creates token `name` with `scopes`; returns its secret (shown once).
pub(crate) fn create(path: &Path, name: &str, scopes: &[Scope]) -> anyhow::Result<String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("token name {name:?}: use letters, digits, '-', '_' or '.'");
    }
    if scopes.is_empty() {
        bail!("a token needs at least one scope: --scope read,write,operate");
    }
    let mut file = read_file(path)?;
    if file.tokens.iter().any(|t| t.name == name) {
        bail!("a token named {name:?} exists: revoke it first or choose another name");
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut scopes = scopes.to_vec();
    scopes.sort();
    scopes.dedup();
    file.tokens.push(StoredToken {
        name: name.to_owned(),
        scopes,
        sha256: hex_sha256(&secret),
        created: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    });
    write_file(path, &file)?;
    Ok(secret)
}

/// The stored tokens (without secrets).
pub(crate) fn list(path: &Path) -> anyhow::Result<Vec<StoredToken>> {
    Ok(read_file(path)?.tokens)
}

/// Removes token `name`; running servers refuse it from their next request.
pub(crate) fn revoke(path: &Path, name: &str) -> anyhow::Result<()> {
    let mut file = read_file(path)?;
    let before = file.tokens.len();
    file.tokens.retain(|t| t.name != name);
    if file.tokens.len() == before {
        bail!("no token named {name:?}: `sluice token list` shows them");
    }
    write_file(path, &file)
}

/// A file's modification time and length: a change of either means reload.
type Stamp = Option<(SystemTime, u64)>;

/// The server's view of the tokens file, re-read whenever it changes.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: PathBuf,
    cached: Mutex<(Stamp, Vec<StoredToken>)>,
}

impl TokenStore {
    /// A store over `path` (which may not exist yet).
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new((None, Vec::new())),
        }
    }

    /// The scopes of `secret`, if a stored token has it.
    pub(crate) fn scopes_of(&self, secret: &str) -> Option<Vec<Scope>> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.0 != stamp {
            match read_file(&self.path) {
                Ok(file) => *cached = (stamp, file.tokens),
                Err(e) => {
                    // Refuse every named token rather than trust a stale list.
                    tracing::error!(error = %format!("{e:#}"), "cannot read the API tokens file; named tokens are refused");
                    *cached = (None, Vec::new());
                }
            }
        }
        let hash = hex_sha256(secret);
        cached
            .1
            .iter()
            .find(|t| bool::from(t.sha256.as_bytes().ct_eq(hash.as_bytes())))
            .map(|t| t.scopes.clone())
    }
}

/// `sluice token ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a named token; its secret is printed once.
    Create {
        /// Name, for rotation and revocation (e.g. `ci-2026-12`).
        name: String,
        /// Scopes, comma-separated: read, write, operate.
        #[arg(long, value_delimiter = ',', value_enum, required = true)]
        scope: Vec<Scope>,
    },
    /// List tokens (names, scopes, creation time; never secrets).
    List,
    /// Revoke a token: servers refuse it from its next request.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// Runs `sluice token ...` on the tokens of `home`.
pub(crate) fn run(cmd: TokenCommand, home: &Path) -> anyhow::Result<()> {
    let path = path(home);
    match cmd {
        TokenCommand::Create { name, scope } => {
            let secret = create(&path, &name, &scope)?;
            println!("{secret}");
            eprintln!(
                "token {name:?} created; the secret above is shown only once (stored hashed in {})",
                path.display()
            );
        }
        TokenCommand::List => {
            for t in list(&path)? {
                let scopes: Vec<String> = t
                    .scopes
                    .iter()
                    .map(|s| format!("{s:?}").to_lowercase())
                    .collect();
                println!("{}\t{}\t{}", t.name, scopes.join(","), t.created);
            }
        }
        TokenCommand::Revoke { name } => {
            revoke(&path, &name)?;
            println!("token {name:?} revoked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_private_and_revoked_at_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let store = TokenStore::new(p.clone());
        assert_eq!(store.scopes_of("nothing"), None);
        let secret = create(&p, "ci", &[Scope::Write, Scope::Read]).unwrap();
        assert_eq!(secret.len(), 64);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains(&secret), "the secret is stored in clear");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            store.scopes_of(&secret),
            Some(vec![Scope::Read, Scope::Write])
        );
        assert!(create(&p, "ci", &[Scope::Read]).is_err());
        assert!(create(&p, "a b", &[Scope::Read]).is_err());
        let other = create(&p, "ops", &[Scope::Operate]).unwrap();
        assert_eq!(list(&p).unwrap().len(), 2);
        revoke(&p, "ci").unwrap();
        assert_eq!(store.scopes_of(&secret), None);
        assert_eq!(store.scopes_of(&other), Some(vec![Scope::Operate]));
        assert!(revoke(&p, "ci").is_err());
    }
}
