//! The read-only URL decoder: any `/r/...` path a client sends. A token
//! decodes only if it is exactly what the server makes of some channel path,
//! and every path's token decodes back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staps::fuzz::{SECRET_LEN, Twins};

fuzz_target!(|data: &[u8]| {
    let twins = Twins::new([7; SECRET_LEN]);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = format!("/r/{text}");
    if let Some(channel) = twins.channel(&path) {
        assert!(channel.starts_with('/'));
        // Deterministic and canonical: no second spelling of a token.
        assert_eq!(twins.twin(&channel), path);
    }
    if text.starts_with('/') {
        // Any path's twin leads back to its channel (a twin's, to its own).
        let channel = twins.channel(text).unwrap_or_else(|| text.to_owned());
        assert_eq!(twins.channel(&twins.twin(text)), Some(channel));
    }
});
