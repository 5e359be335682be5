use serde::Serialize;

/// OCI distribution error codes (those this registry emits plus the spec's others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Authentication required or failed.
    Unauthorized,
    /// Name invalid.
    NameInvalid,
    /// Digest invalid.
    DigestInvalid,
    /// The operation is unsupported.
    Unsupported,
}

/// An OCI error, rendered as `{"errors":[{"code":…,"detail":…,"message":…}]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OciError {
    /// Error code.
    pub code: ErrorCode,
    /// Optional structured detail (`{"attempts":N}` for mirror failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// Human-readable message.
    pub message: String,
}

impl OciError {
    /// An error without detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OciError {
            code,
            detail: None,
            message: message.into(),
        }
    }

    /// An error with a detail object.
    pub fn with_detail(
        code: ErrorCode,
        message: impl Into<String>,
        detail: serde_json::Value,
    ) -> Self {
        OciError {
            code,
            detail: Some(detail),
            message: message.into(),
        }
    }

    /// The JSON body as sent on the wire.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [&'a OciError; 1],
        }
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec(&Body { errors: [self] }).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vectors() {
        let id = "sha256:03ffdf45276dd38ffac79b0e9c6c14d89d9113ad783d5922580f4c66a3305591";
        let e = OciError::with_detail(
            ErrorCode::BlobUnknown,
            format!("could not find peer for {id}"),
            serde_json::json!({"attempts": 0}),
        );
        let body = String::from_utf8(e.body()).unwrap();
        assert_eq!(
            body,
            format!(
                r#"{{"errors":[{{"code":"BLOB_UNKNOWN","detail":{{"attempts":0}},"message":"could not find peer for {id}"}}]}}"#
            )
        );
        assert_eq!(body.len(), 168);
        let e = OciError::with_detail(
            ErrorCode::BlobUnknown,
            format!("waited too long for inflight dials to complete for {id}"),
            serde_json::json!({"attempts": 2}),
        );
        assert_eq!(e.body().len(), 195);
        let e = OciError::with_detail(
            ErrorCode::BlobUnknown,
            format!("all request retries exhausted for {id}"),
            serde_json::json!({"attempts": 3}),
        );
        assert_eq!(e.body().len(), 178);
        let e = OciError::new(ErrorCode::Unauthorized, "invalid credentials");
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid credentials"}]}"#
        );
    }
}
