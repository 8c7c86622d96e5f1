//! Push registrations and the push windows nodes share.

use super::*;

pub async fn device_registrations(b: Arc<dyn Backend>) {
    let s = b.open().await;
    let a = new_conn(&s).await;
    let other = new_conn(&s).await;
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    let d1 = Device {
        service: PushService::Fcm,
        token: "token-1".into(),
        platform: Some("android".into()),
        updated_at_ms: T0,
    };
    s.set_device(&a, Some(&d1)).await.unwrap();
    assert_eq!(s.device_of(&a).await.unwrap(), Some(d1.clone()));
    assert_eq!(
        s.device_of(&other).await.unwrap(),
        None,
        "a registration is per connection"
    );
    // Replaced, not added.
    let d2 = Device {
        service: PushService::Apns,
        token: "token-2".into(),
        platform: None,
        updated_at_ms: T0 + 1,
    };
    s.set_device(&a, Some(&d2)).await.unwrap();
    assert_eq!(s.device_of(&a).await.unwrap(), Some(d2.clone()));
    // A dead token reported late does not remove a newer registration.
    assert!(!s.forget_device_token(&a, "token-1").await.unwrap());
    assert_eq!(s.device_of(&a).await.unwrap(), Some(d2.clone()));
    assert!(s.forget_device_token(&a, "token-2").await.unwrap());
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    assert!(!s.forget_device_token(&a, "token-2").await.unwrap());
    // Unregister.
    s.set_device(&a, Some(&d1)).await.unwrap();
    s.set_device(&a, None).await.unwrap();
    assert_eq!(s.device_of(&a).await.unwrap(), None);
    s.set_device(&a, None).await.unwrap();
    // No registration without a connection.
    let ghost = new_id();
    assert!(matches!(
        s.set_device(&ghost, Some(&d1)).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.device_of(&ghost).await.unwrap(), None);
    // Rewriting the connection (a protocol update) keeps its registration; it is durable.
    s.set_device(&other, Some(&d1)).await.unwrap();
    s.put_connection(&conn(&other)).await.unwrap();
    drop(s);
    let s = b.open().await;
    assert_eq!(s.device_of(&other).await.unwrap(), Some(d1));
    assert_eq!(s.device_of("bad\0id").await.unwrap(), None);
}

pub async fn push_windows_are_shared(b: Arc<dyn Backend>) {
    let n1 = b.open().await;
    let n2 = b.open().await;
    let c = new_id();
    // A burst from two nodes at once: one push now, every other event folded into one trailing push.
    let mut tasks = Vec::new();
    for i in 0..16i64 {
        let s = if i % 2 == 0 { n1.clone() } else { n2.clone() };
        let c = c.clone();
        tasks.push(tokio::spawn(
            async move { s.push_event(&c, T0 + i, 1000).await.unwrap() },
        ));
    }
    let mut now = 0;
    let mut dues = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            PushSlot::Now => now += 1,
            PushSlot::Trailing { due_ms } => {
                dues.insert(due_ms);
            }
        }
    }
    assert_eq!(now, 1, "one push now across nodes");
    assert_eq!(dues.len(), 1, "one trailing push: {dues:?}");
    let due = *dues.iter().next().unwrap();
    assert!((T0 + 1000..T0 + 1016).contains(&due));
    assert!(n1.push_take_due(due - 1, 0, 100).await.unwrap().is_empty());
    // Due: taken by exactly one of the nodes polling at once.
    let (a, b2) = tokio::join!(n1.push_take_due(due, 0, 100), n2.push_take_due(due, 0, 100));
    let mut taken = a.unwrap();
    taken.extend(b2.unwrap());
    assert_eq!(taken, vec![c.clone()]);
    assert!(n1.push_take_due(due + 10, 0, 100).await.unwrap().is_empty());
    // The trailing push restarted the window.
    assert_eq!(
        n2.push_event(&c, due + 1, 1000).await.unwrap(),
        PushSlot::Trailing { due_ms: due + 1000 }
    );
    // An event after the window pushes now; the trailing push not yet taken is that push.
    assert_eq!(n1.push_event(&c, due + 5000, 1000).await.unwrap(), PushSlot::Now);
    assert!(n1.push_take_due(due + 6000, 0, 100).await.unwrap().is_empty());
    // No window: every event pushes.
    let d = new_id();
    assert_eq!(n1.push_event(&d, T0, 0).await.unwrap(), PushSlot::Now);
    assert_eq!(n2.push_event(&d, T0, 0).await.unwrap(), PushSlot::Now);
}
