//! The book: every forward sent, and what became of it.

use crate::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Live,
    Polling,
    Offline,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Live => "live (WebSocket, live mode)",
            Kind::Polling => "polling (pickup 2.0 over HTTP)",
            Kind::Offline => "offline-then-back",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Answer {
    Pending,
    Status(u16),
    Error(String),
}

pub(crate) struct Sent {
    pub(crate) wallet: usize,
    pub(crate) probe: bool,
    /// Which fault was on (or healing) when it was sent.
    pub(crate) fault: Option<usize>,
    pub(crate) at: Instant,
    pub(crate) answer: Answer,
    pub(crate) answered_at: Option<Instant>,
    pub(crate) first_delivery: Option<Instant>,
    pub(crate) deliveries: u32,
}

#[derive(Default)]
pub(crate) struct Book {
    pub(crate) sent: Vec<Sent>,
    pub(crate) misdelivered: u64,
    pub(crate) undecryptable: u64,
    pub(crate) in_flight: usize,
    pub(crate) current_fault: Option<usize>,
}

pub(crate) type Shared = Rc<RefCell<Book>>;

pub(crate) const PREFIX: &str = "chaos-";

pub(crate) fn record_delivery(book: &Shared, wallet: usize, content: &str) {
    let Some(i) = content.strip_prefix(PREFIX).and_then(|s| s.parse::<usize>().ok()) else {
        return;
    };
    let now = Instant::now();
    let mut b = book.borrow_mut();
    let Some(s) = b.sent.get_mut(i) else {
        b.misdelivered += 1;
        return;
    };
    if s.wallet != wallet {
        b.misdelivered += 1;
        return;
    }
    s.deliveries += 1;
    if s.first_delivery.is_none() {
        s.first_delivery = Some(now);
    }
}
