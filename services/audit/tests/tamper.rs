//! Tampering with the stored log — changing a field, deleting a row, swapping
//! two rows, truncating the tail, rewriting a row together with its leaf hash —
//! is found by Verify with the first bad sequence, and old proofs no longer
//! check against the tampered log. The log and its heads survive a restart, and
//! concurrent writers get one gap-free order.

mod common;

use std::sync::Arc;

use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_audit::merkle;
use bulkhead_audit::store::{self, AuditStore, sqlite::SqliteStore};
use bulkhead_audit::verify::{self, Problem};
use common::{new_event, service};
use tokio_util::sync::CancellationToken;

struct Fixture {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            db: dir.path().join("audit.db"),
            key: dir.path().join("audit-signing.key"),
            _dir: dir,
        }
    }

    async fn open(&self) -> (Log, CancellationToken, SqliteStore) {
        let raw = SqliteStore::open(&self.db).await.expect("store");
        let store: Arc<dyn AuditStore> = Arc::new(raw.clone());
        let signer = Signer::load_or_create(&self.key).expect("key");
        let stop = CancellationToken::new();
        let log = Log::open(store, signer, LogConfig::default(), stop.clone())
            .await
            .expect("log");
        (log, stop, raw)
    }
}

/// 40 events in 4 batches, with a signed head after each batch.
async fn fill(log: &Log) {
    let sv = service("sealed-vault");
    for b in 0..4 {
        let events = (0..10)
            .map(|i| {
                new_event(
                    "sealed.credential.resolved",
                    "acme",
                    &format!("r{b}-{i}"),
                    &[("keys", "API_KEY")],
                )
            })
            .collect();
        log.append(&sv, events).await.expect("append");
        log.checkpoint().await.expect("checkpoint");
    }
    assert_eq!(log.size(), 40);
}

async fn verify_now(log: &Log) -> verify::Report {
    verify::verify(log.store().as_ref(), &log.signer().public(), 0, 0)
        .await
        .expect("verify")
}

#[tokio::test]
async fn an_untouched_log_verifies() {
    let f = Fixture::new();
    let (log, _stop, _) = f.open().await;
    fill(&log).await;
    let r = verify_now(&log).await;
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.checked, 40);
    assert_eq!(r.head.map(|h| h.tree_size), Some(40));
}

#[tokio::test]
async fn a_changed_field_is_found_at_its_sequence_and_old_proofs_fail() {
    let f = Fixture::new();
    let (log, _stop, raw) = f.open().await;
    fill(&log).await;
    let head = log.latest_head().expect("head");
    let proof = log.inclusion_proof(16, 40).expect("proof");
    let leaf17 = *log
        .store()
        .get(17)
        .await
        .expect("get")
        .map(|e| e.leaf_hash)
        .as_ref()
        .expect("row");
    merkle::verify_inclusion(&leaf17, 16, 40, &proof, &head.root).expect("proof verifies before");

    sqlx::query("UPDATE events SET tenant = 'globex' WHERE seq = 17")
        .execute(raw.pool())
        .await
        .expect("tamper");
    let r = verify_now(&log).await;
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(17), Some(Problem::LeafMismatch)),
        "{r:?}"
    );

    // The tampered event's leaf no longer proves inclusion under the signed head.
    let tampered = log.store().get(17).await.expect("get").expect("row");
    assert!(
        merkle::verify_inclusion(&tampered.event.leaf_hash(), 16, 40, &proof, &head.root).is_err()
    );
}

#[tokio::test]
async fn a_rewritten_row_and_leaf_hash_break_the_signed_root() {
    let f = Fixture::new();
    let (log, _stop, raw) = f.open().await;
    fill(&log).await;
    // The attacker changes the attributes and recomputes the stored leaf hash too.
    let mut e = log.store().get(25).await.expect("get").expect("row").event;
    e.attributes.insert("keys".into(), "NOTHING_TO_SEE".into());
    sqlx::query("UPDATE events SET attributes = ?, leaf_hash = ? WHERE seq = 25")
        .bind(serde_json::to_string(&e.attributes).expect("json"))
        .bind(e.leaf_hash().to_vec())
        .execute(raw.pool())
        .await
        .expect("tamper");
    let r = verify_now(&log).await;
    // Heads were signed at 10, 20, 30, 40: the first that fails covers 21..=30.
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(21), Some(Problem::RootMismatch)),
        "{r:?}"
    );

    // A restarted service refuses the rewritten log rather than serve (and
    // sign over) it; and a consistency proof from the honest head at 20 to the
    // signed head at 40 does not verify against the rewritten tree.
    drop(log);
    let raw = SqliteStore::open(&f.db).await.expect("store");
    let store: Arc<dyn AuditStore> = Arc::new(raw);
    let reopened = Log::open(
        store.clone(),
        Signer::load_or_create(&f.key).expect("key"),
        LogConfig::default(),
        CancellationToken::new(),
    )
    .await;
    assert!(
        reopened.is_err(),
        "a log that no longer produces its signed head is not served"
    );
    let mut tree = merkle::Tree::new();
    for (_, h) in store.leaf_hashes(0, 100).await.expect("hashes") {
        tree.push(h);
    }
    let h20 = store.head_at(20).await.expect("head").expect("h20");
    let h40 = store.head_at(40).await.expect("head").expect("h40");
    assert_ne!(tree.root_at(40).expect("root"), h40.root);
    let proof = tree.consistency_proof(20, 40).expect("proof");
    assert!(merkle::verify_consistency(20, 40, &h20.root, &h40.root, &proof).is_err());
}

