//! One conformance suite for every sealed-vault store, run against SQLite and
//! a real PostgreSQL started by the test kit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bulkhead_sealed_vault::crypto::{self, MasterKey};
use bulkhead_sealed_vault::secret::SecretValue;
use bulkhead_sealed_vault::store::postgres::PgStore;
use bulkhead_sealed_vault::store::sqlite::SqliteStore;
use bulkhead_sealed_vault::store::{
    self, EXPORT_FORMAT, Holding, Lift, NewRevocation, ProfileQuery, ProfileSpec, RevocationQuery,
    Rewrapped, RotateError, SealedStore, SecretMaterial, SecretVersion, StoreError, StoreExport,
    Tenants, VersionId, rotate_master_key,
};
use bulkhead_testkit::external::Postgres;
use tokio::sync::Barrier;

const NOW: i64 = 1_700_000_000_000;
const MINUTE: i64 = 60_000;
const OPERATOR: &str = "spiffe://bulkhead.test/operator/ada";

fn spec(description: &str, tags: &[&str]) -> ProfileSpec {
    ProfileSpec {
        description: description.into(),
        owner: "platform-team".into(),
        tags: tags.iter().map(|t| (*t).into()).collect(),
        allowed_agents: vec!["coder".into(), "reviewer".into()],
        env: BTreeMap::from([("DEBUG".into(), "1".into()), ("REGION".into(), "eu".into())]),
        tool_acl: BTreeMap::from([
            ("git".into(), vec!["GITHUB_TOKEN".into()]),
            ("llm".into(), vec!["ANTHROPIC_API_KEY".into()]),
        ]),
    }
}

fn sealed_version(
    master: &MasterKey,
    id: VersionId,
    value: &[u8],
    written_at_ms: i64,
) -> SecretVersion {
    let sealed = crypto::seal(master, &id.aad(), &SecretValue::from_slice(value)).expect("seal");
    SecretVersion {
        fingerprint: format!("fp-{}", id.version),
        id,
        material: SecretMaterial::Sealed(sealed),
        written_at_ms,
    }
}

fn reference_version(id: VersionId, reference: &str, written_at_ms: i64) -> SecretVersion {
    SecretVersion {
        id,
        material: SecretMaterial::Reference(reference.into()),
        fingerprint: String::new(),
        written_at_ms,
    }
}

/// Opens a stored version's value.
fn reveal(master: &MasterKey, v: &SecretVersion) -> Vec<u8> {
    match &v.material {
        SecretMaterial::Sealed(s) => crypto::open(master, &v.id.aad(), s)
            .expect("open")
            .expose()
            .to_vec(),
        SecretMaterial::Reference(r) => panic!("{}: a reference ({r}), not sealed", v.id),
    }
}

fn page(limit: u32) -> ProfileQuery {
    ProfileQuery {
        tag: None,
        after: None,
        limit,
    }
}

fn names(profiles: &[store::Profile]) -> Vec<String> {
    profiles
        .iter()
        .map(|p| format!("{}/{}", p.tenant, p.name))
        .collect()
}

async fn suite(s: Arc<dyn SealedStore>, master: &MasterKey) {
    profiles(s.as_ref()).await;
    secrets(s.as_ref(), master).await;
    tenant_isolation(s.as_ref(), master).await;
    revocations(s.as_ref()).await;
    holdings(s.as_ref()).await;
    holdings_against_revocations(&s).await;
    concurrent_writers(&s, master).await;
    rotation(s.as_ref(), master).await;
}

