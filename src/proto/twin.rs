//! Read-only and publish-only URLs (SPEC §12): every channel `/P` has a
//! listen-only twin `/r/<token>` and a publish-only twin `/w/<token>`,
//! derived from `P` and the server's secret, so nothing is stored and
//! nothing configured per channel.
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
//! never be confused with another use of it, and each twin has its own: the
//! two tokens of a channel differ, and neither tells anything of the other.

use aes_siv::{KeyInit, siv::Aes128Siv};
use data_encoding::BASE64URL_NOPAD;

/// The length of the secret: AES-128-SIV's key.
pub const SECRET_LEN: usize = 32;

/// What a URL lets its holder do with its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The channel's own path: listen and send.
    Full,
    /// A read-only twin (`/r/`): listen only.
    ReadOnly,
    /// A publish-only twin (`/w/`): send only.
    WriteOnly,
}

impl Access {
    /// The path prefix of its twins, and what their tokens are bound to
    /// besides the secret.
    fn twin(self) -> Option<(&'static str, &'static [u8])> {
        match self {
            Access::Full => None,
            Access::ReadOnly => Some(("/r/", b"staps read-only URL v1")),
            Access::WriteOnly => Some(("/w/", b"staps publish-only URL v1")),
        }
    }

    /// Whether its holder may send to the channel.
    pub fn may_send(self) -> bool {
        self != Access::ReadOnly
    }

    /// Whether its holder may receive the channel's messages.
    pub fn may_listen(self) -> bool {
        self != Access::WriteOnly
    }
}

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

    /// The twin path of channel `path` with `access` (`/r/<token>` or
    /// `/w/<token>`; the channel's own path for [`Access::Full`]). The
    /// channel of a twin path is its channel: a twin's own twin is itself.
    pub fn twin(&self, access: Access, path: &str) -> String {
        let channel = self
            .channel(path)
            .map_or_else(|| path.to_owned(), |(c, _)| c);
        let Some((prefix, purpose)) = access.twin() else {
            return channel;
        };
        // Encryption fails only for more headers than SIV takes; one is fine.
        let sealed = self
            .cipher()
            .encrypt([purpose], channel.as_bytes())
            .unwrap_or_default();
        format!("{prefix}{}", BASE64URL_NOPAD.encode(&sealed))
    }

    /// The channel of twin path `path` and what the twin allows, if it is
    /// one: `/r/` or `/w/` and a token that decrypts under this secret, for
    /// that twin, to a channel path. Anything else is an ordinary path
    /// (`None`).
    pub fn channel(&self, path: &str) -> Option<(String, Access)> {
        [Access::ReadOnly, Access::WriteOnly]
            .into_iter()
            .find_map(|access| {
                let (prefix, purpose) = access.twin()?;
                let token = path.strip_prefix(prefix)?;
                let sealed = BASE64URL_NOPAD.decode(token.as_bytes()).ok()?;
                let plain = self.cipher().decrypt([purpose], &sealed).ok()?;
                let channel = String::from_utf8(plain).ok()?;
                channel.starts_with('/').then_some((channel, access))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/0b7e4a4f-3b0e-4c1e-9f55-7f3c1f2b9d10";

    #[test]
    fn a_twin_maps_back_to_its_channel_and_is_its_own_twin() {
        let twins = Twins::new([1; SECRET_LEN]);
        for (access, prefix) in [(Access::ReadOnly, "/r/"), (Access::WriteOnly, "/w/")] {
            let twin = twins.twin(access, PATH);
            assert!(twin.starts_with(prefix));
            // A UUID4 path's token: 16 bytes of tag and 37 of path, base64url.
            assert_eq!(twin.len(), prefix.len() + 71);
            assert!(
                twin[3..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(twins.channel(&twin), Some((PATH.to_owned(), access)));
            assert_eq!(twins.twin(access, &twin), twin);
            assert_eq!(twins.twin(access, PATH), twin, "deterministic");
            assert_eq!(twins.twin(Access::Full, &twin), PATH);
        }
    }

    /// The two twins of a channel have tokens of their own: a `/w/` token
    /// put after `/r/` (or the other way) is no twin at all.
    #[test]
    fn the_two_twins_differ_and_neither_opens_the_other() {
        let twins = Twins::new([1; SECRET_LEN]);
        let read = twins.twin(Access::ReadOnly, PATH);
        let write = twins.twin(Access::WriteOnly, PATH);
        assert_ne!(read[3..], write[3..]);
        assert_eq!(twins.channel(&format!("/w/{}", &read[3..])), None);
        assert_eq!(twins.channel(&format!("/r/{}", &write[3..])), None);
    }

    #[test]
    fn another_secret_or_a_tampered_token_gives_an_ordinary_path() {
        let twins = Twins::new([1; SECRET_LEN]);
        let other = Twins::new([2; SECRET_LEN]);
        let twin = twins.twin(Access::ReadOnly, PATH);
        assert_ne!(other.twin(Access::ReadOnly, PATH), twin);
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
