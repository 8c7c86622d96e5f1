//! [`Store::first_sight`]: the records that refuse a replayed message, on every node sharing
//! the store.

use super::*;

fn digest(i: u8) -> [u8; 32] {
    [i; 32]
}

/// A second sight of a message is refused while its record holds; a record that ran out is
/// replaced; forgetting removes only the record named; pruning is bounded and takes only the
/// records that ran out.
pub async fn a_message_is_seen_once_within_its_record(b: Arc<dyn Backend>) {
    let s = b.open().await;
    assert!(s.first_sight(&digest(1), T0, T0 + 1000).await.unwrap());
    assert!(!s.first_sight(&digest(1), T0 + 1, T0 + 1001).await.unwrap(), "a replay");
    assert!(
        !s.first_sight(&digest(1), T0 + 999, T0 + 1999).await.unwrap(),
        "still held"
    );
    assert!(
        s.first_sight(&digest(2), T0, T0 + 1000).await.unwrap(),
        "another message"
    );
    // The record of 1 ran out at T0 + 1000: a sight then is a first one, held until its own end.
    assert!(s.first_sight(&digest(1), T0 + 1000, T0 + 5000).await.unwrap());
    assert!(!s.first_sight(&digest(1), T0 + 4999, T0 + 9999).await.unwrap());

    // Forgetting names the record: a stale `until` leaves the current one.
    s.forget_sight(&digest(1), T0 + 1000).await.unwrap();
    assert!(!s.first_sight(&digest(1), T0 + 2000, T0 + 3000).await.unwrap());
    s.forget_sight(&digest(1), T0 + 5000).await.unwrap();
    assert!(
        s.first_sight(&digest(1), T0 + 2000, T0 + 3000).await.unwrap(),
        "forgotten"
    );

    for i in 10..15u8 {
        assert!(s.first_sight(&digest(i), T0, T0 + 100 + i64::from(i)).await.unwrap());
    }
    // Records 2 (until T0 + 1000) and 10..15 (T0 + 110..115) have run out by T0 + 1000; record 1
    // (T0 + 3000) has not.
    assert_eq!(s.prune_sights(T0 + 1000, 4).await.unwrap(), 4, "bounded per call");
    assert_eq!(s.prune_sights(T0 + 1000, 10).await.unwrap(), 2);
    assert_eq!(s.prune_sights(T0 + 1000, 10).await.unwrap(), 0);
    assert!(
        !s.first_sight(&digest(1), T0 + 2500, T0 + 9000).await.unwrap(),
        "kept by the prune"
    );
    assert!(
        s.first_sight(&digest(12), T0 + 2500, T0 + 9000).await.unwrap(),
        "pruned"
    );
}

/// Records outlive the handle that wrote them (a restarted node still refuses a replay).
pub async fn sights_survive_a_reopen(b: Arc<dyn Backend>) {
    {
        let s = b.open().await;
        assert!(s.first_sight(&digest(7), T0, T0 + 60_000).await.unwrap());
        // A record replaced after it ran out is kept with its new end only.
        assert!(s.first_sight(&digest(8), T0, T0 + 10).await.unwrap());
        assert!(s.first_sight(&digest(8), T0 + 10, T0 + 60_000).await.unwrap());
    }
    let s = b.open().await;
    assert!(!s.first_sight(&digest(7), T0 + 1, T0 + 1000).await.unwrap());
    assert!(!s.first_sight(&digest(8), T0 + 1, T0 + 1000).await.unwrap());
    assert_eq!(
        s.prune_sights(T0 + 59_999, 10).await.unwrap(),
        0,
        "8's replaced record is gone"
    );
    assert!(!s.first_sight(&digest(8), T0 + 59_999, T0 + 70_000).await.unwrap());
    assert_eq!(s.prune_sights(T0 + 60_000, 10).await.unwrap(), 2);
    assert!(s.first_sight(&digest(8), T0 + 60_000, T0 + 70_000).await.unwrap());
}

/// Two nodes sighting one message at once: exactly one is first, every round.
pub async fn concurrent_sights_across_nodes(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    for round in 0..50u8 {
        let d = digest(100 + round);
        let (x, y) = tokio::join!(n1.first_sight(&d, T0, T0 + 1000), n2.first_sight(&d, T0, T0 + 1000));
        assert_eq!(
            [x.unwrap(), y.unwrap()].iter().filter(|f| **f).count(),
            1,
            "round {round}: one first sight"
        );
    }
    // And after the record ran out, one replaces it.
    let d = digest(100);
    let (x, y) = tokio::join!(
        n1.first_sight(&d, T0 + 1000, T0 + 2000),
        n2.first_sight(&d, T0 + 1000, T0 + 2000)
    );
    assert_eq!([x.unwrap(), y.unwrap()].iter().filter(|f| **f).count(), 1);
}