async fn profiles(s: &dyn SealedStore) {
    let created = s
        .create_profile("p-acme", "default", &spec("acme defaults", &["blue"]), NOW)
        .await
        .expect("create");
    assert_eq!(created.revision, 1);
    assert_eq!((created.created_at_ms, created.updated_at_ms), (NOW, NOW));
    assert!(created.secrets.is_empty());
    assert_eq!(created.last_rotated_at_ms(), None);
    assert_eq!(
        s.get_profile("p-acme", "default").await.expect("get"),
        Some(created.clone())
    );
    assert!(matches!(
        s.create_profile("p-acme", "default", &ProfileSpec::default(), NOW)
            .await,
        Err(StoreError::ProfileExists { .. })
    ));
    // The same name in another tenant is another profile.
    let globex = s
        .create_profile("p-globex", "default", &spec("globex", &["red"]), NOW)
        .await
        .expect("create");
    assert_eq!(
        s.get_profile("p-globex", "default").await.expect("get"),
        Some(globex)
    );
    assert_eq!(s.get_profile("p-acme", "absent").await.expect("get"), None);
    assert_eq!(
        s.get_profile("p-initech", "default").await.expect("get"),
        None
    );

    // Optimistic concurrency.
    let new_spec = spec("acme defaults, v2", &["blue", "green"]);
    let updated = s
        .update_profile("p-acme", "default", &new_spec, Some(1), NOW + 1)
        .await
        .expect("update");
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.spec, new_spec);
    assert_eq!(
        (updated.created_at_ms, updated.updated_at_ms),
        (NOW, NOW + 1)
    );
    match s
        .update_profile("p-acme", "default", &spec("lost", &[]), Some(1), NOW + 2)
        .await
    {
        Err(StoreError::StaleRevision {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (1, 2)),
        other => panic!("stale update: {other:?}"),
    }
    assert_eq!(
        s.get_profile("p-acme", "default")
            .await
            .expect("get")
            .map(|p| p.spec),
        Some(new_spec.clone()),
        "a stale update changes nothing"
    );
    let unconditional = s
        .update_profile("p-acme", "default", &new_spec, None, NOW + 3)
        .await
        .expect("update");
    assert_eq!(unconditional.revision, 3);
    assert!(matches!(
        s.update_profile("p-acme", "absent", &new_spec, None, NOW)
            .await,
        Err(StoreError::ProfileNotFound { .. })
    ));

    // Listing: per tenant, ordered, paged, by tag.
    for name in ["zeta", "alpha", "mid.dle", "b_x"] {
        s.create_profile("p-acme", name, &spec(name, &["bluest", name]), NOW)
            .await
            .expect("create");
    }
    let acme = s
        .list_profiles(Tenants::One("p-acme"), &page(100))
        .await
        .expect("list");
    assert_eq!(
        names(&acme),
        [
            "p-acme/alpha",
            "p-acme/b_x",
            "p-acme/default",
            "p-acme/mid.dle",
            "p-acme/zeta"
        ]
    );
    let first = s
        .list_profiles(Tenants::One("p-acme"), &page(2))
        .await
        .expect("list");
    assert_eq!(names(&first), ["p-acme/alpha", "p-acme/b_x"]);
    let next = s
        .list_profiles(
            Tenants::One("p-acme"),
            &ProfileQuery {
                after: Some(("p-acme".into(), "b_x".into())),
                ..page(2)
            },
        )
        .await
        .expect("list");
    assert_eq!(names(&next), ["p-acme/default", "p-acme/mid.dle"]);
    let tagged = |tag: &str| ProfileQuery {
        tag: Some(tag.into()),
        ..page(100)
    };
    assert_eq!(
        names(
            &s.list_profiles(Tenants::One("p-acme"), &tagged("blue"))
                .await
                .expect("list")
        ),
        ["p-acme/default"],
        "tags match whole"
    );
    assert_eq!(
        names(
            &s.list_profiles(Tenants::One("p-acme"), &tagged("b_x"))
                .await
                .expect("list")
        ),
        ["p-acme/b_x"]
    );
    assert!(
        s.list_profiles(Tenants::One("p-acme"), &tagged("b%"))
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        names(
            &s.list_profiles(Tenants::One("p-globex"), &page(100))
                .await
                .expect("list")
        ),
        ["p-globex/default"]
    );
    let all = s
        .list_profiles(Tenants::All, &page(100))
        .await
        .expect("list");
    let all: Vec<String> = names(&all)
        .into_iter()
        .filter(|n| n.starts_with("p-"))
        .collect();
    assert_eq!(all.len(), 6);
    assert_eq!(all.last().map(String::as_str), Some("p-globex/default"));
    let all_after = s
        .list_profiles(
            Tenants::All,
            &ProfileQuery {
                after: Some(("p-acme".into(), "zeta".into())),
                ..page(1)
            },
        )
        .await
        .expect("list");
    assert_eq!(names(&all_after), ["p-globex/default"]);

    assert_eq!(s.delete_profile("p-acme", "zeta").await.expect("delete"), 0);
    assert!(matches!(
        s.delete_profile("p-acme", "zeta").await,
        Err(StoreError::ProfileNotFound { .. })
    ));
    assert_eq!(s.get_profile("p-acme", "zeta").await.expect("get"), None);
}