#[tokio::test]
async fn a_deleted_row_is_a_gap() {
    let f = Fixture::new();
    let (log, _stop, raw) = f.open().await;
    fill(&log).await;
    sqlx::query("DELETE FROM events WHERE seq = 8")
        .execute(raw.pool())
        .await
        .expect("tamper");
    let r = verify_now(&log).await;
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(8), Some(Problem::SequenceGap)),
        "{r:?}"
    );
}

#[tokio::test]
async fn swapped_rows_are_found_at_the_first() {
    let f = Fixture::new();
    let (log, _stop, raw) = f.open().await;
    fill(&log).await;
    // Swap rows 12 and 31 whole, leaf hashes included, keeping the sequence slots.
    let cols = "time_us, type, actor, tenant, run_id, outcome, attributes, leaf_hash";
    let mut tx = raw.pool().begin().await.expect("tx");
    for stmt in [
        format!("CREATE TEMP TABLE s AS SELECT seq, {cols} FROM events WHERE seq IN (12, 31)"),
        format!(
            "UPDATE events SET ({cols}) = (SELECT {cols} FROM s WHERE s.seq = 31) WHERE seq = 12"
        ),
        format!(
            "UPDATE events SET ({cols}) = (SELECT {cols} FROM s WHERE s.seq = 12) WHERE seq = 31"
        ),
    ] {
        sqlx::query(&stmt).execute(&mut *tx).await.expect("swap");
    }
    tx.commit().await.expect("commit");
    let r = verify_now(&log).await;
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(12), Some(Problem::LeafMismatch)),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_truncated_tail_is_found_after_the_last_row() {
    let f = Fixture::new();
    let (log, _stop, raw) = f.open().await;
    fill(&log).await;
    sqlx::query("DELETE FROM events WHERE seq > 35")
        .execute(raw.pool())
        .await
        .expect("tamper");
    let r = verify_now(&log).await;
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(36), Some(Problem::SequenceGap)),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_forged_head_is_refused() {
    let f = Fixture::new();
    let (log, _stop, raw) = f.open().await;
    fill(&log).await;
    sqlx::query("UPDATE tree_heads SET tree_size = 41 WHERE tree_size = 40")
        .execute(raw.pool())
        .await
        .expect("tamper");
    let r = verify_now(&log).await;
    assert_eq!(r.problem, Some(Problem::BadSignature), "{r:?}");
}

#[tokio::test]
async fn events_and_heads_survive_a_restart() {
    let f = Fixture::new();
    let (root, head) = {
        let (log, stop, _) = f.open().await;
        fill(&log).await;
        let head = log.latest_head().expect("head");
        stop.cancel();
        (log.root_at(40).expect("root"), head)
    };
    let (log, _stop, _) = f.open().await;
    assert_eq!(log.size(), 40);
    assert_eq!(log.root_at(40).expect("root"), root);
    assert_eq!(
        log.latest_head(),
        Some(head.clone()),
        "the head was reloaded"
    );
    assert!(
        head.verify(&log.signer().public()),
        "same key after restart"
    );
    // New appends continue the sequence.
    let seqs = log
        .append(
            &service("dispatcher"),
            vec![new_event("task.enqueued", "acme", "", &[])],
        )
        .await
        .expect("append");
    assert_eq!(seqs, vec![41]);
    log.checkpoint().await.expect("checkpoint");
    let p = log.consistency_proof(40, 41).expect("proof");
    let new_head = log.latest_head().expect("head");
    merkle::verify_consistency(40, 41, &head.root, &new_head.root, &p)
        .expect("old head is a prefix");
    assert!(verify_now(&log).await.ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_one_gap_free_order() {
    let f = Fixture::new();
    let (log, _stop, _) = f.open().await;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for b in 0..25 {
                let events = (0..4)
                    .map(|i| new_event("task.claimed", "acme", &format!("w{w}-b{b}-{i}"), &[]))
                    .collect();
                got.extend(
                    log.append(&service("dispatcher"), events)
                        .await
                        .expect("append"),
                );
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.expect("task");
        // Each writer's batches keep their order.
        assert!(mine.windows(2).all(|w| w[0] < w[1]));
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=1600).collect::<Vec<u64>>(),
        "every sequence once, no gaps"
    );
    log.checkpoint().await.expect("checkpoint");
    let r = verify_now(&log).await;
    assert!(r.ok() && r.checked == 1600, "{r:?}");
    let rows = store::open(&format!("sqlite://{}", f.db.display()))
        .await
        .expect("open")
        .last_sequence()
        .await
        .expect("last");
    assert_eq!(rows, 1600);
}
