//! The senders: one forward at a time to a wallet of each kind, entered in the book with its
//! answer.

use std::time::{Duration, Instant};

use mailroom::client::{basic_message, post, Sender};

use crate::book::{Answer, Sent, Shared, PREFIX};

pub(crate) struct Targets {
    /// (recipient key, routing keys) per wallet index.
    pub(crate) keys: Vec<(String, Vec<String>)>,
}

/// Sends one forward (to `url`) and books it; returns its index.
pub(crate) fn send_one(
    book: &Shared,
    sender: &Sender,
    targets: &Targets,
    url: String,
    wallet: usize,
    probe: bool,
) -> usize {
    let idx = {
        let mut b = book.borrow_mut();
        let fault = b.current_fault;
        b.sent.push(Sent {
            wallet,
            probe,
            fault,
            at: Instant::now(),
            answer: Answer::Pending,
            answered_at: None,
            first_delivery: None,
            deliveries: 0,
        });
        b.in_flight += 1;
        b.sent.len() - 1
    };
    let (key, routing) = &targets.keys[wallet];
    let env = sender.forward_envelope(&basic_message(&format!("{PREFIX}{idx}")), key, routing);
    let book = book.clone();
    actix_rt::spawn(async move {
        let answer = match env {
            Ok(env) => match post(&url, env, Duration::from_secs(10)).await {
                Ok((s, _)) => Answer::Status(s),
                Err(e) => Answer::Error(format!("{e:#}")),
            },
            Err(e) => Answer::Error(format!("pack: {e:#}")),
        };
        let mut b = book.borrow_mut();
        b.in_flight -= 1;
        let s = &mut b.sent[idx];
        s.answer = answer;
        s.answered_at = Some(Instant::now());
    });
    idx
}

pub(crate) fn accepted(s: &Sent) -> bool {
    matches!(s.answer, Answer::Status(c) if (200..300).contains(&c))
}
