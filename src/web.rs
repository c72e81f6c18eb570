//! Fetching a URL for a model (IterResearch's `fetch_url` tool, off by default) without
//! letting it reach what the server can reach but the model should not.
//!
//! A model picks the URL, so a prompt can pick it too. Every hop is therefore resolved first
//! and refused if any address it resolves to is loopback, private, link-local (cloud metadata
//! lives at 169.254.169.254), shared, multicast or otherwise not globally routable; the
//! connection is then pinned to the checked address, so a second DNS answer cannot swap in
//! another (rebinding). Redirects are followed by hand, each hop checked the same way, and the
//! body is read only up to a bound instead of whole.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;

/// Most redirects followed.
const MAX_HOPS: usize = 5;
/// Most body bytes read; a model sees only the first few thousand characters anyway.
pub const MAX_BODY_BYTES: usize = 256 << 10;
const TIMEOUT: Duration = Duration::from_secs(15);

/// Whether an address is one a model may be let to reach: globally routable unicast only.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = [s[6].to_be_bytes(), s[7].to_be_bytes()];
                return is_public_v4(Ipv4Addr::new(a[0], a[1], b[0], b[1]));
            }
            // IPv4-compatible addresses (::/96, deprecated) embed an IPv4 address too, and
            // some stacks still route them to it: none is public.
            if s[..6] == [0, 0, 0, 0, 0, 0] {
                return false;
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || s[0] == 0x2001 && s[1] == 0xdb8) // documentation
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// Fetches `url` and returns its body as text (at most [`MAX_BODY_BYTES`]), or a sentence
/// saying why not, for the model to read. `allowed` decides which addresses may be reached.
pub async fn fetch_text(url: &str, allowed: fn(IpAddr) -> bool) -> String {
    match fetch(url, allowed).await {
        Ok(text) => text,
        Err(e) => format!("error: {e}"),
    }
}

async fn fetch(url: &str, allowed: fn(IpAddr) -> bool) -> Result<String, String> {
    let mut url = reqwest::Url::parse(url).map_err(|_| format!("'{url}' is not a URL"))?;
    for _ in 0..=MAX_HOPS {
        let response = one_hop(&url, allowed).await?;
        if response.status().is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or("a redirect without a Location")?;
            url = url
                .join(location)
                .map_err(|_| format!("a redirect to '{location}', which is not a URL"))?;
            continue;
        }
        return read_bounded(response).await;
    }
    Err(format!("more than {MAX_HOPS} redirects"))
}

/// Checks where `url` leads, then asks it, connected to the checked address only.
async fn one_hop(
    url: &reqwest::Url,
    allowed: fn(IpAddr) -> bool,
) -> Result<reqwest::Response, String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err("only http and https URLs can be fetched".into());
    }
    let host = url.host_str().ok_or("the URL has no host")?.to_owned();
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((bare, port)))
            .await
            .map_err(|_| format!("looking up {host} timed out"))?
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    if let Some(bad) = addrs.iter().find(|a| !allowed(a.ip())) {
        return Err(format!(
            "{host} resolves to {}, which is not a public address; fetch_url reaches public hosts only",
            bad.ip()
        ));
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .resolve(bare, first)
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| e.to_string())
}

async fn read_bounded(response: reqwest::Response) -> Result<String, String> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let room = MAX_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_BODY_BYTES {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::169.254.169.254",
            "::8.8.8.8",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad} passed");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(good.parse().unwrap()), "{good} was refused");
        }
    }

    /// A local server that answers every request with `answer`.
    async fn serve(answer: String) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn only_127_0_0_1(ip: IpAddr) -> bool {
        ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    #[tokio::test]
    async fn loopback_is_refused_by_name_and_by_number() {
        let addr = serve("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi".into()).await;
        for url in [
            format!("http://{addr}/"),
            format!("http://localhost:{}/", addr.port()),
        ] {
            let out = fetch_text(&url, is_public).await;
            assert!(out.contains("not a public address"), "{url}: {out}");
        }
        // The same server is read when the policy lets it through.
        assert_eq!(
            fetch_text(&format!("http://{addr}/"), only_127_0_0_1).await,
            "hi"
        );
    }

    #[tokio::test]
    async fn every_redirect_hop_is_checked() {
        // An allowed host that redirects to one that is not (as a public page could redirect
        // to the metadata service).
        let target = "http://127.0.0.2:9/latest/meta-data/";
        let addr = serve(format!(
            "HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
        let out = fetch_text(&format!("http://{addr}/"), only_127_0_0_1).await;
        assert!(
            out.contains("127.0.0.2") && out.contains("not a public address"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn the_body_is_read_up_to_the_bound() {
        let big = "x".repeat(MAX_BODY_BYTES * 2);
        let addr = serve(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{big}",
            big.len()
        ))
        .await;
        let out = fetch_text(&format!("http://{addr}/"), only_127_0_0_1).await;
        assert_eq!(out.len(), MAX_BODY_BYTES);
    }
}
