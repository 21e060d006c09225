//! One conformance suite for every identity store, run against SQLite and a
//! real PostgreSQL started by the test kit.

use std::sync::Arc;

use bulkhead_identity::store::postgres::PgStore;
use bulkhead_identity::store::sqlite::SqliteStore;
use bulkhead_identity::store::{
    self, IdentityStore, IssuedRow, JoinTokenRow, ListChange, RevocationRow, Target, TokenRefusal,
};
use bulkhead_testkit::external::Postgres;
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;

const NOW: i64 = 1_700_000_000_000;
const MINUTE: i64 = 60_000;

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn token(id: &str, tenant: &str, pool: &str, created_at_ms: i64, max_uses: u32) -> JoinTokenRow {
    JoinTokenRow {
        token_id: id.into(),
        secret_hash: hash(id),
        tenant: tenant.into(),
        pool: pool.into(),
        description: format!("token {id}"),
        expires_at_ms: NOW + 10 * MINUTE,
        max_uses,
        uses: 0,
        created_by: "spiffe://bulkhead.test/operator/ada".into(),
        created_at_ms,
        revoked_at_ms: None,
    }
}

fn issued(serial: &str, spiffe_id: &str, worker: &str, run: &str, not_after_ms: i64) -> IssuedRow {
    IssuedRow {
        serial: serial.into(),
        spiffe_id: spiffe_id.into(),
        kind: if run.is_empty() { "worker" } else { "run" }.into(),
        tenant: "acme".into(),
        pool: String::new(),
        worker_id: worker.into(),
        run_id: run.into(),
        not_after_ms,
        issued_at_ms: NOW - MINUTE,
    }
}

fn revocation(target: Target, expires_at_ms: Option<i64>) -> RevocationRow {
    RevocationRow {
        // Assigned by the store: whatever the caller puts here is ignored.
        sequence: 999,
        tenant: "acme".into(),
        spiffe_id: match &target {
            Target::Run(r) => format!("spiffe://bulkhead.test/tenant/acme/run/{r}"),
            Target::Worker(w) => format!("spiffe://bulkhead.test/tenant/acme/worker/{w}"),
            Target::WholeTenant => "spiffe://bulkhead.test/tenant/acme/".into(),
            Target::Serial(_) => String::new(),
        },
        target,
        hard: true,
        reason: "compromised".into(),
        revoked_by: "spiffe://bulkhead.test/operator/ada".into(),
        revoked_at_ms: NOW,
        expires_at_ms,
    }
}

fn at(row: &RevocationRow, sequence: u64) -> RevocationRow {
    RevocationRow {
        sequence,
        ..row.clone()
    }
}

fn ids(rows: &[JoinTokenRow]) -> Vec<&str> {
    rows.iter().map(|t| t.token_id.as_str()).collect()
}

async fn suite(s: Arc<dyn IdentityStore>) {
    join_tokens(s.as_ref()).await;
    list_join_tokens(s.as_ref()).await;
    concurrent_token_uses(&s).await;
    issued_certificates(s.as_ref()).await;
    revocation_list(s.as_ref()).await;
    concurrent_revocations(&s).await;
}

