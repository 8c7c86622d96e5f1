//! tracing setup: a human format by default, JSON by `[log] format = "json"`; `RUST_LOG`
//! overrides `[log] level`.

use crate::config::LogSection;
use tracing_subscriber::EnvFilter;

/// Targets logged at most at `info`, whatever `RUST_LOG` or `[log] level` asks: their debug
/// and trace lines hold credentials. awc logs each request it sends whole at trace (the FCM
/// access token and the APNs provider token in `authorization`, the APNs device token in the
/// path), and h2 its frames at debug and trace. A level set for one of them is replaced.
pub const CAPPED_AT_INFO: [&str; 3] = ["awc", "actix_http::client", "h2"];

/// `filter` with [`CAPPED_AT_INFO`] applied: no credential of a push provider reaches the
/// logs through the HTTP client, at any level.
pub fn capped(filter: EnvFilter) -> EnvFilter {
    CAPPED_AT_INFO
        .iter()
        .fold(filter, |f, target| match format!("{target}=info").parse() {
            Ok(d) => f.add_directive(d),
            Err(_) => f,
        })
}

pub fn init(cfg: &LogSection) {
    // Validation refused a level that does not parse ([`LogSection::filter`]); a config built
    // in code that skipped it logs at `info` rather than errors only.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        cfg.filter().unwrap_or_else(|e| {
            eprintln!("mailroom: {e}; logging at info");
            EnvFilter::new("info")
        })
    });
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(capped(filter))
        .with_target(false)
        .with_ansi(ansi);
    let res = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests starting several nodes) keeps the first subscriber.
    let _ = res;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// At `trace`, and with awc asked for by name, the HTTP client's request lines (which
    /// carry the providers' tokens) are not logged; its info lines and everything else are.
    #[test]
    fn the_http_client_is_never_logged_below_info() {
        for level in ["trace", "trace,awc=trace,h2=trace"] {
            let buf = Buf::default();
            let out = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(capped(EnvFilter::new(level)))
                .with_writer(move || out.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::trace!(target: "awc::client::h2proto", "authorization: Bearer secret-1");
                tracing::debug!(target: "h2::codec::framed_write", "path /3/device/secret-2");
                tracing::trace!(target: "actix_http::client::pool", "secret-3");
                tracing::info!(target: "awc::client", "kept-info");
                tracing::trace!(target: "mailroom::push", "kept-trace");
            });
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            assert!(!text.contains("secret"), "{level}: {text}");
            assert!(
                text.contains("kept-info") && text.contains("kept-trace"),
                "{level}: {text}"
            );
        }
    }
}
