//! Bootstrap answers: an HTTP `/id` response, and static multiaddrs from flags.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::routing::parse_id_answer;

fuzz_target!(|data: &[u8]| {
    let _ = parse_id_answer(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<libp2p::Multiaddr>();
    }
});