async fn join_tokens(s: &dyn IdentityStore) {
    let t = token("jt-a", "acme", "", NOW - MINUTE, 2);
    s.put_join_token(&t).await.expect("put");
    assert!(
        s.put_join_token(&t).await.is_err(),
        "a duplicate token id is refused"
    );
    assert_eq!(
        s.get_join_token("jt-a").await.expect("get"),
        Some(t.clone())
    );
    assert_eq!(s.get_join_token("jt-nope").await.expect("get"), None);

    let used = |id: &'static str, secret: &'static str, now: i64| async move {
        s.use_join_token(id, &hash(secret), now).await.expect("use")
    };
    assert_eq!(
        used("jt-nope", "jt-nope", NOW).await,
        Err(TokenRefusal::Unknown)
    );
    assert_eq!(
        used("jt-a", "wrong", NOW).await,
        Err(TokenRefusal::Unknown),
        "a wrong secret looks like an unknown token"
    );
    let first = used("jt-a", "jt-a", NOW).await.expect("first use");
    assert_eq!(first.uses, 1);
    assert_eq!(first.secret_hash, t.secret_hash);
    assert_eq!(used("jt-a", "jt-a", NOW).await.map(|t| t.uses), Ok(2));
    assert_eq!(used("jt-a", "jt-a", NOW).await, Err(TokenRefusal::UsedUp));
    assert_eq!(
        s.get_join_token("jt-a").await.expect("get").map(|t| t.uses),
        Some(2),
        "a refused use counts nothing"
    );

    // A use given back makes the token usable again; never below zero.
    s.release_join_token_use("jt-a").await.expect("release");
    assert_eq!(used("jt-a", "jt-a", NOW).await.map(|t| t.uses), Ok(2));
    for _ in 0..3 {
        s.release_join_token_use("jt-a").await.expect("release");
    }
    assert_eq!(
        s.get_join_token("jt-a").await.expect("get").map(|t| t.uses),
        Some(0)
    );
    s.release_join_token_use("jt-nope")
        .await
        .expect("releasing an unknown token is harmless");

    // Expiry: usable strictly before expires_at_ms.
    let expiry = t.expires_at_ms;
    assert!(used("jt-a", "jt-a", expiry - 1).await.is_ok());
    assert_eq!(
        used("jt-a", "jt-a", expiry).await,
        Err(TokenRefusal::Expired)
    );

    // Refusals in priority order: unknown, revoked, expired, used up.
    let mut u = token("jt-used-expired", "acme", "", NOW, 1);
    u.uses = 1;
    s.put_join_token(&u).await.expect("put");
    assert_eq!(
        used("jt-used-expired", "jt-used-expired", NOW).await,
        Err(TokenRefusal::UsedUp)
    );
    assert_eq!(
        used("jt-used-expired", "jt-used-expired", expiry).await,
        Err(TokenRefusal::Expired),
        "expired before used up"
    );
    let revoked = s
        .revoke_join_token("jt-used-expired", NOW)
        .await
        .expect("revoke")
        .expect("known");
    assert_eq!(revoked.revoked_at_ms, Some(NOW));
    assert_eq!(
        used("jt-used-expired", "jt-used-expired", expiry).await,
        Err(TokenRefusal::Revoked),
        "revoked before expired"
    );
    assert_eq!(
        used("jt-used-expired", "wrong", expiry).await,
        Err(TokenRefusal::Unknown),
        "unknown before revoked: a wrong secret learns nothing"
    );

    // Revocation keeps the first time and stops a token that is otherwise fine.
    s.put_join_token(&token("jt-b", "acme", "", NOW, 5))
        .await
        .expect("put");
    let r1 = s.revoke_join_token("jt-b", NOW).await.expect("revoke");
    let r2 = s.revoke_join_token("jt-b", NOW + 5).await.expect("revoke");
    assert_eq!(r1.and_then(|t| t.revoked_at_ms), Some(NOW));
    assert_eq!(r2.and_then(|t| t.revoked_at_ms), Some(NOW), "idempotent");
    assert_eq!(used("jt-b", "jt-b", NOW).await, Err(TokenRefusal::Revoked));
    assert_eq!(
        s.revoke_join_token("jt-nope", NOW).await.expect("revoke"),
        None
    );
}

