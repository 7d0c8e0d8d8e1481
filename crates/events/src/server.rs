//! The server-version gate: Sluice refuses servers that would silently
//! ignore the features its guarantees rest on.

use std::fmt;

use crate::error::Error;

/// Oldest nats-server Sluice accepts.
pub const MIN_SERVER_VERSION: ServerVersion = ServerVersion {
    major: 2,
    minor: 12,
    patch: 0,
};

/// A nats-server version as reported in its INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Patch version.
    pub patch: u64,
}

impl ServerVersion {
    /// Parses `2.15.1`, `v2.9.10` or `2.12.0-beta.1` (pre-release tags are ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let core = s.trim().trim_start_matches('v');
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        Some(Self {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next().flatten().unwrap_or(0),
        })
    }

    /// Fails with [`Error::ServerTooOld`] below [`MIN_SERVER_VERSION`].
    pub fn ensure_supported(self, raw: &str) -> Result<Self, Error> {
        if self < MIN_SERVER_VERSION {
            return Err(Error::ServerTooOld {
                found: raw.to_owned(),
                required: MIN_SERVER_VERSION.to_string(),
            });
        }
        Ok(self)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Checks the connected server's version and JetStream support.
pub fn check_server_version(client: &async_nats::Client) -> Result<ServerVersion, Error> {
    let info = client.server_info();
    let version = ServerVersion::parse(&info.version).ok_or_else(|| Error::ServerTooOld {
        found: info.version.clone(),
        required: MIN_SERVER_VERSION.to_string(),
    })?;
    version.ensure_supported(&info.version)?;
    if !info.jetstream {
        return Err(Error::JetStreamDisabled(format!(
            "{}:{}",
            info.host, info.port
        )));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_gates_versions() {
        let v = ServerVersion::parse("2.15.1").unwrap();
        assert!(v.ensure_supported("2.15.1").is_ok());
        assert!(
            ServerVersion::parse("2.12.0-beta.2")
                .unwrap()
                .ensure_supported("x")
                .is_ok()
        );
        let old = ServerVersion::parse("v2.9.10").unwrap();
        let err = old.ensure_supported("2.9.10").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("2.9.10") && msg.contains(">= 2.12.0"), "{msg}");
        assert!(ServerVersion::parse("garbage").is_none());
    }
}
