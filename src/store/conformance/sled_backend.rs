//! The suite on sled, in a temporary directory, and sled's own checks: an enqueue is on disk when
//! it returns (a crashing child process), a panic on the live thread, ingest's dedup records, one
//! store per path.

use super::*;

pub struct SledBackend {
    pub dir: tempfile::TempDir,
}

#[async_trait::async_trait]
impl Backend for SledBackend {
    async fn open(&self) -> Arc<dyn Store> {
        open_sled(self.dir.path()).await.expect("open sled store")
    }
}

const CRASH_DIR: &str = "MAILROOM_STORE_CRASH_DIR";
const CRASH_TEST: &str = "store::conformance::sled_backend::enqueue_is_durable_when_it_returns";

/// `enqueue` must not answer before its messages are on disk. A child process (this same
/// test binary, re-run on this test with `MAILROOM_STORE_CRASH_DIR` set) enqueues from 16
/// tasks, prints each id it got back, and exits abruptly mid-stream (no destructor, no
/// final flush, sled's periodic flush disabled). The parent reopens the directory: every
/// printed id must be there.
#[test]
fn enqueue_is_durable_when_it_returns() {
    match std::env::var(CRASH_DIR) {
        Ok(dir) => crash_child(std::path::Path::new(&dir)),
        Err(_) => crash_parent(),
    }
}