async fn list_join_tokens(s: &dyn IdentityStore) {
    // Left by join_tokens: jt-a (acme, created NOW-1m, active), jt-used-expired
    // and jt-b (acme, created NOW, revoked).
    let mut expired = token("jt-c", "acme", "", NOW + 1, 1);
    expired.expires_at_ms = NOW;
    for t in [
        expired,
        token("jt-d", "acme", "", NOW + 2, 1),
        // Same creation time: the id breaks the tie.
        token("jt-e1", "", "gpu", NOW + 3, 1),
        token("jt-e2", "", "gpu", NOW + 3, 1),
        token("jt-f", "globex", "", NOW + 4, 1),
    ] {
        s.put_join_token(&t).await.expect("put");
    }
    s.use_join_token("jt-d", &hash("jt-d"), NOW)
        .await
        .expect("use")
        .expect("used up now");

    let list = |tenant: &'static str, pool: &'static str, all: bool, after: &'static str, n| async move {
        s.list_join_tokens(tenant, pool, all, NOW, after, n)
            .await
            .expect("list")
    };
    assert_eq!(
        ids(&list("", "", true, "", 100).await),
        vec![
            "jt-f",
            "jt-e2",
            "jt-e1",
            "jt-d",
            "jt-c",
            "jt-used-expired",
            "jt-b",
            "jt-a"
        ],
        "everything, newest first"
    );
    assert_eq!(
        ids(&list("", "", false, "", 100).await),
        vec!["jt-f", "jt-e2", "jt-e1", "jt-a"],
        "used up, expired and revoked tokens are hidden"
    );
    assert_eq!(
        ids(&list("acme", "", true, "", 100).await),
        vec!["jt-d", "jt-c", "jt-used-expired", "jt-b", "jt-a"]
    );
    assert_eq!(ids(&list("acme", "", false, "", 100).await), vec!["jt-a"]);
    assert_eq!(
        ids(&list("", "gpu", false, "", 100).await),
        vec!["jt-e2", "jt-e1"]
    );
    assert!(list("initech", "", true, "", 100).await.is_empty());

    // Paging through with the cursor gives the same list, across the tie.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = s
            .list_join_tokens("", "", true, NOW, &cursor, 3)
            .await
            .expect("list");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        cursor = last.token_id.clone();
        paged.extend(page);
    }
    assert_eq!(paged, list("", "", true, "", 100).await);
    assert_eq!(
        ids(&list("", "", true, "jt-e2", 2).await),
        vec!["jt-e1", "jt-d"]
    );
    assert_eq!(
        ids(&list("", "", false, "jt-e2", 10).await),
        vec!["jt-e1", "jt-a"]
    );
    assert_eq!(
        ids(&list("", "", false, "jt-d", 10).await),
        vec!["jt-a"],
        "the cursor may be a hidden token"
    );
    assert!(list("", "", true, "", 0).await.is_empty());
}

async fn concurrent_token_uses(s: &Arc<dyn IdentityStore>) {
    s.put_join_token(&token("jt-race", "acme", "", NOW, 5))
        .await
        .expect("put");
    let barrier = Arc::new(Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = Arc::clone(s);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                s.use_join_token("jt-race", &hash("jt-race"), NOW)
                    .await
                    .expect("use")
            })
        })
        .collect();
    let mut ok = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(t) => ok.push(t.uses),
            Err(refusal) => assert_eq!(refusal, TokenRefusal::UsedUp),
        }
    }
    ok.sort_unstable();
    assert_eq!(ok, vec![1, 2, 3, 4, 5], "exactly max_uses callers succeed");
    assert_eq!(
        s.get_join_token("jt-race")
            .await
            .expect("get")
            .map(|t| t.uses),
        Some(5)
    );
}

