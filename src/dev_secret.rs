//! The development token secret of the single-process mode: generated once per data directory,
//! so that tokens stay valid across restarts, and never exposed beyond loopback by default.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use rand::Rng;

/// File in the data directory that holds the development secret.
const FILE_NAME: &str = "dev-secret";

/// Length of a generated secret in bytes, before hex encoding.
const SECRET_BYTES: usize = 32;

/// Source of the token secret.
pub enum Secret {
    /// `JWT_SECRET` or `--jwt-secret`.
    Configured(String),
    /// Generated for this data directory.
    Development(String),
}

impl Secret {
    /// Returns the secret.
    pub fn value(&self) -> &str {
        match self {
            Secret::Configured(value) | Secret::Development(value) => value,
        }
    }
}

/// Reads the data directory's development secret, creating it (mode 0600) on first use.
///
/// # Errors
/// Fails when the directory or the file cannot be read or written.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(FILE_NAME);
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_owned();
        if !secret.is_empty() {
            return Ok(secret);
        }
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("create the data directory {}", data_dir.display()))?;
    let bytes: [u8; SECRET_BYTES] = rand::rng().random();
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    write_private(&path, &secret).with_context(|| format!("write the development secret to {}", path.display()))?;
    Ok(secret)
}

fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{secret}")
}

/// Checks that every listen address is a loopback address.
///
/// # Errors
/// Fails on the first non-loopback address, naming its flag and the way to allow it.
pub fn require_loopback(addrs: &[(&str, SocketAddr)]) -> anyhow::Result<()> {
    for (flag, addr) in addrs {
        if !addr.ip().is_loopback() {
            bail!(
                "{flag} {addr} is not a loopback address, but client tokens are signed with the development secret; \
                 set JWT_SECRET to a real secret, or pass --allow-remote-dev-secret to expose the development secret"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once() {
        let dir = std::env::temp_dir().join(format!("notify-dev-secret-{}", std::process::id()));
        let first = load_or_create(&dir).expect("secret is created");
        let second = load_or_create(&dir).expect("secret is read back");
        assert_eq!(first, second);
        assert_eq!(first.len(), SECRET_BYTES * 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn non_loopback_listen_is_rejected() {
        let public = SocketAddr::from(([0, 0, 0, 0], 8080));
        let local = SocketAddr::from(([127, 0, 0, 1], 8080));
        assert!(require_loopback(&[("--edge-listen", local)]).is_ok());
        let err = require_loopback(&[("--edge-listen", public)]).expect_err("0.0.0.0 is not loopback");
        assert!(err.to_string().contains("--allow-remote-dev-secret"), "{err}");
    }
}
