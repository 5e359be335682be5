use super::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, OCTET_STREAM,
};

/// The four manifest media types served from `/manifests/`.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// Whether `media_type` is one of the manifest media types.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    MANIFEST_MEDIA_TYPES.contains(&media_type)
}

/// Guesses the media type of small stored content from its bytes.
///
/// Unlike the original, content that cannot be classified is `application/octet-stream` rather
/// than an error, so arbitrary artifact blobs are still served from `/blobs/`.
pub fn fingerprint_media_type(data: &[u8]) -> &'static str {
    if data == b"{}" {
        return "application/vnd.oci.empty.v1+json";
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return OCTET_STREAM;
    };
    let schema_v2 = map.get("schemaVersion").and_then(|v| v.as_i64()) == Some(2);
    if schema_v2
        && let Some(mt) = map.get("mediaType").and_then(|v| v.as_str())
        && let Some(known) = MANIFEST_MEDIA_TYPES.iter().find(|m| **m == mt)
    {
        return known;
    }
    if map.get("manifests").is_some_and(|v| v.is_array()) {
        return OCI_INDEX;
    }
    if map.get("config").is_some_and(|v| v.is_object())
        && map.get("layers").is_some_and(|v| v.is_array())
    {
        return OCI_MANIFEST;
    }
    if map.contains_key("architecture") && map.contains_key("os") && map.contains_key("rootfs") {
        return OCI_CONFIG;
    }
    OCTET_STREAM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        assert_eq!(
            fingerprint_media_type(b"{}"),
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(fingerprint_media_type(b"\x1f\x8b\x08binary"), OCTET_STREAM);
        assert_eq!(fingerprint_media_type(b"[1,2]"), OCTET_STREAM);
        assert_eq!(
            fingerprint_media_type(format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{}},"layers":[]}}"#).as_bytes()),
            DOCKER_MANIFEST
        );
        assert_eq!(
            fingerprint_media_type(br#"{"schemaVersion":2,"manifests":[]}"#),
            OCI_INDEX
        );
        assert_eq!(
            fingerprint_media_type(br#"{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}"#),
            OCI_MANIFEST
        );
        assert_eq!(
            fingerprint_media_type(br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#),
            OCI_CONFIG
        );
        assert_eq!(fingerprint_media_type(br#"{"unknown":1}"#), OCTET_STREAM);
    }
}
