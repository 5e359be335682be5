//! Existing hosts.toml files re-serialised by `--prepend-existing`: the output must be TOML
//! containerd can read, and stable when re-encoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::host_config::reencode_existing_hosts;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(out) = reencode_existing_hosts(s) {
        let again = reencode_existing_hosts(&out);
        assert_eq!(
            again.as_deref().ok(),
            Some(out.as_str()),
            "re-encoding {out:?}"
        );
    }
});