async fn issued_certificates(s: &dyn IdentityStore) {
    let td = "spiffe://bulkhead.test";
    let rows = [
        issued(
            "0a01",
            &format!("{td}/tenant/acme/worker/w1"),
            "w1",
            "",
            NOW + 60 * MINUTE,
        ),
        issued(
            "0a02",
            &format!("{td}/tenant/acme/run/r1"),
            "w1",
            "r1",
            NOW + 15 * MINUTE,
        ),
        issued("0a03", &format!("{td}/tenant/acme/run/r2"), "w1", "r2", NOW),
        issued(
            "0a04",
            &format!("{td}/tenant/acme/run/r3"),
            "w2",
            "r3",
            NOW + 5 * MINUTE,
        ),
        issued(
            "0a05",
            &format!("{td}/tenant/acme/run/r4"),
            "w1",
            "r4",
            NOW + 20 * MINUTE,
        ),
        issued(
            "0b01",
            &format!("{td}/tenant/abc/run/x"),
            "w9",
            "x",
            NOW + 90 * MINUTE,
        ),
        issued(
            "0b02",
            &format!("{td}/tenant/a_c/run/y"),
            "w9",
            "y",
            NOW + 30 * MINUTE,
        ),
        issued(
            "0b03",
            &format!("{td}/tenant/é/run/z"),
            "w9",
            "z",
            NOW + 40 * MINUTE,
        ),
        issued(
            "0b04",
            &format!("{td}/tenant/Acme/run/q"),
            "w9",
            "q",
            NOW + 50 * MINUTE,
        ),
    ];
    // One by one, and several in one transaction (the issuance writer's way).
    for row in &rows[..2] {
        s.put_issued(row).await.expect("put");
    }
    s.put_issued_many(&rows[2..]).await.expect("put many");
    // A batch with a duplicate serial is refused whole.
    let mut fresh = rows[0].clone();
    fresh.serial = "0c01".into();
    assert!(
        s.put_issued_many(&[fresh.clone(), rows[3].clone()])
            .await
            .is_err()
    );
    assert_eq!(s.find_issued("worker", "nobody").await.expect("find"), None);
    let mut clash = rows[1].clone();
    clash.run_id = "other".into();
    assert!(
        s.put_issued(&clash).await.is_err(),
        "a duplicate serial is refused"
    );

    // Unexpired run certificates only: not the worker's own, not r2 (expired at NOW).
    assert_eq!(
        s.runs_of_worker("w1", NOW).await.expect("runs"),
        vec![rows[1].clone(), rows[4].clone()]
    );
    assert_eq!(
        s.runs_of_worker("w2", NOW).await.expect("runs"),
        vec![rows[3].clone()]
    );
    assert!(
        s.runs_of_worker("w1", NOW + 60 * MINUTE)
            .await
            .expect("runs")
            .is_empty()
    );
    assert!(
        s.runs_of_worker("w-none", NOW)
            .await
            .expect("runs")
            .is_empty()
    );

    let max = |prefix: String| async move { s.max_not_after(&prefix).await.expect("max") };
    assert_eq!(
        max(format!("{td}/tenant/acme/")).await,
        Some(NOW + 60 * MINUTE)
    );
    assert_eq!(
        max(format!("{td}/tenant/acme/run/")).await,
        Some(NOW + 20 * MINUTE)
    );
    assert_eq!(
        max(format!("{td}/tenant/acme/run/r3")).await,
        Some(NOW + 5 * MINUTE),
        "a whole id is its own prefix"
    );
    assert_eq!(
        max(format!("{td}/tenant/a_c/")).await,
        Some(NOW + 30 * MINUTE),
        "'_' is literal, not a wildcard"
    );
    assert_eq!(max(format!("{td}/tenant/a%")).await, None, "'%' is literal");
    assert_eq!(
        max(format!("{td}/tenant/ACME/")).await,
        None,
        "prefixes are case-sensitive"
    );
    assert_eq!(
        max(format!("{td}/tenant/é/")).await,
        Some(NOW + 40 * MINUTE)
    );
    assert_eq!(max(format!("{td}/tenant/\u{10FFFF}")).await, None);
    assert_eq!(max(format!("{td}/tenant/nobody/")).await, None);
    assert_eq!(
        max(String::new()).await,
        Some(NOW + 90 * MINUTE),
        "everything"
    );

    assert_eq!(s.run_worker("r3").await.expect("run"), Some("w2".into()));
    assert_eq!(s.run_worker("r2").await.expect("run"), Some("w1".into()));
    assert_eq!(s.run_worker("r-none").await.expect("run"), None);
    assert_eq!(
        s.run_worker("").await.expect("run"),
        None,
        "worker certificates name no run"
    );
}

