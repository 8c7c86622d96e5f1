//! tracing setup: a human format by default, JSON by `[log] format = "json"`; `RUST_LOG`
//! overrides `[log] level`.

use crate::config::LogSection;
use tracing_subscriber::EnvFilter;

/// Targets logged at most at `info`, whatever `RUST_LOG` or `[log] level` asks: their debug
/// and trace lines hold credentials. awc logs each request it sends whole at trace (the FCM
/// access token and the APNs provider token in `authorization`, the APNs device token in the
/// path), h2 its frames at debug and trace, and tokio-postgres each statement with its
/// parameters' values at debug (the mediator's key seeds as the identity is first written, a
/// single-use invitation's id, a wallet's device token). A target matches with its submodules.
pub const CAPPED_AT_INFO: [&str; 3] = ["awc", "h2", "tokio_postgres"];

/// Whether a line of `target` at `level` may be logged under [`CAPPED_AT_INFO`].
fn within_cap(target: &str, level: &tracing::Level) -> bool {
    let capped = CAPPED_AT_INFO
        .iter()
        .any(|t| target == *t || target.strip_prefix(t).is_some_and(|rest| rest.starts_with("::")));
    !capped || *level <= tracing::Level::INFO
}

/// A global filter that every line must pass besides the level filter: no directive, however
/// specific (`awc::client::h2proto=trace`, a span's), lets a capped target's debug or trace
/// lines through, and a stricter level an operator sets for one (`awc=warn`) still holds.
pub fn cap() -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::filter_fn(|m| within_cap(m.target(), m.level()))
}

/// `RUST_LOG`'s value as a filter; `None` when blank, which leaves `log.level` in force (a
/// compose file's `RUST_LOG: ${RUST_LOG}` with nothing set is an empty string, and an empty
/// filter logged nothing at all, errors and `mailroom::audit` lines included). A value that
/// does not parse is an error naming it (the binary refuses it at start, exit 64).
pub fn env_filter(value: &str) -> Result<Option<EnvFilter>, String> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    EnvFilter::builder()
        .parse(value)
        .map(Some)
        .map_err(|e| format!("RUST_LOG {value:?} is not a tracing filter: {e}"))
}

pub fn init(cfg: &LogSection) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Validation refused a level or a `RUST_LOG` that does not parse ([`LogSection::filter`],
    // [`env_filter`]); a config built in code that skipped it logs at `info` rather than
    // errors only.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| env_filter(&v).ok().flatten());
    let filter = from_env.unwrap_or_else(|| {
        cfg.filter().unwrap_or_else(|e| {
            eprintln!("mailroom: {e}; logging at info");
            EnvFilter::new("info")
        })
    });
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    let res = if cfg.format == "json" {
        builder.json().finish().with(cap()).try_init()
    } else {
        builder.finish().with(cap()).try_init()
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

    /// What `f` logs through the node's subscriber (filter `level`, then [`cap`]).
    fn logged(level: &str, f: impl FnOnce()) -> String {
        use tracing_subscriber::layer::SubscriberExt;
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(level))
            .with_writer(move || out.clone())
            .finish()
            .with(cap());
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    /// At `trace`, and with awc asked for by name, the HTTP client's request lines (which
    /// carry the providers' tokens) and PostgreSQL's statement parameters are not logged;
    /// their info lines and everything else are.
    #[test]
    fn the_http_client_is_never_logged_below_info() {
        for level in [
            "trace",
            "trace,awc=trace,h2=trace",
            "trace,awc::client=trace,awc::client::h2proto=trace,h2::codec=trace",
            "[request]=trace,trace",
        ] {
            let text = logged(level, || {
                tracing::trace!(target: "awc::client::h2proto", "authorization: Bearer secret-1");
                tracing::debug!(target: "h2::codec::framed_write", "path /3/device/secret-2");
                tracing::trace!(target: "awc::client::h2proto", "secret-3");
                tracing::debug!(target: "tokio_postgres::query", "parameters: [\"secret-4\"]");
                tracing::trace!(target: "awcx", "kept-lookalike");
                tracing::info!(target: "awc::client", "kept-info");
                tracing::trace!(target: "mailroom::push", "kept-trace");
            });
            assert!(!text.contains("secret"), "{level}: {text}");
            assert!(
                text.contains("kept-info") && text.contains("kept-trace") && text.contains("kept-lookalike"),
                "{level}: {text}"
            );
        }
    }

    /// A stricter level an operator sets for a capped target holds: the cap never raises one.
    #[test]
    fn a_stricter_level_for_the_http_client_holds() {
        let text = logged("info,awc=warn", || {
            tracing::info!(target: "awc::client", "dropped-info");
            tracing::warn!(target: "awc::client", "kept-warn");
        });
        assert!(!text.contains("dropped-info") && text.contains("kept-warn"), "{text}");
    }
}
