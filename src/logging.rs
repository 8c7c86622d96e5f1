//! tracing setup: a human format by default, JSON by `[log] format = "json"`; `RUST_LOG`
//! overrides `[log] level`.

use crate::config::LogSection;
use tracing_subscriber::EnvFilter;

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
        .with_env_filter(filter)
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