async fn revocation_list(s: &dyn IdentityStore) {
    assert_eq!(s.revocations().await.expect("list"), (vec![], 0));
    assert_eq!(s.changes_since(0).await.expect("changes"), Some(vec![]));
    assert_eq!(
        s.changes_since(3).await.expect("changes"),
        None,
        "a sequence this list never had: start from a snapshot"
    );
    assert!(
        s.expire_revocations(i64::MAX)
            .await
            .expect("expire")
            .is_empty()
    );

    let e1 = revocation(Target::Run("r1".into()), Some(NOW + MINUTE));
    let e2 = revocation(Target::WholeTenant, None);
    let e3 = revocation(Target::Serial("0a04".into()), Some(NOW + 5 * MINUTE));
    let mut e4 = revocation(Target::Worker("w1".into()), Some(NOW + MINUTE));
    e4.hard = false;
    e4.reason = "drained".into();
    e4.tenant = String::new();
    for (i, e) in [&e1, &e2, &e3, &e4].into_iter().enumerate() {
        assert_eq!(s.add_revocation(e).await.expect("add"), i as u64 + 1);
    }
    let (e1, e2, e3, e4) = (at(&e1, 1), at(&e2, 2), at(&e3, 3), at(&e4, 4));
    assert_eq!(
        s.revocations().await.expect("list"),
        (vec![e1.clone(), e2.clone(), e3.clone(), e4.clone()], 4)
    );

    assert!(
        s.expire_revocations(NOW + MINUTE - 1)
            .await
            .expect("expire")
            .is_empty()
    );
    assert_eq!(
        s.expire_revocations(NOW + MINUTE).await.expect("expire"),
        vec![
            ListChange::Removed {
                sequence: 5,
                entry_sequence: 1
            },
            ListChange::Removed {
                sequence: 6,
                entry_sequence: 4
            },
        ],
        "expiry at exactly now removes"
    );
    assert!(
        s.expire_revocations(NOW + MINUTE)
            .await
            .expect("expire")
            .is_empty(),
        "removed once"
    );
    assert_eq!(
        s.expire_revocations(i64::MAX).await.expect("expire"),
        vec![ListChange::Removed {
            sequence: 7,
            entry_sequence: 3
        }],
        "an entry without expiry stays"
    );
    assert_eq!(
        s.revocations().await.expect("list"),
        (vec![e2.clone()], 7),
        "removals advance the sequence"
    );
    let e5 = at(
        &revocation(Target::Run("r9".into()), Some(NOW + 2 * MINUTE)),
        8,
    );
    assert_eq!(s.add_revocation(&e5).await.expect("add"), 8);

    let all = vec![
        ListChange::Added(e1),
        ListChange::Added(e2.clone()),
        ListChange::Added(e3),
        ListChange::Added(e4),
        ListChange::Removed {
            sequence: 5,
            entry_sequence: 1,
        },
        ListChange::Removed {
            sequence: 6,
            entry_sequence: 4,
        },
        ListChange::Removed {
            sequence: 7,
            entry_sequence: 3,
        },
        ListChange::Added(e5.clone()),
    ];
    assert_eq!(
        s.changes_since(0).await.expect("changes"),
        Some(all.clone())
    );
    for after in 0..=8 {
        assert_eq!(
            s.changes_since(after).await.expect("changes"),
            Some(all[after as usize..].to_vec()),
            "changes after {after}"
        );
    }
    assert_eq!(s.changes_since(9).await.expect("changes"), None);
    assert_eq!(s.changes_since(u64::MAX).await.expect("changes"), None);
    assert_eq!(s.revocations().await.expect("list"), (vec![e2, e5], 8));
}

