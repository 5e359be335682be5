//! Request heads as a client sends them: the codec must answer or reject, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::http::parse_head;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, len))) = parse_head(data) {
        // The head delimits itself: the bytes after it never change how it parses.
        let again = parse_head(&data[..len]).ok().flatten();
        assert_eq!(
            again.map(|(r, l)| (r.path, r.has_body, l)),
            Some((request.path, request.has_body, len))
        );
    }
});
