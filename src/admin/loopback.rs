//! What an admin listener without a token answers: only requests that name it by a loopback
//! host, and none a web page on another origin sent.
//!
//! Without a token the listener trusts whoever reaches it, which the config allows only on
//! loopback. A browser on the same machine reaches loopback too: a page anywhere can POST to
//! `http://127.0.0.1:8081/drain` (a "no-cors" request still arrives, with the page's `Origin`),
//! or rebind its own name to 127.0.0.1 and read `/connections` (the request then carries the
//! page's name in `Host`). So `Host` must name a loopback address or `localhost`, and an
//! `Origin`, when present, must too; anything else is 403. With a token, none of this applies:
//! the token guards the listener (see `unauthorized`). Owns no state.

use super::AdminState;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HOST, ORIGIN};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Middleware of every admin route: lets a request through when the listener has a token, or
/// when [`refusal`] finds nothing wrong with it; else answers 403.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let tokenless = req
        .app_data::<web::Data<AdminState>>()
        .map(|st| st.reloader.admin_token().is_none())
        .unwrap_or(true);
    if tokenless {
        if let Some(reason) = refusal(req.headers()) {
            tracing::info!(
                peer = %req.peer_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string()),
                path = req.path(),
                "admin request refused: {reason}"
            );
            let res = HttpResponse::Forbidden().json(json!({"error": "forbidden", "reason": reason}));
            return Ok(req.into_response(res).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// Why a tokenless admin listener refuses a request with these headers, if it does.
pub fn refusal(headers: &HeaderMap) -> Option<&'static str> {
    let mut hosts = headers.get_all(HOST).peekable();
    if hosts.peek().is_none() {
        return Some(
            "without an admin token, requests must carry a Host header naming a loopback address or localhost",
        );
    }
    if !hosts.all(|h| h.to_str().is_ok_and(is_loopback_host)) {
        return Some("without an admin token, the Host header must name a loopback address or localhost");
    }
    if !headers
        .get_all(ORIGIN)
        .all(|o| o.to_str().is_ok_and(is_loopback_origin))
    {
        return Some("without an admin token, requests from pages of another origin are refused");
    }
    None
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

/// An `Origin` (`scheme://host[:port]`) whose host is loopback or `localhost`; `null` (sandboxed
/// frames, local files) and anything unparsable is not.
pub fn is_loopback_origin(origin: &str) -> bool {
    let Ok(u) = url::Url::parse(origin) else {
        return false;
    };
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => is_loopback_ip(IpAddr::V6(ip)),
        None => false,
    }
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
    fn loopback_origins() {
        for o in [
            "http://127.0.0.1:8081",
            "http://localhost",
            "https://localhost:3000",
            "http://[::1]:8081",
        ] {
            assert!(is_loopback_origin(o), "{o}");
        }
        for o in [
            "https://evil.example",
            "http://127.0.0.1.nip.io",
            "null",
            "",
            "file://",
            "chrome-extension://abc",
        ] {
            assert!(!is_loopback_origin(o), "{o}");
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
        assert!(refusal(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("origin", "https://evil.example")
        ]))
        .is_some());
        assert!(refusal(&headers(&[("host", "127.0.0.1:8081"), ("origin", "null")])).is_some());
    }
}
