//! The twin URL decoder: any `/r/...` or `/w/...` path a client sends. A
//! token decodes only if it is exactly what the server makes of some
//! channel path for that twin, and every path's twins decode back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staps::fuzz::{Access, SECRET_LEN, Twins};

fuzz_target!(|data: &[u8]| {
    let twins = Twins::new([7; SECRET_LEN]);
    let Some((&which, data)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (prefix, access) = if which & 1 == 0 {
        ("/r/", Access::ReadOnly)
    } else {
        ("/w/", Access::WriteOnly)
    };
    let path = format!("{prefix}{text}");
    if let Some((channel, found)) = twins.channel(&path) {
        assert!(channel.starts_with('/'));
        // A token opens only the twin it was made for.
        assert_eq!(found, access);
        // Deterministic and canonical: no second spelling of a token.
        assert_eq!(twins.twin(access, &channel), path);
    }
    if text.starts_with('/') {
        // Any path's twins lead back to its channel (a twin's, to its own).
        let channel = twins.channel(text).map_or_else(|| text.to_owned(), |(c, _)| c);
        assert_eq!(twins.channel(&twins.twin(access, text)), Some((channel, access)));
    }
});
