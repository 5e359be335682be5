//! Request paths with their query, and image names: parse, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::oci::{DistributionPath, Reference};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    if let Ok(parsed) = DistributionPath::parse(path, query) {
        // A parsed path names a repository the peer request can be rebuilt from.
        assert!(!parsed.reference.repository.is_empty());
        let _ = parsed.reference.identifier();
    }
    if let Ok(reference) = Reference::parse_image_name(s) {
        let _ = reference.filter_string();
        let _ = reference.tag_name();
    }
});
