//! Read-only URLs (SPEC §12): every channel `/P` has a listen-only twin
//! `/r/<token>`, derived from `P` and the server's secret, so nothing is
//! stored and nothing configured per channel.
//!
//! The token is AES-SIV (RFC 5297, AES-128 with a 256-bit key: two 128-bit
//! halves, one for S2V/CMAC and one for CTR) of `P`, base64url without
//! padding. SIV is a *deterministic* authenticated encryption: the same path
//! always gives the same token (the twin is a URL that can be handed out
//! again and again, and the twin of a twin is itself), and without the key
//! nobody can make a token that decrypts (the 128-bit synthetic IV is the
//! authentication tag) or learn anything of `P` from one but its length. Its
//! one leak, that equal paths give equal tokens, is the point here. The
//! associated data names the purpose and version, so the same secret could
//! never be confused with another use of it.

use aes_siv::{KeyInit, siv::Aes128Siv};
use data_encoding::BASE64URL_NOPAD;

/// The path prefix of every twin.
const PREFIX: &str = "/r/";

/// The length of the secret: AES-128-SIV's key.
pub const SECRET_LEN: usize = 32;

/// What the tokens are bound to besides the secret.
const PURPOSE: &[u8] = b"staps read-only URL v1";

/// Maps channel paths to their twins' tokens and back, under one secret.
pub struct Twins {
    key: [u8; SECRET_LEN],
}

impl std::fmt::Debug for Twins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("Twins")
    }
}

impl Twins {
    /// Twins under `secret`.
    pub fn new(secret: [u8; SECRET_LEN]) -> Twins {
        Twins { key: secret }
    }

    fn cipher(&self) -> Aes128Siv {
        Aes128Siv::new(&self.key.into())
    }

    /// The token of channel `path`.
    pub fn token(&self, path: &str) -> String {
        // Encryption fails only for more headers than SIV takes; one is fine.
        let sealed = self
            .cipher()
            .encrypt([PURPOSE], path.as_bytes())
            .unwrap_or_default();
        BASE64URL_NOPAD.encode(&sealed)
    }

    /// The twin path of channel `path`: `/r/<token>`. A twin's twin is
    /// itself.
    pub fn twin(&self, path: &str) -> String {
        let channel = self.channel(path).unwrap_or_else(|| path.to_owned());
        format!("{PREFIX}{}", self.token(&channel))
    }

    /// The channel of twin path `path`, if it is one: `/r/` and a token that
    /// decrypts under this secret to a channel path. Anything else is an
    /// ordinary path (`None`).
    pub fn channel(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(PREFIX)?;
        let sealed = BASE64URL_NOPAD.decode(token.as_bytes()).ok()?;
        let plain = self.cipher().decrypt([PURPOSE], &sealed).ok()?;
        String::from_utf8(plain).ok().filter(|p| p.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/0b7e4a4f-3b0e-4c1e-9f55-7f3c1f2b9d10";

    #[test]
    fn a_twin_maps_back_to_its_channel_and_is_its_own_twin() {
        let twins = Twins::new([1; SECRET_LEN]);
        let twin = twins.twin(PATH);
        assert!(twin.starts_with(PREFIX));
        // A UUID4 path's token: 16 bytes of tag and 37 of path, base64url.
        assert_eq!(twin.len(), PREFIX.len() + 71);
        assert!(
            twin[3..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(twins.channel(&twin).as_deref(), Some(PATH));
        assert_eq!(twins.twin(&twin), twin);
        assert_eq!(twins.twin(PATH), twin, "deterministic");
    }

    #[test]
    fn another_secret_or_a_tampered_token_gives_an_ordinary_path() {
        let twins = Twins::new([1; SECRET_LEN]);
        let other = Twins::new([2; SECRET_LEN]);
        let twin = twins.twin(PATH);
        assert_ne!(other.twin(PATH), twin);
        assert_eq!(other.channel(&twin), None);
        let mut tampered = twin.clone().into_bytes();
        let last = tampered.len() - 5;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(twins.channel(&String::from_utf8(tampered).unwrap()), None);
        for path in ["/r/", "/r/x", "/r/!!!!", "/chat", "/r"] {
            assert_eq!(twins.channel(path), None, "{path}");
        }
    }
}
