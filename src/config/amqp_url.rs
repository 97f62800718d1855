//! AMQP URLs: where the broker is and how to log in, read as amiquip reads
//! them but without it (the broker thread alone speaks AMQP), and the
//! percent-decoding they share with channel paths.

use crate::config::percent::percent_decode;

use std::time::Duration;

/// Heartbeat interval unless the URL sets one, in seconds.
const DEFAULT_HEARTBEAT: u16 = 30;
/// Connection timeout unless the URL sets one.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// No user in the URL: the broker's default (guest/guest).
    Guest,
    /// `user:pass@`.
    Plain {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `?auth_mechanism=external` (a TLS client certificate).
    External,
}

/// A broker URL, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    /// `amqps://`.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (5672, or 5671 for amqps).
    pub port: u16,
    /// How to log in.
    pub credentials: Credentials,
    /// Virtual host; `None` for the default `/`.
    pub vhost: Option<String>,
    /// Heartbeat interval in seconds.
    pub heartbeat: u16,
    /// Most AMQP channels, when the URL says.
    pub channel_max: Option<u16>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl BrokerUrl {
    /// Parse `amqp[s]://[user[:pass]@]host[:port][/vhost][?heartbeat=N&connection_timeout=MS&channel_max=N&auth_mechanism=external]`.
    /// Without a user, guest/guest; without a vhost, `/`.
    pub(crate) fn parse(text: &str) -> Result<BrokerUrl, String> {
        let form = "expected amqp://user:pass@host:port/vhost";
        let url = url::Url::parse(text).map_err(|e| format!("{e}; {form}"))?;
        let tls = match url.scheme() {
            "amqp" => false,
            "amqps" if cfg!(feature = "tls") => true,
            "amqps" => return Err("amqps:// needs staps built with the cargo feature 'tls'".into()),
            _ => return Err(format!("not an AMQP URL; {form}")),
        };
        let decode =
            |s: &str| percent_decode(s).ok_or_else(|| format!("'{s}' is not UTF-8 once decoded"));
        let mut credentials = if url.username().is_empty() {
            Credentials::Guest
        } else {
            Credentials::Plain {
                username: decode(url.username())?,
                password: decode(url.password().unwrap_or(""))?,
            }
        };
        let vhost = url.path().strip_prefix('/').unwrap_or("");
        if vhost.contains('/') {
            return Err(format!("a vhost is one path segment ('/' as %2f); {form}"));
        }
        let vhost = (!vhost.is_empty()).then(|| decode(vhost)).transpose()?;
        let mut heartbeat = DEFAULT_HEARTBEAT;
        let mut channel_max = None;
        let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
        for (key, value) in url.query_pairs() {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("query parameter {key}={value} is not a number"))
            };
            match key.as_ref() {
                "heartbeat" => {
                    heartbeat = number()?.try_into().map_err(|_| "heartbeat too large")?;
                }
                "channel_max" => {
                    channel_max = Some(number()?.try_into().map_err(|_| "channel_max too large")?);
                }
                "connection_timeout" => connect_timeout = Duration::from_millis(number()?),
                "auth_mechanism" if value == "external" => credentials = Credentials::External,
                _ => {
                    return Err(format!(
                        "unsupported query parameter '{key}={value}' (heartbeat, connection_timeout, channel_max, auth_mechanism=external)"
                    ));
                }
            }
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => "localhost".into(),
        };
        let port = url.port().unwrap_or(if tls { 5671 } else { 5672 });
        Ok(BrokerUrl {
            tls,
            host,
            port,
            credentials,
            vhost,
            heartbeat,
            channel_max,
            connect_timeout,
        })
    }
}

/// The URLs of an `amqp` value: one, or several (the nodes of a cluster,
/// in the order to try them) separated by spaces or commas.
pub(crate) fn urls(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|url| !url.is_empty())
}

