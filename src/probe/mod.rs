//! `mailroom probe <invitation URL>`: the checks an operator runs against any DIDComm v1
//! mediator (mailroom, Credo's, ACA-Py's), from its out-of-band invitation alone.
//!
//! Owns the runner and the report: which checks run in which order, one line per check
//! (`PASS name`, `FAIL name: reason`, `SKIP name: reason`) and the closing
//! `N passed, M failed, K skipped` line. The checks live one family per file; they talk to the
//! mediator only as a wallet and a sender would, through [`crate::client`] (no admin API, no
//! store, nothing mailroom-specific), so a result means the same for every mediator.
//!
//! Every check uses wallets of its own (fresh connection, fresh keys, fresh messages), so
//! one check's leftovers cannot decide another's result, and every wait is bounded.
//! Must not touch the store, the node or anything server-side.

mod isolation;
mod keylist;
mod live;
mod malformed;
mod onboarding;
mod pickup;
mod replay;
mod target;
mod tidy;
pub(crate) mod wallet;
#[cfg(test)]
mod ws_stub;

pub use target::{Target, TargetError};

use std::future::Future;
use std::time::{Duration, Instant};

/// Exit code for a bad invitation URL or bad arguments (as for a bad config).
pub const EXIT_USAGE: u8 = 64;

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The invitation URL (`?oob=` / `?c_i=`), or a URL that serves one as JSON.
    pub url: String,
    /// A WebSocket endpoint to use when neither the invitation nor the mediator's DID names one.
    pub ws: Option<String>,
    /// Longest wait for one reply or one delivery.
    pub timeout: Duration,
    /// Longest wait for an unacknowledged delivery to be offered again (the mediator's lease).
    pub redelivery_wait: Duration,
    /// Size of the oversized body (`malformed-huge`).
    pub huge_bytes: usize,
    /// Run only the checks whose names start with one of these (all when empty).
    pub only: Vec<String>,
}

impl Options {
    pub fn new(url: &str) -> Options {
        Options {
            url: url.to_string(),
            ws: None,
            timeout: Duration::from_secs(10),
            redelivery_wait: Duration::from_secs(40),
            huge_bytes: 8 << 20,
            only: Vec::new(),
        }
    }
}

/// The verdict of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed; the note says what the mediator did when that is worth knowing.
    Pass(Option<String>),
    Fail(String),
    /// Not run: the mediator does not offer the feature (or an earlier step failed).
    Skip(String),
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub name: &'static str,
    pub verdict: Verdict,
    pub elapsed: Duration,
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.verdict {
            Verdict::Pass(None) => write!(f, "PASS {}", self.name),
            Verdict::Pass(Some(n)) => write!(f, "PASS {}: {n}", self.name),
            Verdict::Fail(r) => write!(f, "FAIL {}: {r}", self.name),
            Verdict::Skip(r) => write!(f, "SKIP {}: {r}", self.name),
        }
    }
}

/// Every check's result, in the order they ran.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub results: Vec<CheckResult>,
    /// Why no wallet could onboard (no handshake worked, or mediation failed): nothing past
    /// onboarding was checked, so the run fails even when every line is a SKIP.
    pub no_wallet: Option<String>,
    /// What the run left on the mediator after tidying (one line; None when nothing was made).
    pub leftovers: Option<String>,
}

impl Report {
    pub fn count(&self) -> (usize, usize, usize) {
        let mut n = (0, 0, 0);
        for r in &self.results {
            match r.verdict {
                Verdict::Pass(_) => n.0 += 1,
                Verdict::Fail(_) => n.1 += 1,
                Verdict::Skip(_) => n.2 += 1,
            }
        }
        n
    }

    pub fn summary(&self) -> String {
        let (p, f, s) = self.count();
        format!("{p} passed, {f} failed, {s} skipped")
    }

    /// A FAIL, or nothing checked because no wallet could onboard (an operator must not read
    /// a run that verified nothing as a success).
    pub fn failed(&self) -> bool {
        self.count().1 > 0 || self.no_wallet.is_some()
    }

    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.results.iter().find(|r| r.name == name)
    }
}

/// Collects results, prints each line as it comes (when asked to), bounds each check.
pub(crate) struct Runner {
    report: Report,
    only: Vec<String>,
    print: bool,
    /// Upper bound for one check (generous: a check makes several round trips and waits).
    limit: Duration,
}

