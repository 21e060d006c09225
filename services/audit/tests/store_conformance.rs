//! One conformance suite for every audit store, run against SQLite and a real
//! PostgreSQL started by the test kit.

mod common;

use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::store::{self, AuditStore, Filter, Page};
use bulkhead_testkit::external::Postgres;
use common::stored;

async fn suite(s: &dyn AuditStore) {
    assert_eq!(s.last_sequence().await.expect("last"), 0);
    assert!(s.latest_head().await.expect("head").is_none());

    let a = "spiffe://bulkhead.test/service/sealed-vault";
    let d = "spiffe://bulkhead.test/service/dispatcher";
    let batch1 = vec![
        stored(1, "sealed.credential.resolved", "acme", "r1", a, 1_000),
        stored(2, "sealed.secret.written", "globex", "", a, 2_000),
        stored(3, "task.enqueued", "acme", "r2", d, 3_000),
    ];
    s.append(&batch1).await.expect("append");
    let batch2: Vec<_> = (4..=10)
        .map(|i| {
            stored(
                i,
                "fleet.cross_tenant_refused",
                "initech",
                "",
                d,
                i as i64 * 1000,
            )
        })
        .collect();
    s.append(&batch2).await.expect("append");
    assert_eq!(s.last_sequence().await.expect("last"), 10);

    // A second writer reusing a sequence is refused, and nothing of its batch lands.
    let clash = vec![
        stored(11, "task.x", "acme", "", d, 1),
        stored(5, "task.y", "acme", "", d, 1),
    ];
    assert!(
        s.append(&clash).await.is_err(),
        "duplicate sequence refused"
    );
    assert_eq!(s.last_sequence().await.expect("last"), 10, "all-or-nothing");

    // Round trip.
    let all = s.range(0, 100).await.expect("range");
    assert_eq!(all.len(), 10);
    assert_eq!(all[0], batch1[0]);
    assert_eq!(
        all.iter().map(|e| e.event.sequence).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(s.range(8, 100).await.expect("range").len(), 2);
    assert_eq!(s.range(0, 3).await.expect("range").len(), 3);
    let hashes = s.leaf_hashes(2, 3).await.expect("hashes");
    assert_eq!(
        hashes,
        vec![
            (3, batch1[2].leaf_hash),
            (4, batch2[0].leaf_hash),
            (5, batch2[1].leaf_hash)
        ]
    );
    assert_eq!(s.get(2).await.expect("get"), Some(batch1[1].clone()));
    assert_eq!(s.get(99).await.expect("get"), None);

    // Filters.
    let q = |f: Filter| async move {
        s.query(&f, Page::After(0), 100)
            .await
            .expect("query")
            .iter()
            .map(|e| e.event.sequence)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        q(Filter {
            tenant: Some("acme".into()),
            ..Default::default()
        })
        .await,
        vec![1, 3]
    );
    assert_eq!(
        q(Filter {
            type_prefix: Some("sealed.".into()),
            ..Default::default()
        })
        .await,
        vec![1, 2]
    );
    // '_' and '%' are literal in a prefix, not wildcards.
    assert_eq!(
        q(Filter {
            type_prefix: Some("fleet.cross_".into()),
            ..Default::default()
        })
        .await
        .len(),
        7
    );
    assert!(
        q(Filter {
            type_prefix: Some("fleet.cross%".into()),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert!(
        q(Filter {
            type_prefix: Some("sealed_".into()),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        q(Filter {
            run_id: Some("r2".into()),
            ..Default::default()
        })
        .await,
        vec![3]
    );
    assert_eq!(
        q(Filter {
            actor: Some(d.into()),
            tenant: Some("acme".into()),
            ..Default::default()
        })
        .await,
        vec![3]
    );
    assert_eq!(
        q(Filter {
            start_us: Some(2_000),
            end_us: Some(4_000),
            ..Default::default()
        })
        .await,
        vec![2, 3],
        "start inclusive, end exclusive"
    );
    // Paging both ways.
    let f = Filter {
        tenant: Some("initech".into()),
        ..Default::default()
    };
    let page = s.query(&f, Page::After(5), 2).await.expect("query");
    assert_eq!(
        page.iter().map(|e| e.event.sequence).collect::<Vec<_>>(),
        vec![6, 7]
    );
    let newest = s.query(&f, Page::Before(u64::MAX), 3).await.expect("query");
    assert_eq!(
        newest.iter().map(|e| e.event.sequence).collect::<Vec<_>>(),
        vec![10, 9, 8]
    );
    let older = s.query(&f, Page::Before(8), 3).await.expect("query");
    assert_eq!(
        older.iter().map(|e| e.event.sequence).collect::<Vec<_>>(),
        vec![7, 6, 5]
    );

    // Tree heads.
    let signer = Signer::generate();
    let h3 = signer.sign(3, [3; 32], 10);
    let h10 = signer.sign(10, [10; 32], 20);
    s.put_head(&h10).await.expect("head");
    s.put_head(&h3).await.expect("head");
    s.put_head(&h3).await.expect("a repeated head is harmless");
    assert_eq!(
        s.heads().await.expect("heads"),
        vec![h3.clone(), h10.clone()]
    );
    assert_eq!(s.latest_head().await.expect("latest"), Some(h10));
    assert_eq!(s.head_at(3).await.expect("at"), Some(h3));
    assert_eq!(s.head_at(4).await.expect("at"), None);
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store::open(&format!(
        "sqlite://{}",
        dir.path().join("audit.db").display()
    ))
    .await
    .expect("open");
    suite(s.as_ref()).await;
}

#[tokio::test]
async fn postgres_store_conforms() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let url = pg.create_database("audit_conformance").await?;
    let s = store::open(&url).await?;
    suite(s.as_ref()).await;
    Ok(())
}
