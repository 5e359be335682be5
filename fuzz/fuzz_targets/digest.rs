//! Digests from request paths and peer headers: a parsed digest prints back as its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::oci::Digest;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(digest) = s.parse::<Digest>() {
        assert_eq!(digest.to_string(), s);
        assert!(digest.hex().bytes().all(|b| b.is_ascii_hexdigit()));
    }
});
