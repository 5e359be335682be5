//! The node's libp2p identity, persisted as `<data-dir>/private.key` (PKCS#8 Ed25519 PEM).

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use base64::Engine as _;
use libp2p::identity::Keypair;
use tracing::info;

use super::RoutingError;

/// DER prefix of a PKCS#8 v1 Ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn err(path: &Path, reason: impl Into<String>) -> RoutingError {
    RoutingError::Identity {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Loads the identity from `data_dir`, creating it on first start; an empty `data_dir` gives
/// an ephemeral identity.
pub fn load_or_create_identity(data_dir: &str) -> Result<Keypair, RoutingError> {
    if data_dir.is_empty() {
        return Ok(Keypair::generate_ed25519());
    }
    let dir = Path::new(data_dir);
    let path = dir.join("private.key");
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            info!(path = %path.display(), "loading the private key from data directory");
            decode_pem(&pem).map_err(|reason| err(&path, reason))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(path = %path.display(), "creating a new private key");
            std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
            let keypair = Keypair::generate_ed25519();
            let pem = encode_pem(&keypair).map_err(|reason| err(&path, reason))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| err(&path, e.to_string()))?;
            f.write_all(pem.as_bytes())
                .map_err(|e| err(&path, e.to_string()))?;
            Ok(keypair)
        }
        Err(e) => Err(err(&path, e.to_string())),
    }
}

fn encode_pem(keypair: &Keypair) -> Result<String, String> {
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|e| e.to_string())?;
    let secret = ed.secret();
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(secret.as_ref());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    Ok(format!(
        "-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"
    ))
}

fn decode_pem(pem: &str) -> Result<Keypair, String> {
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PRIVATE KEY-----")
        .and_then(|s| s.strip_suffix("-----END PRIVATE KEY-----"))
        .ok_or("expected a PEM block of type PRIVATE KEY")?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.split_whitespace().collect::<String>())
        .map_err(|e| format!("invalid base64: {e}"))?;
    let seed = der
        .strip_prefix(&PKCS8_ED25519_PREFIX[..])
        .ok_or("not a PKCS#8 Ed25519 key")?;
    if seed.len() != 32 {
        return Err("Ed25519 seed must be 32 bytes".into());
    }
    let mut seed = seed.to_vec();
    Keypair::ed25519_from_bytes(&mut seed).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("spegel");
        let a = load_or_create_identity(sub.to_str().unwrap()).unwrap();
        let b = load_or_create_identity(sub.to_str().unwrap()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let meta = std::fs::metadata(sub.join("private.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let pem = std::fs::read_to_string(sub.join("private.key")).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"));
        let e = load_or_create_identity("").unwrap();
        assert_ne!(e.public().to_peer_id(), a.public().to_peer_id());
    }

    #[test]
    fn invalid_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("private.key"),
            "-----BEGIN RSA PRIVATE KEY-----\nAA==\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(load_or_create_identity(dir.path().to_str().unwrap()).is_err());
        std::fs::write(
            dir.path().join("private.key"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(load_or_create_identity(dir.path().to_str().unwrap()).is_err());
    }
}
