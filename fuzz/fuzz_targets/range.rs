//! Range and Content-Range values: resolved ranges always lie inside the content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::oci::{ByteRange, ContentRange};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let Ok(s) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Ok(range) = s.parse::<ByteRange>() {
        assert_eq!(range.to_string().parse::<ByteRange>().ok(), Some(range));
        if let Ok(r) = range.resolve(size) {
            assert!(r.start <= r.end && r.end < size && r.size == size);
            assert_eq!(r.len(), r.end - r.start + 1);
        }
    }
    if let Some(r) = ContentRange::parse_header(s) {
        assert!(r.start <= r.end && r.end < r.size);
        assert_eq!(ContentRange::parse_header(&r.to_string()), Some(r));
    }
});
