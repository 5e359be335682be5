//! Optional HTTP basic authentication shared by the registry, peer forwarding and `configuration`.
//!
//! Credentials come from a directory holding the files `username` and `password` (the layout of
//! a mounted Kubernetes Secret). File contents are used verbatim: a trailing newline is part of
//! the credential, as in the original.

use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Directory the Helm chart mounts the basic-auth Secret into.
pub const DEFAULT_DIR: &str = "/etc/secrets/basic-auth";

/// File holding the username inside the credentials directory.
pub const USERNAME_FILE: &str = "username";

/// File holding the password inside the credentials directory.
pub const PASSWORD_FILE: &str = "password";

/// Reasons loading credentials can fail.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The directory argument was empty.
    #[error("basic auth directory path cannot be empty")]
    EmptyDir,
    /// A credentials file exists but could not be read.
    #[error("read basic auth file {}: {cause}", path.display())]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        cause: io::Error,
    },
    /// A credentials file is not UTF-8.
    #[error("basic auth file {} is not valid UTF-8", path.display())]
    NotUtf8 {
        /// File that failed.
        path: PathBuf,
    },
}

/// Username and password for HTTP basic authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// User name, verbatim file contents.
    pub username: String,
    /// Password, verbatim file contents; empty when only a username is configured.
    pub password: String,
}

// Keeps the password out of logs and panic messages.
impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl BasicAuth {
    /// Loads credentials from `dir`; `None` when neither file has content (auth disabled).
    ///
    /// A missing file counts as empty, so a username alone gives an empty password.
    pub fn load(dir: &Path) -> Result<Option<BasicAuth>, AuthError> {
        if dir.as_os_str().is_empty() {
            return Err(AuthError::EmptyDir);
        }
        let username = read_optional(&dir.join(USERNAME_FILE))?;
        let password = read_optional(&dir.join(PASSWORD_FILE))?;
        if username.is_empty() && password.is_empty() {
            return Ok(None);
        }
        Ok(Some(BasicAuth { username, password }))
    }

    /// The `Authorization` header value: `Basic base64(username:password)`.
    pub fn header_value(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", STANDARD.encode(raw))
    }

    /// Checks an `Authorization` header value against these credentials.
    ///
    /// Parsing follows Go's `Request.BasicAuth` (case-insensitive scheme, standard base64,
    /// split at the first `:`); the comparison does not short-circuit on the first mismatch.
    pub fn verify(&self, authorization: Option<&str>) -> bool {
        let Some((username, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let user_ok = constant_time_eq(&username, self.username.as_bytes());
        let pass_ok = constant_time_eq(&password, self.password.as_bytes());
        user_ok & pass_ok
    }
}

/// Loads credentials from `dir`; see [`BasicAuth::load`].
pub fn load(dir: &Path) -> Result<Option<BasicAuth>, AuthError> {
    BasicAuth::load(dir)
}

fn read_optional(path: &Path) -> Result<String, AuthError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| AuthError::NotUtf8 {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(cause) => Err(AuthError::Read {
            path: path.to_path_buf(),
            cause,
        }),
    }
}

fn parse_basic(header: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    const PREFIX: &[u8] = b"Basic ";
    let bytes = header.as_bytes();
    if bytes.len() < PREFIX.len() || !bytes[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let decoded = STANDARD.decode(&bytes[PREFIX.len()..]).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

// Length is not secret (Go's ConstantTimeCompare also returns early on it); content is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, contents: &str) {
        std::fs::write(dir.join(name), contents).unwrap();
    }

    #[test]
    fn header_value_matches_go() {
        let auth = BasicAuth {
            username: "hello".into(),
            password: "world".into(),
        };
        assert_eq!(auth.header_value(), "Basic aGVsbG86d29ybGQ=");
    }

    #[test]
    fn load_missing_dir_or_files_is_disabled() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        assert!(load(&dir.path().join("nope")).unwrap().is_none());
        write(dir.path(), USERNAME_FILE, "");
        write(dir.path(), PASSWORD_FILE, "");
        assert!(load(dir.path()).unwrap().is_none());
    }

    #[test]
    fn load_raw_contents_without_trimming() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), USERNAME_FILE, "hello\n");
        write(dir.path(), PASSWORD_FILE, " world ");
        let auth = load(dir.path()).unwrap().unwrap();
        assert_eq!(auth.username, "hello\n");
        assert_eq!(auth.password, " world ");
    }

    #[test]
    fn load_username_only_gives_empty_password() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), USERNAME_FILE, "hello");
        let auth = load(dir.path()).unwrap().unwrap();
        assert_eq!(auth.username, "hello");
        assert_eq!(auth.password, "");
        assert_eq!(
            auth.header_value(),
            format!("Basic {}", STANDARD.encode("hello:"))
        );
    }

    #[test]
    fn load_rejects_empty_dir_and_non_utf8() {
        assert!(matches!(load(Path::new("")), Err(AuthError::EmptyDir)));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(USERNAME_FILE), [0xff, 0xfe]).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, AuthError::NotUtf8 { .. }), "{err}");
    }

    #[test]
    fn load_unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where a file is expected fails to read with something other than NotFound.
        std::fs::create_dir(dir.path().join(USERNAME_FILE)).unwrap();
        assert!(matches!(load(dir.path()), Err(AuthError::Read { .. })));
    }

    #[test]
    fn verify_accepts_only_matching_credentials() {
        let auth = BasicAuth {
            username: "hello".into(),
            password: "world".into(),
        };
        assert!(auth.verify(Some("Basic aGVsbG86d29ybGQ=")));
        assert!(auth.verify(Some("basic aGVsbG86d29ybGQ=")));
        assert!(auth.verify(Some(&auth.header_value())));
        assert!(!auth.verify(None));
        assert!(!auth.verify(Some("")));
        assert!(!auth.verify(Some("Bearer aGVsbG86d29ybGQ=")));
        assert!(!auth.verify(Some("Basic not-base64!")));
        let no_colon = format!("Basic {}", STANDARD.encode("helloworld"));
        assert!(!auth.verify(Some(&no_colon)));
        let wrong_pass = format!("Basic {}", STANDARD.encode("hello:worle"));
        assert!(!auth.verify(Some(&wrong_pass)));
        let wrong_user = format!("Basic {}", STANDARD.encode("hellp:world"));
        assert!(!auth.verify(Some(&wrong_user)));
        let longer = format!("Basic {}", STANDARD.encode("hello:world!"));
        assert!(!auth.verify(Some(&longer)));
    }

    #[test]
    fn verify_password_may_contain_colons() {
        let auth = BasicAuth {
            username: "u".into(),
            password: "a:b".into(),
        };
        assert!(auth.verify(Some(&auth.header_value())));
    }

    #[test]
    fn debug_redacts_password() {
        let auth = BasicAuth {
            username: "hello".into(),
            password: "secret".into(),
        };
        assert!(!format!("{auth:?}").contains("secret"));
    }
}
