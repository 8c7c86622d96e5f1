//! What an admin listener without a token answers: only requests that name it by a loopback
//! host, sent by no web page of another origin and through no proxy.
//!
//! Without a token the listener trusts whoever reaches it, which the config allows only on
//! loopback. A browser on the same machine reaches loopback too: a page anywhere can POST to
//! `http://127.0.0.1:8081/drain` (a "simple" request: no preflight, it arrives with the page's
//! `Origin`), or rebind its own name to 127.0.0.1 and read `/connections` (the request then
//! carries the page's name in `Host`). A page of another local server (a dev server on
//! `localhost:3000`) is another origin as much as one on the internet. So `Host` must name a
//! loopback address or `localhost`, an `Origin`, when present, must be this listener's own
//! (`http://` and the request's `Host`), and a `Sec-Fetch-Site`, when present, must say the
//! request comes from the listener's own pages or from no page (`same-origin`, `none`). A
//! proxy on the same machine would make every client look local: a request that carries a
//! proxy's headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, `Via`) is refused too.
//! Anything else is 403. With a token, none of this applies: the token guards the listener
//! (see `unauthorized`). Owns no state.

use super::AdminState;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HOST, ORIGIN};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage as _, HttpResponse};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Middleware of every admin route: lets a request through when the listener has a token, or
/// when [`refusal`] finds nothing wrong with it; else answers 403.
///
/// It reads the token in force once, and leaves that reading in the request
/// (`RequestToken`) for the handler's token check: read twice, a reload removing the
/// token between the two readings would let the request through with neither check.
///
/// A refusal is logged within a budget (`RefusedAudit`: a burst, then one line
/// a second, the next line saying how many were not written): a page in a local browser can
/// loop cross-site requests as fast as they are answered.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let st = req.app_data::<web::Data<AdminState>>().cloned();
    let token = st.as_ref().and_then(|st| st.reloader.admin_token());
    if token.is_none() {
        if let Some(reason) = refusal(req.headers()) {
            let admitted = st
                .as_ref()
                .map_or(Some(0), |st| st.refused_loopback.admit(std::time::Instant::now()));
            if let Some(not_written) = admitted {
                tracing::info!(
                    peer = %req.peer_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string()),
                    path = req.path(),
                    refused_not_written_before = not_written,
                    "admin request refused: {reason}"
                );
            }
            let res = HttpResponse::Forbidden().json(json!({"error": "forbidden", "reason": reason}));
            return Ok(req.into_response(res).map_into_right_body());
        }
    }
    req.extensions_mut().insert(super::RequestToken(token));
    Ok(next.call(req).await?.map_into_left_body())
}

/// Headers only a proxy adds: a request carrying one came through something that may
/// relay anyone's request from loopback.
const PROXY_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
];

/// Where a browser says which site sent the request (Fetch Metadata; actix names no constant).
const SEC_FETCH_SITE: &str = "sec-fetch-site";

/// The `Sec-Fetch-Site` values of requests a tokenless listener answers: from its own pages,
/// or from no page (typed in the address bar, a bookmark). Tools send no such header.
const FETCH_SITES_ALLOWED: [&str; 2] = ["same-origin", "none"];

/// Why a tokenless admin listener refuses a request with these headers, if it does.
pub fn refusal(headers: &HeaderMap) -> Option<&'static str> {
    let host = match one_host(headers) {
        Ok(host) => host,
        Err(reason) => return Some(reason),
    };
    if PROXY_HEADERS.iter().any(|h| headers.contains_key(*h)) {
        return Some(
            "without an admin token, requests through a proxy are refused (Forwarded, X-Forwarded-*, \
             X-Real-IP or Via present): set [admin] token to put the admin listener behind one",
        );
    }
    if !headers
        .get_all(ORIGIN)
        .all(|o| o.to_str().is_ok_and(|o| is_own_origin(o, host)))
    {
        return Some("without an admin token, requests from pages of another origin are refused");
    }
    if !headers
        .get_all(SEC_FETCH_SITE)
        .all(|s| s.to_str().is_ok_and(|s| FETCH_SITES_ALLOWED.contains(&s)))
    {
        return Some("without an admin token, requests sent by pages of another site are refused");
    }
    None
}

/// The request's only `Host`, when it names a loopback address or `localhost`: two would
/// leave open which one an `Origin` is checked against.
fn one_host(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut hosts = headers.get_all(HOST);
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Err(
            "without an admin token, requests must carry one Host header naming a loopback address or localhost",
        );
    };
    match host.to_str() {
        Ok(h) if is_loopback_host(h) => Ok(h),
        _ => Err("without an admin token, the Host header must name a loopback address or localhost"),
    }
}

