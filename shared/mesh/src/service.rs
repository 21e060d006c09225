//! What every service binary's `main` does, so that each `main.rs` stays a
//! dozen lines: load layered config (or dump it), install the crypto
//! provider, start telemetry, serve until a signal.

use std::path::PathBuf;

use serde::{Serialize, de::DeserializeOwned};

use crate::config::{self, CommonFlags, ConfigError};
use crate::server::{BoundServer, ServeError};

/// Loads the configuration; with `--dump-config` prints it and returns `None`.
pub fn load_config<C>(
    name: &str,
    defaults: &C,
    flags: &CommonFlags,
) -> Result<Option<C>, ConfigError>
where
    C: Serialize + DeserializeOwned,
{
    crate::tls::install_crypto_provider();
    let config = config::load(name, defaults, flags)?;
    if flags.dump_config {
        print!("{}", config::render(&config)?);
        return Ok(None);
    }
    Ok(Some(config))
}

/// Serves until SIGTERM/SIGINT. When `addr_file` is set, writes the bound
/// address there once listening (so callers may ask for port 0).
pub async fn serve(bound: BoundServer, addr_file: Option<PathBuf>) -> Result<(), ServeError> {
    if let Some(path) = addr_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bound.local_addr().to_string())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| ServeError::Bind {
                addr: bound.local_addr(),
                source,
            })?;
    }
    bound.serve(crate::shutdown::signal()).await
}

/// The revocation list this service enforces: identity's, followed over
/// WatchRevocations when `peers.identity` is configured (otherwise empty and
/// never synced). The follower stops with `stop`.
pub fn follow_revocations(
    config: &crate::config::MeshConfig,
    identity: &crate::tls::Identity,
    bundle: &crate::tls::TrustBundle,
    stop: tokio_util::sync::CancellationToken,
) -> Result<std::sync::Arc<crate::revocation::RevocationList>, crate::client::ConnectError> {
    let list = std::sync::Arc::new(crate::revocation::RevocationList::new());
    if let Some(addr) = &config.peers.identity {
        let ch = crate::client::channel(
            addr,
            Some(identity),
            bundle,
            crate::tls::ExpectServer::Service("identity".into()),
        )?;
        tokio::spawn(crate::revocation::follow(list.clone(), ch, stop));
    }
    Ok(list)
}
