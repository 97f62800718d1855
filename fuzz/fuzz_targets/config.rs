//! A configuration file's text, parsed and checked as `--check-config` does.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use staps::fuzz as config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Parsed, then looked up as at startup (users, groups, listeners).
    let checked = config::from_text(Path::new("fuzz.conf"), text)
        .and_then(|loaded| config::resolve(&loaded.settings).map(|_| loaded));
    match checked {
        Ok(loaded) => {
            // A valid file always names somewhere to listen.
            assert!(!loaded.settings.sockets.is_empty() || !loaded.settings.tcp.is_empty());
        }
        Err(e) => {
            // Every error names the file.
            assert!(e.to_string().contains("fuzz.conf"), "{e}");
        }
    }
});
