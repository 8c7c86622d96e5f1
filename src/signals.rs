//! Process signals: SIGTERM and SIGINT stop the node gracefully; a second one during the stop
//! ends the process at once.
//!
//! The handlers are installed when [`shutdown_signal`] is called, not when its future is first
//! polled: from then on neither signal takes its default action (the process ended by the
//! signal), while the node starts as while it serves.

use std::future::Future;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// A signal that asks the node to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }

    /// The exit code of a stop cut short by this signal coming a second time: 128 + its number,
    /// as a shell reports a process the signal ended (143 for SIGTERM, 130 for SIGINT).
    pub fn forced_exit_code(self) -> i32 {
        128 + match self {
            StopSignal::Term => libc::SIGTERM,
            StopSignal::Int => libc::SIGINT,
        }
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The SIGTERM and SIGINT handlers, in place.
pub struct StopSignals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl StopSignals {
    /// Installs both handlers now (inside a tokio runtime). One that cannot be installed is
    /// logged, and that signal keeps its default action.
    pub fn install() -> StopSignals {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for {name}: {e}");
                None
            }
        };
        StopSignals {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT (never, without a handler for either).
    pub async fn recv(&mut self) -> StopSignal {
        async fn next(s: &mut Option<Signal>) {
            if let Some(s) = s {
                if s.recv().await.is_some() {
                    return;
                }
            }
            std::future::pending().await
        }
        tokio::select! {
            _ = next(&mut self.term) => StopSignal::Term,
            _ = next(&mut self.int) => StopSignal::Int,
        }
    }
}

/// Installs the handlers now and returns the future of the first SIGTERM or SIGINT (which one
/// it was). Once it has come, a second one ends the process at once, with a line in the log and
/// the second signal's [`StopSignal::forced_exit_code`]: the operator's second Ctrl-C. Must be
/// called inside a tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = StopSignal> {
    let mut signals = StopSignals::install();
    async move {
        let first = signals.recv().await;
        tokio::spawn(async move {
            let second = signals.recv().await;
            let code = second.forced_exit_code();
            tracing::warn!("second {second} received during the stop: exiting now ({code}), the stop unfinished");
            std::process::exit(code);
        });
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_exit_reports_the_signal_as_a_shell_does() {
        assert_eq!(StopSignal::Term.forced_exit_code(), 143);
        assert_eq!(StopSignal::Int.forced_exit_code(), 130);
        assert_eq!(StopSignal::Term.to_string(), "SIGTERM");
    }
}