/// Every URL of an `amqp` value, parsed; the error names the first bad one,
/// without its password.
pub(crate) fn parse_all(text: &str) -> Result<Vec<BrokerUrl>, String> {
    let parsed = urls(text)
        .map(|url| BrokerUrl::parse(url).map_err(|m| format!("'{}': {m}", redact_one(url))))
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.is_empty() {
        return Err("no URL".into());
    }
    Ok(parsed)
}

impl BrokerUrl {
    /// The node it names, for logs, `/metrics` and `/healthz`: scheme, host,
    /// port and vhost, never the credentials.
    pub(crate) fn node(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let vhost = self
            .vhost
            .as_deref()
            .map_or(String::new(), |v| v.replace('%', "%25").replace('/', "%2f"));
        format!("{scheme}://{host}:{}/{vhost}", self.port)
    }
}

/// An `amqp` value (one URL or several) with every password replaced, for
/// logs and `--check-config`.
pub(crate) fn redact(text: &str) -> String {
    urls(text).map(redact_one).collect::<Vec<_>>().join(" ")
}

/// One AMQP URL with its password replaced.
fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_as_amiquip_reads_them() {
        let b = BrokerUrl::parse(
            "amqp://staps:s%40cret@[::1]:5673/v%2fh?heartbeat=5&connection_timeout=2500",
        )
        .unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("::1", 5673, false));
        assert_eq!(b.connect_timeout, Duration::from_millis(2500));
        assert_eq!(b.heartbeat, 5);
        assert_eq!(
            b.credentials,
            Credentials::Plain {
                username: "staps".into(),
                password: "s@cret".into()
            }
        );
        assert_eq!(b.vhost.as_deref(), Some("v/h"));
        let d = BrokerUrl::parse("amqp://h/").unwrap();
        assert_eq!(
            (d.port, d.heartbeat, d.vhost, d.credentials),
            (5672, 30, None, Credentials::Guest)
        );
        assert!(BrokerUrl::parse("amqp://staps:@localhost/").is_ok());
    }

    #[test]
    fn amqps_needs_the_tls_feature() {
        let parsed = BrokerUrl::parse("amqps://u:p@broker.example/");
        if cfg!(feature = "tls") {
            let b = parsed.unwrap();
            assert!(b.tls);
            assert_eq!(b.port, 5671);
        } else {
            assert!(parsed.unwrap_err().contains("feature 'tls'"));
        }
    }

    #[test]
    fn bad_urls_say_why() {
        assert!(BrokerUrl::parse("amqp://h:notaport/").is_err());
        assert!(
            BrokerUrl::parse("amqp://h/?frobnicate=1")
                .unwrap_err()
                .contains("frobnicate")
        );
        assert!(BrokerUrl::parse("amqp://h/a/b").is_err());
        assert!(BrokerUrl::parse("http://h/").is_err());
        assert!(BrokerUrl::parse("amqp://h/?heartbeat=x").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("amqp://u:secret@h:5672/v"), "amqp://u:***@h:5672/v");
        assert_eq!(redact("amqp://h/"), "amqp://h/");
        // Every URL of a list: a second one's password was shown whole.
        assert_eq!(
            redact("amqp://u:one@a/, amqp://v:two@b:5673/v\tamqp://c"),
            "amqp://u:***@a/ amqp://v:***@b:5673/v amqp://c"
        );
    }

    #[test]
    fn several_urls_are_nodes_to_try_in_order() {
        let nodes = parse_all("amqp://u:p@a/, amqps://u:p@[::1]:5999/v%2fh  amqp://c").unwrap();
        let names: Vec<String> = nodes.iter().map(BrokerUrl::node).collect();
        if cfg!(feature = "tls") {
            assert_eq!(
                names,
                [
                    "amqp://a:5672/",
                    "amqps://[::1]:5999/v%2fh",
                    "amqp://c:5672/"
                ]
            );
        }
        let bad = parse_all("amqp://u:p@a/ amqp://u:secret@b:notaport/").unwrap_err();
        assert!(bad.contains("amqp://u:***@b:notaport/"), "{bad}");
        assert!(!bad.contains("secret"), "{bad}");
        assert!(parse_all(" , ").is_err());
    }
}
