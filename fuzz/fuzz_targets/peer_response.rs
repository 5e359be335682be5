//! A peer's response head as the mirror reads it: never panics, and what it accepts describes
//! exactly the requested bytes.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use spegel::{
    mirror::{FetchSpec, describe},
    oci::{ByteRange, DistributionPath},
};

const BLOB: &str =
    "/v2/library/app/blobs/sha256:b6d6089ca6c395fd563c2084f5dd7bc56a2f5e6a81413558c5be0083287a77e9";

fuzz_target!(|data: &[u8]| {
    // First line: "<status> <kind m|b|t> [range]"; then "name: value" header lines.
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = s.split('\n');
    let mut first = lines.next().unwrap_or_default().splitn(3, ' ');
    let Some(status) = first.next().and_then(|c| c.parse::<u16>().ok()) else {
        return;
    };
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    let target = match first.next() {
        Some("m") => "/v2/library/app/manifests/sha256:b6d6089ca6c395fd563c2084f5dd7bc56a2f5e6a81413558c5be0083287a77e9".to_string(),
        Some("t") => "/v2/library/app/manifests/latest".to_string(),
        _ => BLOB.to_string(),
    };
    let range = first.next().and_then(|r| r.parse::<ByteRange>().ok());
    let Ok(path) = DistributionPath::parse(&target, Some("ns=docker.io")) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.trim().as_bytes()),
        ) {
            headers.append(n, v);
        }
    }
    let spec = FetchSpec {
        path,
        head: false,
        range,
    };
    if let Ok((_, size, _, got)) = describe(&spec, status, &headers) {
        if let (Some(asked), Some(got)) = (range, got) {
            assert_eq!(asked.resolve(size).ok(), Some(got));
        }
    }
});
