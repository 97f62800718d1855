//! Channel path decoding (percent escapes, query, UTF-8) and the UUID4 check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staps::fuzz as http;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = http::decode_path(target);
    if let Some(path) = &decoded {
        // Decoding only ever shortens, and drops the query.
        assert!(path.len() <= target.len());
        let _ = http::is_uuid4_path(path);
    }
    // Without escapes or a query there is nothing to decode.
    if !target.contains(['%', '?']) {
        assert_eq!(decoded.as_deref(), Some(target));
    }
});
