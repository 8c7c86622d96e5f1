//! The operator's status page: `GET /` on the admin listener.
//!
//! One self-contained HTML file (inline CSS and vanilla JS, no external assets) compiled into
//! the binary. Loading it needs no token: it holds no data. Its script polls `/cluster` every
//! 2 s with the bearer token from `#token=...` or the form it shows on a 401, so the data stays
//! behind the admin token like every other route.

use actix_web::HttpResponse;

const PAGE: &str = include_str!("status_page.html");

/// What the page may do: run its own inline script and style, fetch from this listener only.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(PAGE)
}