async fn secrets(s: &dyn SealedStore, master: &MasterKey) {
    let (t, p) = ("s-acme", "default");
    let id = |key: &str, version| VersionId::new(t, p, key, version);
    let profile = s
        .create_profile(t, p, &spec("secrets", &[]), NOW)
        .await
        .expect("create");
    assert!(matches!(
        s.put_secret(&sealed_version(
            master,
            VersionId::new(t, "absent", "K", 1),
            b"v",
            NOW
        ))
        .await,
        Err(StoreError::ProfileNotFound { .. })
    ));
    assert_eq!(
        s.current_version(t, p, "API_KEY").await.expect("current"),
        None
    );

    let v1 = sealed_version(master, id("API_KEY", 1), b"first value", NOW + MINUTE);
    let meta = s.put_secret(&v1).await.expect("put v1");
    assert_eq!(
        (meta.version, meta.created_at_ms, meta.last_rotated_at_ms),
        (1, NOW + MINUTE, NOW + MINUTE)
    );
    assert_eq!(meta.reference, None);
    assert_eq!(meta.fingerprint, "fp-1");
    assert_eq!(
        s.current_version(t, p, "API_KEY").await.expect("current"),
        Some(1)
    );

    // Versions follow each other: a repeat or a gap is a conflict.
    for attempted in [1, 3] {
        match s
            .put_secret(&sealed_version(master, id("API_KEY", attempted), b"x", NOW))
            .await
        {
            Err(StoreError::VersionConflict {
                current,
                attempted: a,
                ..
            }) => assert_eq!((current, a), (1, attempted)),
            other => panic!("version {attempted}: {other:?}"),
        }
    }
    assert!(matches!(
        s.put_secret(&sealed_version(master, id("NEW_KEY", 0), b"x", NOW))
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.put_secret(&sealed_version(master, id("NEW_KEY", 2), b"x", NOW))
            .await,
        Err(StoreError::VersionConflict { current: 0, .. })
    ));

    let v2 = sealed_version(master, id("API_KEY", 2), b"second value", NOW + 2 * MINUTE);
    let meta = s.put_secret(&v2).await.expect("put v2");
    assert_eq!(
        (meta.version, meta.created_at_ms, meta.last_rotated_at_ms),
        (2, NOW + MINUTE, NOW + 2 * MINUTE),
        "created when first written, rotated now"
    );
    let current = s
        .get_secret(t, p, "API_KEY", None)
        .await
        .expect("get")
        .expect("current");
    assert_eq!(current, v2);
    assert_eq!(reveal(master, &current), b"second value");
    let old = s
        .get_secret(t, p, "API_KEY", Some(1))
        .await
        .expect("get")
        .expect("v1 kept");
    assert_eq!(old, v1);
    assert_eq!(reveal(master, &old), b"first value");
    assert_eq!(
        s.get_secret(t, p, "API_KEY", Some(3)).await.expect("get"),
        None
    );
    assert_eq!(s.get_secret(t, p, "ABSENT", None).await.expect("get"), None);

    let vault = reference_version(id("DB_PASSWORD", 1), "vault://kv/app#password", NOW);
    let meta = s.put_secret(&vault).await.expect("put reference");
    assert_eq!(meta.reference.as_deref(), Some("vault://kv/app#password"));
    assert_eq!(
        s.get_secret(t, p, "DB_PASSWORD", None).await.expect("get"),
        Some(vault.clone())
    );
    let aws = reference_version(id("DB_PASSWORD", 2), "aws-sm://prod/db#password", NOW);
    s.put_secret(&aws).await.expect("a reference rotates too");

    // A secret key may not be an env name, nor an env name a secret key.
    assert!(matches!(
        s.put_secret(&sealed_version(master, id("DEBUG", 1), b"x", NOW))
            .await,
        Err(StoreError::KeyCollision { key, .. }) if key == "DEBUG"
    ));
    let mut colliding = spec("secrets", &[]);
    colliding.env.insert("API_KEY".into(), "plain".into());
    assert!(matches!(
        s.update_profile(t, p, &colliding, None, NOW).await,
        Err(StoreError::KeyCollision { key, .. }) if key == "API_KEY"
    ));

    let got = s.get_profile(t, p).await.expect("get").expect("profile");
    assert_eq!(
        got.revision,
        profile.revision + 4,
        "every secret write bumps the revision"
    );
    assert_eq!(got.updated_at_ms, NOW);
    assert_eq!(
        got.secrets
            .iter()
            .map(|m| (m.key.as_str(), m.version))
            .collect::<Vec<_>>(),
        [("API_KEY", 2), ("DB_PASSWORD", 2)]
    );
    assert_eq!(got.last_rotated_at_ms(), Some(NOW + 2 * MINUTE));

    let bundle = s.load_profile(t, p).await.expect("load").expect("bundle");
    assert_eq!(bundle.profile, got);
    assert_eq!(bundle.secrets, vec![v2.clone(), aws.clone()]);
    assert!(bundle.revocations.is_empty());
    assert_eq!(s.load_profile(t, "absent").await.expect("load"), None);
    assert_eq!(s.load_profile("s-globex", p).await.expect("load"), None);

    // Deleting a key deletes every version; the next write starts again at 1.
    assert_eq!(
        s.delete_secret(t, p, "API_KEY", NOW + 3 * MINUTE)
            .await
            .expect("delete"),
        2
    );
    assert_eq!(
        s.get_secret(t, p, "API_KEY", None).await.expect("get"),
        None
    );
    assert_eq!(
        s.get_secret(t, p, "API_KEY", Some(1)).await.expect("get"),
        None
    );
    assert_eq!(
        s.current_version(t, p, "API_KEY").await.expect("current"),
        None
    );
    assert!(matches!(
        s.delete_secret(t, p, "API_KEY", NOW).await,
        Err(StoreError::SecretNotFound { .. })
    ));
    assert!(matches!(
        s.delete_secret(t, "absent", "API_KEY", NOW).await,
        Err(StoreError::ProfileNotFound { .. })
    ));
    let after = s.get_profile(t, p).await.expect("get").expect("profile");
    assert_eq!(after.revision, got.revision + 1);
    assert_eq!(after.updated_at_ms, NOW + 3 * MINUTE);
    let again = sealed_version(master, id("API_KEY", 1), b"third value", NOW);
    s.put_secret(&again).await.expect("put again");

    // Deleting the profile takes its secrets with it.
    s.create_profile(t, "doomed", &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    for key in ["A", "B", "C"] {
        s.put_secret(&sealed_version(
            master,
            VersionId::new(t, "doomed", key, 1),
            b"doomed value",
            NOW,
        ))
        .await
        .expect("put");
    }
    assert_eq!(s.delete_profile(t, "doomed").await.expect("delete"), 3);
    assert_eq!(
        s.get_secret(t, "doomed", "A", None).await.expect("get"),
        None
    );
    assert_eq!(
        s.get_secret(t, "doomed", "A", Some(1)).await.expect("get"),
        None
    );
    // A new profile of the same name starts empty.
    s.create_profile(t, "doomed", &ProfileSpec::default(), NOW)
        .await
        .expect("recreate");
    assert!(
        s.get_profile(t, "doomed")
            .await
            .expect("get")
            .expect("profile")
            .secrets
            .is_empty()
    );
    assert_eq!(
        s.get_secret(t, "doomed", "A", Some(1)).await.expect("get"),
        None
    );
}

/// Two tenants with the same profile and key names: every read and write
/// names its tenant and touches only that tenant's rows, and a ciphertext
/// moved across tenants does not open.
async fn tenant_isolation(s: &dyn SealedStore, master: &MasterKey) {
    let (a, b, p, k) = ("i-acme", "i-globex", "shared", "API_KEY");
    for t in [a, b] {
        s.create_profile(t, p, &spec(t, &["shared"]), NOW)
            .await
            .expect("create");
        s.put_secret(&sealed_version(
            master,
            VersionId::new(t, p, k, 1),
            format!("value of {t}").as_bytes(),
            NOW,
        ))
        .await
        .expect("put");
    }
    for t in [a, b] {
        let v = s.get_secret(t, p, k, None).await.expect("get").expect("v");
        assert_eq!(v.id.tenant, t);
        assert_eq!(reveal(master, &v), format!("value of {t}").as_bytes());
        let bundle = s.load_profile(t, p).await.expect("load").expect("bundle");
        assert_eq!(bundle.profile.tenant, t);
        assert!(bundle.secrets.iter().all(|v| v.id.tenant == t));
        assert_eq!(
            names(
                &s.list_profiles(Tenants::One(t), &page(100))
                    .await
                    .expect("list")
            ),
            [format!("{t}/{p}")]
        );
    }

    // Acme's sealed bytes written as globex's next version: stored, but they
    // do not open as globex's.
    let SecretMaterial::Sealed(acme_sealed) = s
        .get_secret(a, p, k, None)
        .await
        .expect("get")
        .expect("v")
        .material
    else {
        panic!("sealed");
    };
    let moved = VersionId::new(b, p, k, 2);
    s.put_secret(&SecretVersion {
        id: moved.clone(),
        material: SecretMaterial::Sealed(acme_sealed.clone()),
        fingerprint: "fp".into(),
        written_at_ms: NOW,
    })
    .await
    .expect("put");
    assert!(crypto::open(master, &moved.aad(), &acme_sealed).is_err());
    assert!(crypto::open(master, &VersionId::new(a, p, k, 2).aad(), &acme_sealed).is_err());

    // Deleting in one tenant leaves the other alone.
    assert_eq!(s.delete_secret(b, p, k, NOW).await.expect("delete"), 2);
    assert_eq!(s.current_version(a, p, k).await.expect("current"), Some(1));
    assert_eq!(s.delete_profile(b, p).await.expect("delete"), 0);
    assert!(s.get_profile(a, p).await.expect("get").is_some());
    assert!(matches!(
        s.update_profile(b, p, &ProfileSpec::default(), None, NOW)
            .await,
        Err(StoreError::ProfileNotFound { .. })
    ));
}

fn revocation(tenant: &str, profile: &str, key: Option<&str>, at_ms: i64) -> NewRevocation {
    NewRevocation {
        tenant: tenant.into(),
        profile: profile.into(),
        key: key.map(str::to_owned),
        hard: key.is_some(),
        reason: "leaked in a log".into(),
        revoked_by: OPERATOR.into(),
        revoked_at_ms: at_ms,
    }
}

/// A holding resolved at `at_ms`, held for `for_ms`.
fn holding(tenant: &str, profile: &str, key: &str, run: &str, at_ms: i64, for_ms: i64) -> Holding {
    Holding {
        tenant: tenant.into(),
        profile: profile.into(),
        key: key.into(),
        run_id: run.into(),
        resolved_at_ms: at_ms,
        expires_at_ms: at_ms + for_ms,
    }
}

const DAY: i64 = 24 * 60 * MINUTE;

fn rq(profile: Option<&str>, include_lifted: bool, limit: u32) -> RevocationQuery {
    RevocationQuery {
        profile: profile.map(str::to_owned),
        include_lifted,
        before: None,
        limit,
    }
}

async fn revocations(s: &dyn SealedStore) {
    let (t, p) = ("r-acme", "default");
    s.create_profile(t, p, &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    s.create_profile(t, "other", &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    s.put_secret(&reference_version(
        VersionId::new(t, p, "TOKEN", 1),
        "agentcore://github-provider",
        NOW,
    ))
    .await
    .expect("put");

    // Runs that resolved TOKEN: every revocation of it lists them.
    s.record_holdings(&[
        holding(t, p, "TOKEN", "run-2", NOW, DAY),
        holding(t, p, "TOKEN", "run-1", NOW, DAY),
    ])
    .await
    .expect("hold");
    assert!(matches!(
        s.revoke(&revocation(t, p, Some("ABSENT"), NOW)).await,
        Err(StoreError::SecretNotFound { .. })
    ));
    assert!(matches!(
        s.revoke(&revocation(t, "absent", None, NOW)).await,
        Err(StoreError::ProfileNotFound { .. })
    ));
    assert!(matches!(
        s.revoke(&revocation("r-globex", p, None, NOW)).await,
        Err(StoreError::ProfileNotFound { .. })
    ));

    let key = s
        .revoke(&revocation(t, p, Some("TOKEN"), NOW + 1))
        .await
        .expect("revoke key");
    assert!(key.id.starts_with("rv_"));
    assert_eq!(key.key.as_deref(), Some("TOKEN"));
    assert!(key.hard);
    assert_eq!(key.affected_run_ids, ["run-1", "run-2"]);
    assert_eq!(key.lifted, None);
    let whole = s
        .revoke(&revocation(t, p, None, NOW + 2))
        .await
        .expect("revoke profile");
    assert_eq!(whole.key, None);
    assert!(!whole.hard);
    assert_eq!(whole.affected_run_ids, ["run-1", "run-2"]);
    let other = s
        .revoke(&revocation(t, "other", None, NOW + 3))
        .await
        .expect("revoke");
    assert_ne!(key.id, whole.id);
    assert!(other.affected_run_ids.is_empty(), "no run resolved it");

    assert_eq!(
        s.get_revocation(t, &key.id).await.expect("get"),
        Some(key.clone())
    );
    assert_eq!(
        s.get_revocation("r-globex", &key.id).await.expect("get"),
        None
    );
    let bundle = s.load_profile(t, p).await.expect("load").expect("bundle");
    assert_eq!(
        bundle.revocations,
        vec![whole.clone(), key.clone()],
        "in force, newest first"
    );

    let lift = Lift {
        by: OPERATOR.into(),
        at_ms: NOW + MINUTE,
        reason: "rotated".into(),
    };
    assert!(matches!(
        s.lift_revocation("r-globex", &key.id, &lift).await,
        Err(StoreError::RevocationNotFound { .. })
    ));
    assert!(matches!(
        s.lift_revocation(t, "rv_absent", &lift).await,
        Err(StoreError::RevocationNotFound { .. })
    ));
    let lifted = s.lift_revocation(t, &key.id, &lift).await.expect("lift");
    assert_eq!(lifted.lifted, Some(lift.clone()));
    assert_eq!(
        lifted,
        store::SecretRevocation {
            lifted: Some(lift.clone()),
            ..key.clone()
        }
    );
    assert!(matches!(
        s.lift_revocation(t, &key.id, &lift).await,
        Err(StoreError::AlreadyLifted { .. })
    ));
    let bundle = s.load_profile(t, p).await.expect("load").expect("bundle");
    assert_eq!(bundle.revocations, vec![whole.clone()]);

    let list = |tenants, q| async move { s.list_revocations(tenants, &q).await.expect("list") };
    assert_eq!(
        list(Tenants::One(t), rq(None, false, 10)).await,
        vec![other.clone(), whole.clone()]
    );
    assert_eq!(
        list(Tenants::One(t), rq(None, true, 10)).await,
        vec![other.clone(), whole.clone(), lifted.clone()]
    );
    assert_eq!(
        list(Tenants::One(t), rq(Some(p), true, 10)).await,
        vec![whole.clone(), lifted.clone()]
    );
    assert_eq!(
        list(Tenants::One(t), rq(None, true, 1)).await,
        vec![other.clone()]
    );
    assert_eq!(
        list(
            Tenants::One(t),
            RevocationQuery {
                before: Some((other.revoked_at_ms, other.id.clone())),
                ..rq(None, true, 1)
            }
        )
        .await,
        vec![whole.clone()]
    );
    assert!(
        list(Tenants::One("r-globex"), rq(None, true, 10))
            .await
            .is_empty()
    );
    let all = list(Tenants::All, rq(None, true, 100)).await;
    assert!(all.contains(&lifted) && all.contains(&other));

    // Revocations are history: they outlive the profile, and still hold if
    // its name comes back.
    s.delete_profile(t, "other").await.expect("delete");
    assert_eq!(
        s.get_revocation(t, &other.id).await.expect("get"),
        Some(other.clone())
    );
    s.create_profile(t, "other", &ProfileSpec::default(), NOW)
        .await
        .expect("recreate");
    let bundle = s
        .load_profile(t, "other")
        .await
        .expect("load")
        .expect("bundle");
    assert_eq!(bundle.revocations, vec![other]);
}

async fn holdings(s: &dyn SealedStore) {
    let (t, p, globex) = ("h-acme", "default", "h-globex");
    for (tenant, profile) in [(t, p), (t, "other"), (globex, p)] {
        s.create_profile(tenant, profile, &ProfileSpec::default(), NOW)
            .await
            .expect("create");
    }
    for (tenant, profile, key) in [
        (t, p, "KEY_A"),
        (t, p, "KEY_B"),
        (t, "other", "KEY_A"),
        (globex, p, "KEY_A"),
    ] {
        s.put_secret(&reference_version(
            VersionId::new(tenant, profile, key, 1),
            "vault://secret/app#password",
            NOW,
        ))
        .await
        .expect("put");
    }
    let held = |tenant, profile, key, at| async move {
        s.runs_holding(tenant, profile, key, at)
            .await
            .expect("runs holding")
    };
    assert!(held(t, p, None, NOW).await.is_empty());
    s.record_holdings(&[]).await.expect("an empty batch");
    assert!(matches!(
        s.record_holdings(&[holding(t, p, "KEY_A", "", NOW, 20 * MINUTE)])
            .await,
        Err(StoreError::Invalid(_))
    ));

    // One batch of several tenants, with a holding twice.
    let life = 20 * MINUTE;
    s.record_holdings(&[
        holding(t, p, "KEY_B", "run-2", NOW, life),
        holding(t, p, "KEY_A", "run-1", NOW, life),
        holding(t, p, "KEY_B", "run-1", NOW, life),
        holding(t, p, "KEY_B", "run-2", NOW, life),
        holding(t, "other", "KEY_A", "run-3", NOW, life),
        holding(globex, p, "KEY_A", "run-9", NOW, life),
    ])
    .await
    .expect("hold");
    assert_eq!(s.latest_holding_ms().await.expect("latest"), Some(NOW));
    assert_eq!(held(t, p, None, NOW).await, ["run-1", "run-2"]);
    assert_eq!(held(t, p, Some("KEY_A"), NOW).await, ["run-1"]);
    assert_eq!(held(t, p, Some("KEY_B"), NOW).await, ["run-1", "run-2"]);
    assert!(held(t, p, Some("KEY_C"), NOW).await.is_empty());
    assert_eq!(held(t, "other", None, NOW).await, ["run-3"]);
    // Another tenant's profile of the same name holds only its own runs.
    assert_eq!(held(globex, p, None, NOW).await, ["run-9"]);

    // Held until (not at) the expiry; a later resolution extends it, an
    // earlier one arriving late does not shorten it.
    let expiry = NOW + life;
    assert_eq!(held(t, p, None, expiry - 1).await, ["run-1", "run-2"]);
    assert!(held(t, p, None, expiry).await.is_empty());
    s.record_holdings(&[holding(t, p, "KEY_B", "run-2", NOW + 10 * MINUTE, life)])
        .await
        .expect("hold again");
    s.record_holdings(&[holding(t, p, "KEY_B", "run-2", NOW, life)])
        .await
        .expect("a late, older holding");
    assert_eq!(held(t, p, None, expiry).await, ["run-2"]);

    // A revocation lists the runs holding what it revokes, unexpired when it
    // is recorded, and keeps them.
    let key = s
        .revoke(&revocation(t, p, Some("KEY_A"), NOW + MINUTE))
        .await
        .expect("revoke");
    assert_eq!(key.affected_run_ids, ["run-1"]);
    let whole = s
        .revoke(&revocation(t, p, None, expiry))
        .await
        .expect("revoke");
    assert_eq!(
        whole.affected_run_ids,
        ["run-2"],
        "run-1's holdings expired"
    );
    assert_eq!(
        s.get_revocation(t, &whole.id)
            .await
            .expect("get")
            .map(|r| r.affected_run_ids),
        Some(vec!["run-2".to_owned()])
    );
    let theirs = s
        .revoke(&revocation(globex, p, None, NOW))
        .await
        .expect("revoke");
    assert_eq!(theirs.affected_run_ids, ["run-9"]);

    // Pruning deletes the expired holdings, of every tenant, and no other.
    assert_eq!(s.prune_holdings(NOW).await.expect("prune"), 0);
    assert_eq!(s.prune_holdings(expiry).await.expect("prune"), 4);
    assert_eq!(held(t, p, None, NOW).await, ["run-2"]);
    assert!(held(t, "other", None, NOW).await.is_empty());
    assert!(held(globex, p, None, NOW).await.is_empty());
    assert_eq!(s.prune_holdings(expiry).await.expect("prune"), 0);
}

/// A Resolve records its holding and then reads the revocations in force;
/// a RevokeSecret records its revocation (which lists the holders). Started
/// together, round after round: the Resolve sees the revocation, or the
/// revocation lists the run — never neither.
async fn holdings_against_revocations(s: &Arc<dyn SealedStore>) {
    const ROUNDS: usize = 60;
    let (t, p) = ("race-acme", "default");
    s.create_profile(t, p, &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    let (mut refused, mut listed) = (0, 0);
    for round in 0..ROUNDS {
        let key = format!("KEY_{round}");
        let run = format!("run-{round}");
        s.put_secret(&reference_version(
            VersionId::new(t, p, &key, 1),
            "vault://secret/app#password",
            NOW,
        ))
        .await
        .expect("put");
        let barrier = Arc::new(Barrier::new(2));
        let resolve = {
            let (s, barrier, key, run) = (
                Arc::clone(s),
                Arc::clone(&barrier),
                key.clone(),
                run.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                // Shift the start a little, differently each round.
                for _ in 0..round % 7 {
                    tokio::task::yield_now().await;
                }
                s.record_holdings(&[holding(t, p, &key, &run, NOW, DAY)])
                    .await
                    .expect("hold");
                s.list_revocations(Tenants::One(t), &rq(Some(p), false, 1000))
                    .await
                    .expect("revocations in force")
                    .iter()
                    .any(|r| r.key.as_deref() == Some(key.as_str()))
            })
        };
        let revoke = {
            let (s, barrier, key) = (Arc::clone(s), Arc::clone(&barrier), key.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                for _ in 0..(round / 7) % 5 {
                    tokio::task::yield_now().await;
                }
                s.revoke(&revocation(t, p, Some(&key), NOW))
                    .await
                    .expect("revoke")
            })
        };
        let saw_revocation = resolve.await.expect("resolve task");
        let revocation = revoke.await.expect("revoke task");
        let lists_run = revocation.affected_run_ids.contains(&run);
        assert!(
            saw_revocation || lists_run,
            "round {round}: the holder missed the revocation and the revocation missed the holder"
        );
        refused += usize::from(saw_revocation);
        listed += usize::from(lists_run);
    }
    eprintln!(
        "holdings against revocations: {ROUNDS} rounds, {refused} saw the revocation, {listed} were listed"
    );
}

async fn concurrent_writers(s: &Arc<dyn SealedStore>, master: &MasterKey) {
    let (t, p) = ("c-acme", "default");
    s.create_profile(t, p, &ProfileSpec::default(), NOW)
        .await
        .expect("create");

    // Eight writers of version 1 of one key: exactly one wins.
    let barrier = Arc::new(Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = Arc::clone(s);
            let barrier = Arc::clone(&barrier);
            let v = sealed_version(
                master,
                VersionId::new(t, p, "RACE", 1),
                format!("writer {i}").as_bytes(),
                NOW,
            );
            tokio::spawn(async move {
                barrier.wait().await;
                s.put_secret(&v).await
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => won += 1,
            Err(StoreError::VersionConflict { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(won, 1, "one writer of version 1 wins");

    // Eight writers that each retry with the next version: all land, in
    // consecutive versions.
    let barrier = Arc::new(Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = Arc::clone(s);
            let barrier = Arc::clone(&barrier);
            let master = master.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                loop {
                    let current = s
                        .current_version(t, p, "RACE")
                        .await
                        .expect("current")
                        .unwrap_or(0);
                    let v = sealed_version(
                        &master,
                        VersionId::new(t, p, "RACE", current + 1),
                        format!("retrying writer {i}").as_bytes(),
                        NOW,
                    );
                    match s.put_secret(&v).await {
                        Ok(meta) => return meta.version,
                        Err(StoreError::VersionConflict { .. }) => tokio::task::yield_now().await,
                        Err(e) => panic!("unexpected: {e}"),
                    }
                }
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.expect("task"));
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=9).collect::<Vec<_>>());
    for version in 1..=9 {
        let v = s
            .get_secret(t, p, "RACE", Some(version))
            .await
            .expect("get")
            .expect("every version kept");
        assert!(reveal(master, &v).starts_with(b"writer") || version > 1);
    }
    let profile = s.get_profile(t, p).await.expect("get").expect("profile");
    assert_eq!(profile.revision, 10, "1 + nine writes");

    // Updates racing on one expected revision: exactly one applies.
    let barrier = Arc::new(Barrier::new(6));
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let s = Arc::clone(s);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                s.update_profile(t, p, &spec(&format!("writer {i}"), &[]), Some(10), NOW)
                    .await
            })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(p) => {
                applied += 1;
                assert_eq!(p.revision, 11);
            }
            Err(StoreError::StaleRevision { actual: 11, .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(applied, 1);
}

/// Every sealed version in the store, with its value opened by `key`.
async fn open_all(s: &dyn SealedStore, key: &MasterKey) -> Vec<(VersionId, Vec<u8>)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let batch = s.sealed_versions(after.as_ref(), 7).await.expect("batch");
        let Some(last) = batch.last() else {
            return out;
        };
        after = Some(last.id.clone());
        for v in batch {
            let value = crypto::open(key, &v.id.aad(), &v.sealed)
                .unwrap_or_else(|e| panic!("{}: {e}", v.id))
                .expose()
                .to_vec();
            out.push((v.id, value));
        }
    }
}

async fn rotation(s: &dyn SealedStore, old: &MasterKey) {
    let before = open_all(s, old).await;
    let n = before.len() as u64;
    assert_eq!(n, 11, "the earlier parts left 11 sealed versions");
    let references: Vec<_> = s
        .load_profile("s-acme", "default")
        .await
        .expect("load")
        .expect("bundle")
        .secrets
        .into_iter()
        .filter(|v| matches!(v.material, SecretMaterial::Reference(_)))
        .collect();
    assert_eq!(references.len(), 1);

    // A stale re-wrap (the row is no longer under the named key) is ignored.
    let new = MasterKey::generate();
    let first = s
        .sealed_versions(None, 1)
        .await
        .expect("batch")
        .pop()
        .expect("one");
    let stale = Rewrapped {
        id: first.id.clone(),
        previous_master_key_id: "0000000000000000".into(),
        sealed: crypto::rewrap(old, &new, &first.id.aad(), &first.sealed).expect("rewrap"),
    };
    assert_eq!(s.write_rewrapped(&[stale]).await.expect("write"), 0);

    let done = rotate_master_key(s, old, &new, 3).await.expect("rotate");
    assert_eq!((done.rewrapped, done.already_current), (n, 0));
    assert_eq!(open_all(s, &new).await, before, "every secret still reads");
    let mut after: Option<VersionId> = None;
    loop {
        let batch = s.sealed_versions(after.as_ref(), 50).await.expect("batch");
        for v in &batch {
            assert_eq!(v.sealed.master_key_id, new.id());
            assert!(crypto::open(old, &v.id.aad(), &v.sealed).is_err());
        }
        match batch.into_iter().next_back() {
            Some(last) => after = Some(last.id),
            None => break,
        }
    }
    // References are not the store's to re-wrap.
    let still: Vec<_> = s
        .load_profile("s-acme", "default")
        .await
        .expect("load")
        .expect("bundle")
        .secrets
        .into_iter()
        .filter(|v| matches!(v.material, SecretMaterial::Reference(_)))
        .collect();
    assert_eq!(still, references);

    // Running it again finds nothing left to do.
    let again = rotate_master_key(s, old, &new, 3).await.expect("rotate");
    assert_eq!((again.rewrapped, again.already_current), (0, n));

    // A version under a key that is neither stops the rotation there; the
    // batches before it are kept, and running it again after the stranger is
    // gone finishes the job.
    let stranger = MasterKey::generate();
    s.create_profile("zz-last", "p", &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    s.put_secret(&sealed_version(
        &stranger,
        VersionId::new("zz-last", "p", "K", 1),
        b"sealed by a stranger",
        NOW,
    ))
    .await
    .expect("put");
    match rotate_master_key(s, &new, old, 4).await {
        Err(RotateError::Crypto { id, .. }) => assert_eq!(id.tenant, "zz-last"),
        other => panic!("rotation past a stranger: {other:?}"),
    }
    s.delete_profile("zz-last", "p").await.expect("delete");
    let back = rotate_master_key(s, &new, old, 4).await.expect("rotate");
    assert_eq!(back.rewrapped + back.already_current, n);
    assert!(back.already_current > 0, "the first batches were kept");
    assert_eq!(open_all(s, old).await, before);
}

/// Export, JSON round trip, import into an empty store, refusal to import
/// over rows, and overwrite.
async fn export_import(src: &dyn SealedStore, dst: &dyn SealedStore, master: &MasterKey) {
    let doc = src.export(NOW).await.expect("export");
    assert_eq!(doc.format, EXPORT_FORMAT);
    assert_eq!(doc.master_key_ids, [master.id()]);
    let json = serde_json::to_string(&doc).expect("json");
    assert!(!json.contains("value of i-acme"), "values stay sealed");
    assert!(!json.contains("first value"));
    let parsed: StoreExport = serde_json::from_str(&json).expect("parse");
    assert_eq!(parsed, doc);

    let counts = dst.import(&parsed, false).await.expect("import");
    assert_eq!(counts.profiles, doc.profiles.len() as u64);
    assert_eq!(
        counts.secrets,
        doc.profiles
            .iter()
            .map(|p| p.secrets.len() as u64)
            .sum::<u64>()
    );
    assert!(counts.versions > counts.secrets);
    assert_eq!(counts.revocations, doc.revocations.len() as u64);
    assert_eq!(
        dst.export(NOW).await.expect("export"),
        doc,
        "a faithful copy"
    );
    assert_eq!(open_all(dst, master).await, open_all(src, master).await);
    assert_eq!(
        dst.load_profile("r-acme", "default").await.expect("load"),
        src.load_profile("r-acme", "default").await.expect("load")
    );

    assert!(matches!(
        dst.import(&doc, false).await,
        Err(StoreError::NotEmpty)
    ));
    // Overwrite replaces profiles whole: a key added since is gone after.
    dst.put_secret(&sealed_version(
        master,
        VersionId::new("s-acme", "default", "ADDED_LATER", 1),
        b"later",
        NOW,
    ))
    .await
    .expect("put");
    dst.create_profile("new-tenant", "kept", &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    assert_eq!(dst.import(&doc, true).await.expect("overwrite"), counts);
    assert_eq!(
        dst.current_version("s-acme", "default", "ADDED_LATER")
            .await
            .expect("current"),
        None
    );
    assert!(
        dst.get_profile("new-tenant", "kept")
            .await
            .expect("get")
            .is_some(),
        "profiles not in the export are kept"
    );

    // Malformed documents are refused before anything is written.
    let mut bad = doc.clone();
    bad.format = "something.else".into();
    assert!(matches!(
        dst.import(&bad, true).await,
        Err(StoreError::Invalid(_))
    ));
    let mut bad = doc.clone();
    let secret = bad
        .profiles
        .iter_mut()
        .flat_map(|p| p.secrets.iter_mut())
        .find(|s| s.versions.len() > 1)
        .expect("a secret with versions");
    secret.versions.swap(0, 1);
    assert!(matches!(
        dst.import(&bad, true).await,
        Err(StoreError::Invalid(_))
    ));
    let mut bad = doc.clone();
    let version = bad
        .profiles
        .iter_mut()
        .flat_map(|p| p.secrets.iter_mut())
        .flat_map(|s| s.versions.iter_mut())
        .find(|v| v.sealed.is_some())
        .expect("a sealed version");
    version.reference = Some("vault://kv/x#y".into());
    assert!(matches!(
        dst.import(&bad, true).await,
        Err(StoreError::Invalid(_))
    ));
    let garbled = json.replacen("\"nonce\":\"", "\"nonce\":\"AAAA", 1);
    assert!(serde_json::from_str::<StoreExport>(&garbled).is_err());
}

/// Seals a canary value and returns it with the tenant it was stored under.
async fn plant_canary(s: &dyn SealedStore, master: &MasterKey) -> String {
    let canary = format!("CANARY-{}", hex::encode(rand::random::<[u8; 12]>()));
    s.create_profile("leak", "default", &ProfileSpec::default(), NOW)
        .await
        .expect("create");
    for version in 1..=2 {
        s.put_secret(&sealed_version(
            master,
            VersionId::new("leak", "default", "CANARY_KEY", version),
            format!("sk-{canary}-v{version}").as_bytes(),
            NOW,
        ))
        .await
        .expect("put");
    }
    canary
}

/// The canary and the encodings it could hide in.
fn canary_forms(canary: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        canary.as_bytes().to_vec(),
        hex::encode(canary).into_bytes(),
        hex::encode_upper(canary).into_bytes(),
        // Every alignment of base64 shows this middle part of the encoding.
        b64.encode(canary).as_bytes()[4..24].to_vec(),
        b64.encode(format!("-{canary}")).as_bytes()[4..24].to_vec(),
        b64.encode(format!("--{canary}")).as_bytes()[4..24].to_vec(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The bytes of the database file and its WAL and shared-memory companions.
fn db_files(db: &Path) -> Vec<(String, Vec<u8>)> {
    ["", "-wal", "-shm", "-journal"]
        .iter()
        .filter_map(|suffix| {
            let path = format!("{}{suffix}", db.display());
            std::fs::read(&path).ok().map(|bytes| (path, bytes))
        })
        .collect()
}

fn assert_no_canary(files: &[(String, Vec<u8>)], canary: &str) {
    assert!(!files.is_empty());
    assert!(
        files.iter().any(|(_, b)| contains(b, b"CANARY_KEY")),
        "the search reads the rows (the key name is there)"
    );
    for (path, bytes) in files {
        for form in canary_forms(canary) {
            assert!(
                !contains(bytes, &form),
                "{path} holds the canary as {}",
                String::from_utf8_lossy(&form)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let master = MasterKey::generate();
    let url = format!("sqlite://{}", dir.path().join("sealed.db").display());
    let s = store::open(&url).await.expect("open");
    suite(Arc::clone(&s), &master).await;
    let dst = store::open(&format!(
        "sqlite://{}",
        dir.path().join("restored.db").display()
    ))
    .await
    .expect("open");
    export_import(s.as_ref(), dst.as_ref(), &master).await;
    let before = s.export(NOW).await.expect("export");
    s.close().await;
    // Reopening keeps everything (the schema is created idempotently).
    let reopened = store::open(&url).await.expect("reopen");
    assert_eq!(reopened.export(NOW).await.expect("export"), before);
    assert!(matches!(
        store::open("mysql://nope").await,
        Err(StoreError::Url)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_file_never_holds_a_plaintext_canary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("canary.db");
    let master = MasterKey::generate();
    let s = SqliteStore::open(&db).await.expect("open");
    let canary = plant_canary(&s, &master).await;
    // Deleted and rotated-away versions must not leave it behind either.
    s.delete_secret("leak", "default", "CANARY_KEY", NOW)
        .await
        .expect("delete");
    let canary2 = plant_canary_again(&s, &master).await;
    let json = serde_json::to_vec(&s.export(NOW).await.expect("export")).expect("json");
    for form in canary_forms(&canary)
        .into_iter()
        .chain(canary_forms(&canary2))
    {
        assert!(!contains(&json, &form), "the export holds the canary");
    }
    // While open (the WAL holds the latest pages) and after closing.
    assert_no_canary(&db_files(&db), &canary);
    assert_no_canary(&db_files(&db), &canary2);
    s.close().await;
    assert_no_canary(&db_files(&db), &canary);
    assert_no_canary(&db_files(&db), &canary2);
}

async fn plant_canary_again(s: &dyn SealedStore, master: &MasterKey) -> String {
    let canary = format!("CANARY-{}", hex::encode(rand::random::<[u8; 12]>()));
    s.put_secret(&sealed_version(
        master,
        VersionId::new("leak", "default", "CANARY_KEY", 1),
        canary.as_bytes(),
        NOW,
    ))
    .await
    .expect("put");
    canary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_conforms() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let master = MasterKey::generate();
    let url = pg.create_database("sealed_conformance").await?;
    let s = store::open(&url).await?;
    suite(Arc::clone(&s), &master).await;
    let dst = store::open(&pg.create_database("sealed_restored").await?).await?;
    export_import(s.as_ref(), dst.as_ref(), &master).await;
    let before = s.export(NOW).await?;
    s.close().await;
    let reopened = store::open(&url).await?;
    assert_eq!(reopened.export(NOW).await?, before);

    // No column of any row holds the canary (bytea renders as hex).
    let leak = PgStore::open(&pg.create_database("sealed_canary").await?).await?;
    let canary = plant_canary(&leak, &master).await;
    let mut rows = Vec::new();
    for table in [
        "profiles",
        "secrets",
        "secret_versions",
        "revocations",
        "run_holdings",
    ] {
        let text: Vec<String> =
            sqlx::query_scalar(&format!("SELECT CAST(t AS TEXT) FROM {table} t"))
                .fetch_all(leak.pool())
                .await?;
        rows.push((table.to_owned(), text.join("\n").into_bytes()));
    }
    assert_no_canary(&rows, &canary);
    leak.close().await;
    Ok(())
}
