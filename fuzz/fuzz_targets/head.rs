//! The request head as a client sends it: parsed, then routed (usage page,
//! HTTP errors, upgrade checks, path decoding, channel options, stats,
//! streaming listeners, the checks of an HTTP publish) and answered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staps::fuzz::{self as http, Length, Route, SECRET_LEN, Settings, Twins};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((request, len))) = http::parse_head(data) else {
        return;
    };
    assert!(len <= data.len());
    let mut settings = Settings::default();
    // Both path policies, chosen by the input so the fuzzer explores each.
    settings.limits.uuid_only = len % 2 == 1;
    let twins = Twins::new([7; SECRET_LEN]);
    match http::route(&request, &settings, &twins) {
        Route::Respond(response) => {
            let bytes = response.to_bytes();
            assert!(bytes.starts_with(b"HTTP/1.1 "));
        }
        Route::Upgrade {
            path,
            accept,
            options,
            ..
        } => {
            assert!(path.starts_with('/') && path.len() <= settings.limits.max_path_length);
            assert_eq!(accept.len(), 28);
            assert!(options.replay <= settings.limits.replay_length);
            assert_ne!(options.max, Some(0));
        }
        Route::Stats { path, .. } => {
            assert!(path.starts_with('/') && path.len() <= settings.limits.max_path_length);
        }
        Route::Listen { path, options, .. } => {
            assert!(path.starts_with('/') && path.len() <= settings.limits.max_path_length);
            assert!(options.replay <= settings.limits.replay_length);
        }
        Route::Publish(publish) => {
            let path = &publish.path;
            assert!(path.starts_with('/') && path.len() <= settings.limits.max_path_length);
            if let Length::Fixed(n) = publish.length {
                assert!(n <= settings.limits.max_message_size);
            }
        }
    }
});