async fn concurrent_revocations(s: &Arc<dyn IdentityStore>) {
    let (before, last) = s.revocations().await.expect("list");
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let s = Arc::clone(s);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let row = revocation(Target::Run(format!("race-{i}")), Some(NOW + MINUTE));
                barrier.wait().await;
                let sequence = s.add_revocation(&row).await.expect("add");
                at(&row, sequence)
            })
        })
        .collect();
    let mut added = Vec::new();
    for task in tasks {
        added.push(task.await.expect("task"));
    }
    added.sort_by_key(|r| r.sequence);
    assert_eq!(
        added.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        (last + 1..=last + 10).collect::<Vec<_>>(),
        "concurrent additions take distinct, consecutive sequences"
    );
    assert_eq!(
        s.changes_since(last).await.expect("changes"),
        Some(added.iter().cloned().map(ListChange::Added).collect())
    );
    let (after, seq) = s.revocations().await.expect("list");
    assert_eq!(seq, last + 10);
    assert_eq!(after, [before, added].concat());
}

/// What survives closing and reopening: the schema is created idempotently.
async fn reopened(s: &dyn IdentityStore) {
    assert_eq!(
        s.get_join_token("jt-race")
            .await
            .expect("get")
            .map(|t| t.uses),
        Some(5)
    );
    assert_eq!(s.run_worker("r1").await.expect("run"), Some("w1".into()));
    let (list, seq) = s.revocations().await.expect("list");
    assert_eq!((list.len(), seq), (12, 18));
    assert_eq!(
        s.changes_since(seq - 1)
            .await
            .expect("changes")
            .map(|c| c.len()),
        Some(1)
    );
}

/// A store keeping the last 5 changes: resuming from further back needs a snapshot.
async fn bounded_history(s: &dyn IdentityStore) {
    for i in 0..8 {
        let expiry = if i % 2 == 0 { Some(NOW) } else { None };
        let row = revocation(Target::Run(format!("h{i}")), expiry);
        assert_eq!(s.add_revocation(&row).await.expect("add"), i + 1);
    }
    // Removes 1, 3, 5, 7 at sequences 9..=12; the history keeps 8..=12.
    assert_eq!(s.expire_revocations(NOW).await.expect("expire").len(), 4);
    let (list, seq) = s.revocations().await.expect("list");
    assert_eq!(seq, 12);
    assert_eq!(
        list.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![2, 4, 6, 8],
        "entries outlive their history"
    );
    for after in 0..7 {
        assert_eq!(
            s.changes_since(after).await.expect("changes"),
            None,
            "after {after} is older than the history"
        );
    }
    let since7 = s.changes_since(7).await.expect("changes").expect("kept");
    assert_eq!(since7.len(), 5);
    assert!(matches!(&since7[0], ListChange::Added(r) if r.sequence == 8));
    assert_eq!(
        since7[4],
        ListChange::Removed {
            sequence: 12,
            entry_sequence: 7
        }
    );
    assert_eq!(s.changes_since(12).await.expect("changes"), Some(vec![]));
    assert_eq!(s.changes_since(13).await.expect("changes"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("identity.db").display());
    suite(store::open(&url).await.expect("open")).await;
    reopened(store::open(&url).await.expect("reopen").as_ref()).await;

    let bounded = SqliteStore::open(&dir.path().join("bounded.db"))
        .await
        .expect("open")
        .with_retained_changes(5);
    bounded_history(&bounded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_conforms() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let url = pg.create_database("identity_conformance").await?;
    suite(store::open(&url).await?).await;
    reopened(store::open(&url).await?.as_ref()).await;

    let url = pg.create_database("identity_bounded").await?;
    let bounded = PgStore::open(&url).await?.with_retained_changes(5);
    bounded_history(&bounded).await;
    Ok(())
}