impl Runner {
    fn wanted(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Every reason and note is kept to one line: they may quote a mediator's reply (an HTML
    /// error page, a problem report's text), and the report is read line by line.
    fn record(&mut self, name: &'static str, verdict: Verdict, elapsed: Duration) {
        let verdict = match verdict {
            Verdict::Pass(note) => Verdict::Pass(note.map(|n| one_line(&n))),
            Verdict::Fail(r) => Verdict::Fail(one_line(&r)),
            Verdict::Skip(r) => Verdict::Skip(one_line(&r)),
        };
        let r = CheckResult { name, verdict, elapsed };
        if self.print {
            println!("{r}");
        }
        self.report.results.push(r);
    }

    /// Runs one check (unless filtered out) within the runner's bound; an `Err` is a FAIL.
    pub(crate) async fn check<F>(&mut self, name: &'static str, f: F) -> Option<Verdict>
    where
        F: Future<Output = anyhow::Result<Verdict>>,
    {
        if !self.wanted(name) {
            return None;
        }
        let start = Instant::now();
        let verdict = match tokio::time::timeout(self.limit, f).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => Verdict::Fail(format!("{e:#}")),
            Err(_) => Verdict::Fail(format!("no result within {:?}", self.limit)),
        };
        self.record(name, verdict.clone(), start.elapsed());
        Some(verdict)
    }

    /// Records a check that cannot run.
    pub(crate) fn skip(&mut self, name: &'static str, reason: &str) {
        if self.wanted(name) {
            self.record(name, Verdict::Skip(reason.to_string()), Duration::ZERO);
        }
    }

    /// Records a check that an earlier failure blocks (a wallet that could not onboard).
    pub(crate) fn fail(&mut self, name: &'static str, reason: &str) {
        if self.wanted(name) {
            self.record(name, Verdict::Fail(reason.to_string()), Duration::ZERO);
        }
    }
}

const BLOCKED: &str = "blocked: a fresh wallet could not onboard";

/// The reason of a check that a fresh wallet failing to onboard blocks. Once a handshake has
/// worked the mediator is reachable and speaks the protocols, so a wallet that cannot
/// connect, get mediation or register its key is the mediator failing: a FAIL, not a SKIP.
pub(crate) fn blocked(e: &anyhow::Error) -> String {
    format!("{BLOCKED}: {e:#}")
}

/// Whether `v` is a FAIL because a wallet could not onboard: it says nothing of the feature
/// its check is about, so later checks must not read it as "the mediator lacks it".
pub(crate) fn is_blocked(v: &Verdict) -> bool {
    matches!(v, Verdict::Fail(r) if r.starts_with(BLOCKED))
}

/// A fresh wallet for a check; when it cannot onboard, the check FAILs as [`blocked`].
pub(crate) async fn fresh_wallet(t: &Target) -> anyhow::Result<wallet::Wallet> {
    wallet::Wallet::onboard(t)
        .await
        .map_err(|e| anyhow::anyhow!(blocked(&e)))
}

/// Keeps a reason on one line and of a readable length.
pub(crate) fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 300 {
        format!("{}...", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}

pub(crate) fn pass() -> anyhow::Result<Verdict> {
    Ok(Verdict::Pass(None))
}

pub(crate) fn pass_note(note: impl Into<String>) -> anyhow::Result<Verdict> {
    Ok(Verdict::Pass(Some(note.into())))
}

pub(crate) fn fail(reason: impl Into<String>) -> anyhow::Result<Verdict> {
    Ok(Verdict::Fail(reason.into()))
}

pub(crate) fn skip(reason: impl Into<String>) -> anyhow::Result<Verdict> {
    Ok(Verdict::Skip(reason.into()))
}

/// Reads the invitation (its failure is the operator's, exit 64, unless the mediator could not
/// serve it: [`TargetError::is_usage`]).
pub async fn resolve_target(opts: &Options) -> Result<Target, TargetError> {
    Target::from_url(&opts.url, opts.ws.as_deref(), opts.timeout).await
}

/// Runs every check against `target`; prints each line as it completes when `print`.
/// Does not print the summary line (the caller does, after the last check).
pub async fn run(target: &mut Target, opts: &Options, print: bool) -> Report {
    let mut r = Runner {
        report: Report::default(),
        only: opts.only.clone(),
        print,
        // A hang guard, not a verdict: the longest check (a fresh wallet's onboarding, two
        // forwards, the deliveries, the ack, then the wait for a redelivery) makes about ten
        // requests of up to a timeout each beside its wait.
        limit: opts.redelivery_wait + opts.timeout * 12,
    };
    match onboarding::run(&mut r, target).await {
        Ok(()) => {
            keylist::run(&mut r, target).await;
            pickup::run(&mut r, target, opts).await;
            live::run(&mut r, target, opts).await;
            isolation::run(&mut r, target, opts).await;
            replay::run(&mut r, target).await;
            malformed::run(&mut r, target, opts).await;
            r.report.leftovers = Some(tidy::tidy(target).await);
        }
        Err(no) => {
            for name in DEPENDENT_CHECKS {
                if no.connected {
                    // The mediator answered a handshake, then refused mediation.
                    r.fail(name, &format!("blocked: no wallet could onboard: {}", no.why));
                } else {
                    r.skip(name, &format!("not run: no wallet could onboard: {}", no.why));
                }
            }
            r.report.no_wallet = Some(no.why);
            if no.connected {
                r.report.leftovers = Some(tidy::tidy(target).await);
            }
        }
    }
    r.report
}

/// The report of a run whose mediator did not serve its invitation (down, or a 5xx): one FAIL
/// line, as a report (scripts/probe-peers.sh) reads it, not a usage error.
fn unreachable(e: &TargetError) -> Report {
    Report {
        results: vec![CheckResult {
            name: "invitation",
            verdict: Verdict::Fail(one_line(&e.to_string())),
            elapsed: Duration::ZERO,
        }],
        no_wallet: None,
        leftovers: None,
    }
}

/// Every check after onboarding, in order (for the report when onboarding fails).
const DEPENDENT_CHECKS: &[&str] = &[
    "keylist-update",
    "keylist-query",
    "forward",
    "pickup-2.0-status",
    "pickup-2.0-delivery",
    "pickup-2.0-messages-received",
    "pickup-1.0-batch",
    "redelivery",
    "live-mode-ws",
    "redelivery-session-end",
    "live-mode-ack",
    "implicit-ws",
    "isolation-read",
    "isolation-ack",
    "isolation-forward",
    "key-takeover",
    "replay",
    "malformed-garbage",
    "malformed-truncated",
    "malformed-wrong-key",
    "malformed-unknown-type",
    "malformed-huge",
];

/// `mailroom probe`: resolve, run, print, map to an exit code (0 no FAIL, 1 a FAIL or no wallet
/// could onboard, 64 usage).
pub async fn main(opts: Options) -> u8 {
    let mut target = match resolve_target(&opts).await {
        Ok(t) => t,
        Err(e) if e.is_usage() => {
            eprintln!("mailroom probe: {e}");
            return EXIT_USAGE;
        }
        Err(e) => {
            let report = unreachable(&e);
            println!("{}", report.results[0]);
            println!("{}", report.summary());
            return u8::from(report.failed());
        }
    };
    println!("probing {} ({})", target.describe(), target.http);
    let report = run(&mut target, &opts, true).await;
    if let Some(why) = &report.no_wallet {
        println!(
            "no wallet could onboard, nothing past onboarding was checked: {}",
            one_line(why)
        );
    }
    if let Some(left) = &report.leftovers {
        println!("{left}");
    }
    println!("{}", report.summary());
    u8::from(report.failed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recorded_reason_is_one_line() {
        let mut r = Runner {
            report: Report::default(),
            only: Vec::new(),
            print: false,
            limit: Duration::from_secs(1),
        };
        let page = "HTTP 502: <html>\n<head><title>502 Bad Gateway</title></head>\r\n<body>\n</body>\n</html>";
        r.record("forward", Verdict::Fail(page.into()), Duration::ZERO);
        r.record(
            "keylist-query",
            Verdict::Skip(format!("refused: {page}")),
            Duration::ZERO,
        );
        r.record(
            "mediation",
            Verdict::Pass(Some(format!("noted: {page}"))),
            Duration::ZERO,
        );
        for c in &r.report.results {
            let line = c.to_string();
            assert_eq!(line.lines().count(), 1, "{line:?}");
        }
    }

    #[test]
    fn a_run_in_which_no_wallet_onboarded_failed_even_with_no_fail_line() {
        let report = Report {
            results: vec![CheckResult {
                name: "forward",
                verdict: Verdict::Skip("not run: no wallet could onboard".into()),
                elapsed: Duration::ZERO,
            }],
            no_wallet: Some("no handshake worked".into()),
            leftovers: None,
        };
        assert_eq!(report.count(), (0, 0, 1));
        assert!(report.failed());
    }
}