/// Whether `origin` is the listener's own, reached at `host`: `http://` (the admin listener
/// has no TLS) and the same host and port as the request names, so a page of another local
/// server (another port, `localhost` for `127.0.0.1`) is another origin. ASCII case aside: a
/// host name's case means nothing, and browsers write origins in lower case.
pub fn is_own_origin(origin: &str, host: &str) -> bool {
    origin
        .strip_prefix("http://")
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

/// `localhost` or a loopback IP literal, with or without a port (`[::1]:8081` for IPv6).
pub fn is_loopback_host(host: &str) -> bool {
    let valid_port = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(valid_port);
        return port_ok
            && inside
                .parse::<Ipv6Addr>()
                .is_ok_and(|ip| is_loopback_ip(IpAddr::V6(ip)));
    }
    let name = match host.split_once(':') {
        Some((name, port)) if valid_port(port) => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// A loopback address, an IPv4-mapped one (`::ffff:127.0.0.1`) included.
fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    #[test]
    fn loopback_hosts_with_and_without_port() {
        for h in [
            "127.0.0.1",
            "127.0.0.1:8081",
            "127.1.2.3:1",
            "localhost",
            "LocalHost:9001",
            "[::1]",
            "[::1]:8081",
            "[::ffff:127.0.0.1]:8081",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:8081",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "evil.localhost",
            "0.0.0.0:8081",
            "10.0.0.1:8081",
            "127.0.0.1:",
            "127.0.0.1:80a",
            "127.0.0.1:8081:1",
            "[::1",
            "[::1]x",
            "[::]:8081",
            "::1",
            "[::ffff:10.0.0.1]",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn only_the_listeners_own_origin_is_its_own() {
        for (o, host) in [
            ("http://127.0.0.1:8081", "127.0.0.1:8081"),
            ("http://localhost", "localhost"),
            ("http://localhost:8081", "LocalHost:8081"),
            ("http://[::1]:8081", "[::1]:8081"),
        ] {
            assert!(is_own_origin(o, host), "{o} at {host}");
        }
        for (o, host) in [
            // Another local server: another port, another name of the same machine.
            ("http://127.0.0.1:8082", "127.0.0.1:8081"),
            ("http://127.0.0.1", "127.0.0.1:8081"),
            ("http://localhost:8081", "127.0.0.1:8081"),
            ("http://localhost:3000", "localhost:8081"),
            // Not the admin's scheme (it has no TLS).
            ("https://127.0.0.1:8081", "127.0.0.1:8081"),
            ("https://evil.example", "127.0.0.1:8081"),
            ("http://127.0.0.1:8081.evil.example", "127.0.0.1:8081"),
            ("http://127.0.0.1:8081/", "127.0.0.1:8081"),
            ("null", "127.0.0.1:8081"),
            ("", "127.0.0.1:8081"),
            ("file://", "127.0.0.1:8081"),
            ("chrome-extension://abc", "127.0.0.1:8081"),
        ] {
            assert!(!is_own_origin(o, host), "{o} at {host}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.parse().unwrap(), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn refusal_needs_a_loopback_host_and_no_foreign_origin() {
        assert_eq!(refusal(&headers(&[("host", "127.0.0.1:8081")])), None);
        assert_eq!(
            refusal(&headers(&[
                ("host", "localhost:8081"),
                ("origin", "http://localhost:8081")
            ])),
            None
        );
        assert!(refusal(&headers(&[])).is_some());
        assert!(refusal(&headers(&[("host", "evil.example")])).is_some());
        assert!(refusal(&headers(&[("host", "127.0.0.1:8081"), ("host", "evil.example")])).is_some());
        assert!(refusal(&headers(&[("host", "127.0.0.1:8081"), ("host", "127.0.0.1:8081")])).is_some());
        assert!(refusal(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("origin", "https://evil.example")
        ]))
        .is_some());
        assert!(refusal(&headers(&[("host", "127.0.0.1:8081"), ("origin", "null")])).is_some());
        // A page of another local server is another origin.
        assert!(refusal(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("origin", "http://127.0.0.1:8082")
        ]))
        .is_some());
        assert!(refusal(&headers(&[
            ("host", "localhost:8081"),
            ("origin", "https://localhost:8081")
        ]))
        .is_some());
    }

    #[test]
    fn refusal_takes_fetch_metadata_from_the_listeners_own_pages_or_none() {
        for site in ["same-origin", "none"] {
            assert_eq!(
                refusal(&headers(&[("host", "127.0.0.1:8081"), ("sec-fetch-site", site)])),
                None,
                "{site}"
            );
        }
        for site in ["same-site", "cross-site", "", "Same-Origin"] {
            assert!(
                refusal(&headers(&[("host", "127.0.0.1:8081"), ("sec-fetch-site", site)])).is_some(),
                "{site}"
            );
        }
        assert!(refusal(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("sec-fetch-site", "none"),
            ("sec-fetch-site", "cross-site")
        ]))
        .is_some());
    }

    #[test]
    fn refusal_turns_away_what_came_through_a_proxy() {
        for h in PROXY_HEADERS {
            let mut map = headers(&[("host", "127.0.0.1:8081")]);
            map.append(h.parse().unwrap(), HeaderValue::from_static("203.0.113.9"));
            let reason = refusal(&map).unwrap_or_else(|| panic!("{h} let through"));
            assert!(reason.contains("proxy"), "{h}: {reason}");
        }
    }
}
