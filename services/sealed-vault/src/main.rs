//! bulkhead-sealed-vault: tenant credentials encrypted at rest, resolved only
//! for a live run of the same tenant.

use std::path::Path;

use anyhow::{Context, bail};
use bulkhead_mesh::audit::AuditClient;
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_sealed_vault::backend::Backends;
use bulkhead_sealed_vault::crypto::{MASTER_KEY_ENV, MasterKey};
use bulkhead_sealed_vault::secret::SecretValue;
use bulkhead_sealed_vault::service::{self, Parts, SealedVaultApi};
use bulkhead_sealed_vault::{config::Config, holdings, store};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-sealed-vault",
    version,
    about = "Bulkhead sealed-vault: tenant credentials encrypted at rest, resolved only for a live run of the same tenant"
)]
struct Flags {
    #[command(flatten)]
    common: CommonFlags,
}

/// The master key: the env var wins, then the file; made only when allowed.
fn master_key(config: &Config) -> anyhow::Result<MasterKey> {
    if std::env::var_os(MASTER_KEY_ENV).is_some() {
        return MasterKey::from_env(MASTER_KEY_ENV)
            .context("failed to load the master key from the environment");
    }
    let path = config.master_key_path();
    if !path.exists() && config.create_missing_keys {
        let key = MasterKey::generate();
        key.write_new_file(&path)
            .context("failed to write a new master key")?;
        tracing::warn!(path = %path.display(), "made a new master key (create_missing_keys is for development only)");
        return Ok(key);
    }
    MasterKey::from_file(&path)
        .with_context(|| format!("failed to load the master key from {}", path.display()))
}

/// The deployment's fingerprint key: 32 bytes, hex, in a file of mode 0600.
fn fingerprint_key(path: &Path, create: bool) -> anyhow::Result<SecretValue> {
    if !path.exists() && create {
        let bytes: [u8; 32] = rand::random();
        bulkhead_mesh::pki::write_private(path, &hex::encode(bytes))
            .context("failed to write the fingerprint key")?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("failed to read {}", path.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            bail!("{} has mode {mode:o}; it must be 0600", path.display());
        }
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path)?);
    let bytes = hex::decode(text.trim()).context("the fingerprint key is not hex")?;
    Ok(SecretValue::new(bytes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let Some(config) =
        bulkhead_mesh::service::load_config("sealed-vault", &Config::default(), &flags.common)?
    else {
        return Ok(());
    };
    let _telemetry = bulkhead_mesh::telemetry::init("sealed-vault", &config.mesh.telemetry)?;
    let (identity, bundle) = config
        .mesh
        .tls
        .load()
        .context("failed to load the tls files")?;
    let (Some(audit_addr), Some(identity_addr)) =
        (&config.mesh.peers.audit, &config.mesh.peers.identity)
    else {
        bail!(
            "peers.audit and peers.identity are required: every resolution is audited and checked against identity"
        );
    };
    let master = master_key(&config)?;
    let previous = config
        .previous_master_key_files
        .iter()
        .map(|p| MasterKey::from_file(p).with_context(|| format!("failed to load {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let fingerprint = fingerprint_key(&config.fingerprint_key_path(), config.create_missing_keys)?;
    let store = store::open(&config.store_url())
        .await
        .context("failed to open the sealed store")?;
    let backends = Backends::new(config.backends).context("invalid backends configuration")?;
    let audit_channel = bulkhead_mesh::client::channel(
        audit_addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("audit".into()),
    )?;
    let audit = AuditClient::new(audit_channel.clone());
    let recover_holdings = holdings::AuditReader {
        client: AuditServiceClient::new(audit_channel),
        actor: identity.spiffe_id().to_string(),
    };
    let identity_client = IdentityServiceClient::new(bulkhead_mesh::client::channel(
        identity_addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("identity".into()),
    )?);
    let stop = CancellationToken::new();
    let revoked =
        bulkhead_mesh::service::follow_revocations(&config.mesh, &identity, &bundle, stop.clone())?;
    let api = SealedVaultApi::new(Parts {
        trust_domain: bundle.trust_domain().clone(),
        audience: identity.spiffe_id().to_string(),
        store,
        master,
        previous,
        fingerprint_key: fingerprint,
        backends,
        audit,
        identity: identity_client,
        revocations: revoked.clone(),
        reveals_per_minute: config.reveals_per_minute,
        recover_holdings: Some(recover_holdings),
    });
    // Resolve fails closed until identity's revocation list is in hand:
    // report NOT_SERVING until then.
    let synced = revoked.clone();
    let bound = MeshServer::new("sealed-vault", identity, bundle)
        .ready_when(async move {
            while !synced.synced() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .revocations(revoked)
        .add_service(service::server(api), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    stop.cancel();
    served?;
    Ok(())
}
