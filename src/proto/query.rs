//! A request target's query string: its keys, and the channel options it
//! carries (SPEC §10), which the registry keeps for a channel.

use std::time::Duration;

use crate::config::{Limits, SlowClient};

/// What a client asks of its channel in the handshake's query string
/// (SPEC §10). Options never change which channel it joins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `echo=1`: the client also receives its own messages.
    pub echo: bool,
    /// `replay=N`: on joining, first the channel's last N messages (at most
    /// `replay_length`).
    pub replay: usize,
    /// `max=N`: a channel this client creates takes at most N members.
    pub max: Option<usize>,
    /// `slow=wait|drop|disconnect`: the slow-client policy of a channel this
    /// client creates.
    pub slow: Option<SlowClient>,
    /// A stream listener's `since=ID` (or its `Last-Event-ID`): first the
    /// channel's held messages after that id (SPEC §11). Websocket clients
    /// use `replay` instead.
    pub since: Option<u64>,
    /// `linger=S`: a channel this client creates keeps its ring and relay
    /// binding for S seconds once emptied (at most `max_linger`).
    pub linger: Duration,
}

/// Read the channel options (SPEC §10) of request target `target`; unknown
/// keys are ignored, a malformed value is an error saying which.
pub(crate) fn parse_options(target: &str, limits: &Limits) -> Result<Options, String> {
    let mut options = Options::default();
    for (key, value) in query_keys(target) {
        match key {
            "echo" => {
                options.echo = match value {
                    "1" => true,
                    "0" => false,
                    _ => return Err(format!("echo={value}: 1 or 0 is expected")),
                }
            }
            "replay" => options.replay = number::<usize>(key, value)?.min(limits.replay_length),
            "max" => match number::<usize>(key, value)? {
                0 => return Err("max=0: at least 1 is expected".into()),
                n => options.max = Some(n),
            },
            "since" => options.since = Some(number(key, value)?),
            "linger" => {
                let asked = Duration::from_secs(number(key, value)?);
                options.linger = asked.min(limits.max_linger);
            }
            "slow" => {
                options.slow = Some(SlowClient::from_name(value).ok_or_else(|| {
                    format!("slow={value}: one of wait, drop, disconnect is expected")
                })?)
            }
            _ => {}
        }
    }
    Ok(options)
}

/// The value of option `key`, all digits.
fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse::<T>()
        .ok()
        .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("{key}={value}: a number is expected"))
}

/// The `key=value` pairs of a request target's query string (`key` alone
/// gives an empty value).
pub(crate) fn query_keys(target: &str) -> impl Iterator<Item = (&str, &str)> {
    target
        .split_once('?')
        .map_or("", |(_, query)| query)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}