/// The crash children's runtime.
fn child_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs this test binary again on `test` alone with `env` naming a new directory: the
/// directory, the whole lines the child printed (it dies mid-write, so its last line may be
/// cut short: dropped) and its stderr.
fn run_crash_child(test: &str, env: &str) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, dir.path())
        .output()
        .expect("run crash child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let whole = match stdout.rfind('\n') {
        Some(i) => stdout[..i].to_owned(),
        None => String::new(),
    };
    (dir, whole, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn crash_child(dir: &std::path::Path) {
    child_runtime().block_on(async {
        let s = Arc::new(SledStore::open_without_background_flush(dir).await.unwrap());
        let c = "crash-conn".to_string();
        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for t in 0..16 {
            let (s, c, acked) = (s.clone(), c.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let m = msg(&c, &format!("{t}-{i}"), T0);
                    let r = s.enqueue(vec![m], &EnqueueLimits::UNLIMITED).await.unwrap();
                    let id = r[0].as_ref().unwrap().id;
                    println!("ENQ {id}");
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        while acked.load(std::sync::atomic::Ordering::SeqCst) < 2000 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Crash: other enqueues are in flight.
        std::process::exit(0);
    });
}

fn crash_parent() {
    let (dir, whole, stderr) = run_crash_child(CRASH_TEST, CRASH_DIR);
    let acked: Vec<MessageId> = whole
        .lines()
        .filter_map(|l| l.strip_prefix("ENQ "))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    assert!(
        // The child stops at 2000; a last line cut short is not counted.
        acked.len() >= 1000,
        "child acknowledged {} messages; stderr: {}",
        acked.len(),
        stderr
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = open_sled(dir.path()).await.unwrap();
        let got = s.lease("crash-conn", 1_000_000, "o", T0, T0 + 1).await.unwrap();
        let have: HashSet<MessageId> = ids(&got).into_iter().collect();
        let lost: Vec<_> = acked.iter().filter(|id| !have.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged messages lost: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        println!(
            "crash test: {} acknowledged, {} on disk after the crash",
            acked.len(),
            have.len()
        );
    });
}

const ACK_CRASH_DIR: &str = "MAILROOM_STORE_ACK_CRASH_DIR";
const ACK_CRASH_TEST: &str =
    "store::conformance::sled_backend::an_acknowledgement_and_its_dedup_record_survive_a_crash_together";

/// An acknowledgement that returned survives the process (its removal is in the kernel when
/// it returns, not waiting for a sync) together with the dedup record it keeps: after a crash
/// the message is not delivered again, and a copy sent again inside the window is still a
/// duplicate. A child process (this test, re-run with `MAILROOM_STORE_ACK_CRASH_DIR`) enqueues
/// messages with dedup keys, then leases and acknowledges them one at a time from 8 tasks,
/// prints each acknowledged id, and exits abruptly mid-stream.
#[test]
fn an_acknowledgement_and_its_dedup_record_survive_a_crash_together() {
    const N: u32 = 3000;
    let lim = EnqueueLimits {
        dedup_window_ms: 3_600_000,
        ..EnqueueLimits::UNLIMITED
    };
    let key = |i: u32| {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        k
    };
    let m = |i: u32| NewMessage {
        dedup_key: Some(key(i)),
        ..msg("ack-conn", &format!("m{i}"), T0)
    };
    if let Ok(dir) = std::env::var(ACK_CRASH_DIR) {
        child_runtime().block_on(async {
            let s = Arc::new(
                SledStore::open_without_background_flush(std::path::Path::new(&dir))
                    .await
                    .unwrap(),
            );
            let r = s.enqueue((0..N).map(m).collect(), &lim).await.unwrap();
            assert!(r.iter().all(|r| r.is_ok()));
            println!("QUEUED");
            let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for t in 0..8 {
                let (s, acked) = (s.clone(), acked.clone());
                tokio::spawn(async move {
                    loop {
                        let owner = format!("t{t}");
                        let got = s.lease("ack-conn", 1, &owner, T0, T0 + 60_000).await.unwrap();
                        let Some(q) = got.first() else { break };
                        assert_eq!(s.ack_leased("ack-conn", &[q.id]).await.unwrap().len(), 1);
                        println!("ACK {} {}", q.id, String::from_utf8_lossy(&q.payload));
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
            while acked.load(std::sync::atomic::Ordering::SeqCst) < N as usize / 2 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            // Crash: other acknowledgements are in flight.
            std::process::exit(0);
        });
        return;
    }
    let (dir, whole, stderr) = run_crash_child(ACK_CRASH_TEST, ACK_CRASH_DIR);
    assert!(whole.contains("QUEUED"), "child did not queue; stderr: {stderr}");
    // (id, index of the message) of every acknowledgement that returned.
    let acked: Vec<(MessageId, u32)> = whole
        .lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .filter_map(|l| {
            let (id, p) = l.split_once(' ')?;
            Some((id.parse().ok()?, p.strip_prefix('m')?.parse().ok()?))
        })
        .collect();
    assert!(acked.len() >= N as usize / 2, "child acknowledged {}", acked.len());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = open_sled(dir.path()).await.unwrap();
        let left: HashSet<MessageId> = ids(&s.lease("ack-conn", N as usize, "o", T0, T0 + 1).await.unwrap())
            .into_iter()
            .collect();
        let back: Vec<_> = acked.iter().filter(|(id, _)| left.contains(id)).collect();
        assert!(
            back.is_empty(),
            "{} acknowledged messages came back: {:?}",
            back.len(),
            &back[..back.len().min(5)]
        );
        let again = s
            .enqueue(
                acked
                    .iter()
                    .map(|(_, i)| NewMessage {
                        received_at_ms: T0 + 1,
                        ..m(*i)
                    })
                    .collect(),
                &lim,
            )
            .await
            .unwrap();
        let fresh: Vec<_> = acked
            .iter()
            .zip(&again)
            .filter(|(_, r)| !r.as_ref().unwrap().duplicate)
            .map(|(a, _)| a)
            .collect();
        assert!(
            fresh.is_empty(),
            "{} acknowledged messages lost their dedup record: {:?}",
            fresh.len(),
            &fresh[..fresh.len().min(5)]
        );
        println!(
            "ack crash test: {} acknowledged before the crash, {} still queued after it",
            acked.len(),
            left.len()
        );
    });
}

/// A lease or acknowledgement that panics on the live path's thread fails alone: its caller
/// gets an error, the thread goes on, and the next lease and acknowledgement are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_live_thread_fails_only_its_call() {
    let s = SledStore::temporary().await.unwrap();
    s.enqueue(vec![msg("c", "a", T0)], &EnqueueLimits::UNLIMITED)
        .await
        .unwrap();
    assert!(matches!(s.live_panic_for_test().await, Err(StoreError::Unavailable(_))));
    let got = s.lease("c", 10, "o", T0, T0 + 1_000).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(s.ack_leased("c", &ids(&got)).await.unwrap().len(), 1);
    assert_eq!(s.total_queued().await.unwrap(), 0);
}

/// Ingest writes one record per forward: a queued message's record holds its dedup key,
/// and the `dedup` tree gets a record only when a message leaves the queue inside its
/// window (acknowledged here); pruning deletes it. Rebuilt from both at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_writes_no_dedup_record() {
    let dir = tempfile::tempdir().unwrap();
    let lim = EnqueueLimits {
        dedup_window_ms: 60_000,
        ..EnqueueLimits::UNLIMITED
    };
    let s = SledStore::open_shared(dir.path()).await.unwrap();
    let batch: Vec<NewMessage> = (0..50u8).map(|i| dmsg("c", "m", T0, i)).collect();
    assert!(s
        .enqueue(batch, &lim)
        .await
        .unwrap()
        .iter()
        .all(|r| !r.as_ref().unwrap().duplicate));
    assert_eq!(s.dedup_tree_len_for_test(), 0, "no record beside the messages");
    assert_eq!(s.dedup_records().await.unwrap(), 50);
    let got = s.lease("c", 10, "o", T0, T0 + 1_000).await.unwrap();
    assert_eq!(s.ack_leased("c", &ids(&got)).await.unwrap().len(), 10);
    assert_eq!(s.dedup_tree_len_for_test(), 10, "the acknowledged keep theirs");
    drop(s);
    let s = SledStore::open_shared(dir.path()).await.unwrap();
    assert_eq!(
        s.dedup_records().await.unwrap(),
        50,
        "40 from messages, 10 from records"
    );
    assert_eq!(s.prune_dedup(T0 + 1, 100).await.unwrap(), 50);
    assert_eq!(s.dedup_tree_len_for_test(), 0);
    // Acknowledged after its entry was pruned: no record comes back.
    let got = s.lease("c", 100, "o", T0, T0 + 1_000).await.unwrap();
    assert_eq!(s.ack_leased("c", &ids(&got)).await.unwrap().len(), 40);
    assert_eq!(s.dedup_tree_len_for_test(), 0);
}

/// Delivery attempts are counted across a restart: the index rebuilt at open takes each queued
/// message's count from the `attempts` tree (an acknowledged message's is gone with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_counts_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open_shared(dir.path()).await.unwrap();
    let batch: Vec<NewMessage> = ["a", "b", "c"].iter().map(|p| msg("c", p, T0)).collect();
    s.enqueue(batch, &EnqueueLimits::UNLIMITED).await.unwrap();
    let got = s.lease("c", 10, "o", T0, T0 + 1_000).await.unwrap();
    assert!(got.iter().all(|m| m.attempts == 1));
    assert_eq!(s.ack_leased("c", &ids(&got[..1])).await.unwrap().len(), 1);
    drop(s);
    let s = SledStore::open_shared(dir.path()).await.unwrap();
    let again = s.lease("c", 10, "o", T0, T0 + 1_000).await.unwrap();
    assert_eq!(ids(&again), ids(&got[1..]));
    assert!(again.iter().all(|m| m.attempts == 2), "{again:?}");
}

/// Compaction must not copy a damaged record into the current segment. A queued message's
/// record in the oldest segment is damaged on the disk while the store runs; most messages
/// are then acknowledged and compaction moves the rest forward. Copied unchecked, the bad
/// record sat in the current segment, and the next open, taking it for a torn append, cut
/// every record after it: forwards answered 202 were lost. The damaged message is lost alone
/// (counted), and every forward queued after the compaction is there after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_damaged_before_compaction_does_not_cost_the_forwards_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let segment_1 = dir.path().join("queue").join(format!("{:016x}.qlog", 1));
    let lim = EnqueueLimits::UNLIMITED;
    let s = SledStore::open_with_segment_bytes(dir.path(), 16 << 10).await.unwrap();
    // 600 messages of ~500 bytes: about 20 segments of 16 KiB; every 20th stays queued.
    let payload = |n: u32| format!("m{n:04}-{}", "x".repeat(490));
    for b in 0..20 {
        let batch = (0..30).map(|i| msg("c", &payload(b * 30 + i), T0)).collect();
        assert!(s.enqueue(batch, &lim).await.unwrap().iter().all(|r| r.is_ok()));
    }
    let got = s.lease("c", 600, "o", T0, T0 + 60_000).await.unwrap();
    assert_eq!(got.len(), 600);
    let (kept, acked): (Vec<&QueuedMessage>, Vec<&QueuedMessage>) = got.iter().partition(|m| {
        m.payload[1..5].iter().all(u8::is_ascii_digit) && {
            let n: u32 = std::str::from_utf8(&m.payload[1..5]).unwrap().parse().unwrap();
            n % 20 == 0
        }
    });
    assert_eq!(kept.len(), 30);
    // A byte of the payload of m0000, kept, in segment 1.
    {
        use std::os::unix::fs::FileExt;
        let bytes = std::fs::read(&segment_1).unwrap();
        let at = bytes
            .windows(6)
            .position(|w| w == b"m0000-")
            .expect("m0000 in segment 1")
            + 10;
        let f = std::fs::OpenOptions::new().write(true).open(&segment_1).unwrap();
        f.write_all_at(&[bytes[at] ^ 0x5a], at as u64).unwrap();
    }
    let acked: Vec<MessageId> = acked.iter().map(|m| m.id).collect();
    assert_eq!(s.ack_leased("c", &acked).await.unwrap().len(), acked.len());
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while segment_1.exists() {
        assert!(Instant::now() < deadline, "segment 1 not compacted away after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let late: Vec<NewMessage> = (0..20).map(|i| msg("c", &format!("late-{i}"), T0)).collect();
    let late = s.enqueue(late, &lim).await.unwrap();
    let late: HashSet<MessageId> = late.iter().map(|r| r.as_ref().unwrap().id).collect();
    // The damaged message leaves the index too: 29 kept and the 20 new ones.
    while s.total_queued().await.unwrap() != 49 {
        assert!(Instant::now() < deadline, "{} queued", s.total_queued().await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = s.queue_log().await.unwrap().unwrap();
    assert_eq!(log.damaged_records, 1, "{log:?}");
    drop(s);
    let s = SledStore::open_with_segment_bytes(dir.path(), 16 << 10).await.unwrap();
    let have: HashSet<MessageId> = ids(&s.lease("c", 100, "o", T0, T0 + 60_000).await.unwrap())
        .into_iter()
        .collect();
    let lost: Vec<&MessageId> = late.iter().filter(|id| !have.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of 20 forwards after the compaction lost",
        lost.len()
    );
    let kept_ids: HashSet<MessageId> = kept.iter().map(|m| m.id).collect();
    assert_eq!(have.len(), 49, "the 29 kept whole and the 20 new ones");
    assert_eq!(have.difference(&late).filter(|id| kept_ids.contains(id)).count(), 29);
}

/// In-process nodes opening one path share one store (sled allows one handle per
/// directory): both see the same data and the same leases; once all are dropped the path
/// opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_path_opened_twice_is_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::join!(open_sled(dir.path()), open_sled(dir.path()));
    let (a, b) = (a.unwrap(), b.unwrap());
    let c = new_conn(&a).await;
    assert!(b.get_connection(&c).await.unwrap().is_some());
    let id = enqueue_ok(&a, vec![msg(&c, "m", T0)]).await;
    assert_eq!(ids(&b.lease(&c, 10, "n2", T0, T0 + 1000).await.unwrap()), id);
    assert!(a.lease(&c, 10, "n1", T0, T0 + 1000).await.unwrap().is_empty());
    drop(a);
    drop(b);
    let again = open_sled(dir.path()).await.unwrap();
    assert_eq!(again.total_queued().await.unwrap(), 1);
}

pub async fn run<F, Fut>(check: F)
where
    F: FnOnce(Arc<dyn Backend>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let b = Arc::new(SledBackend {
        dir: tempfile::tempdir().expect("tempdir"),
    });
    rethrow(run_check(b, check).await);
}
