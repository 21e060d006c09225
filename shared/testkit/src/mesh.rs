//! A mesh of the real service binaries for cross-service tests: a fresh PKI in a
//! temp dir, the five services on random loopback ports, health awaited, and
//! each service's log kept for failure messages.

use std::path::Path;

use anyhow::Context;
use bulkhead_cluster::{LocalMesh, MeshSpec};
use bulkhead_mesh::client::{self, MeshChannel};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::spiffe::SpiffeId;
use bulkhead_mesh::tls::{ExpectServer, Identity};

/// A running test mesh; its temp dir and processes go when it is dropped.
#[derive(Debug)]
pub struct TestMesh {
    pub mesh: LocalMesh,
    ca: Ca,
    _dir: tempfile::TempDir,
}

impl TestMesh {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a mesh after `tweak` has adjusted its spec.
    pub async fn start_with(tweak: impl FnOnce(&mut MeshSpec)) -> anyhow::Result<Self> {
        bulkhead_mesh::tls::install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-mesh-")
            .tempdir()?;
        let mut spec = MeshSpec::new(dir.path());
        spec.trust_domain = "bulkhead.test".into();
        tweak(&mut spec);
        let mesh = LocalMesh::start(&spec)
            .await
            .context("failed to start the test mesh")?;
        let ca = Ca::load_dir(&dir.path().join("pki"))?;
        Ok(Self {
            mesh,
            ca,
            _dir: dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.mesh.dir
    }

    pub fn addr(&self, service: &str) -> anyhow::Result<&str> {
        Ok(self.mesh.endpoints.address(service)?)
    }

    /// `spiffe://bulkhead.test/<path>`.
    pub fn id(&self, path: &str) -> anyhow::Result<SpiffeId> {
        Ok(self.ca.trust_domain().join(path.split('/'))?)
    }

    /// A fresh SVID for `path` (e.g. `tenant/acme/client/api`), signed by the mesh's CA.
    pub fn identity(&self, path: &str) -> anyhow::Result<Identity> {
        let svid = self.ca.issue(&self.id(path)?, &SvidOptions::default())?;
        let chain = format!("{}{}", svid.cert_pem, self.ca.cert_pem());
        Ok(Identity::from_pem(
            chain.as_bytes(),
            svid.key_pem.as_bytes(),
            path,
        )?)
    }

    /// A fresh SVID for `path` as PEM (chain, key), for clients in other
    /// languages that read certificate files.
    pub fn identity_pem(&self, path: &str) -> anyhow::Result<(String, String)> {
        let svid = self.ca.issue(&self.id(path)?, &SvidOptions::default())?;
        Ok((
            format!("{}{}", svid.cert_pem, self.ca.cert_pem()),
            svid.key_pem.clone(),
        ))
    }

    /// A channel to `service` as `who`, pinning the service's SPIFFE ID.
    pub fn channel(&self, service: &str, who: &Identity) -> anyhow::Result<MeshChannel> {
        let (_, bundle) = self.mesh.operator();
        let expect = ExpectServer::Service(service.to_owned());
        Ok(client::channel(
            self.addr(service)?,
            Some(who),
            bundle,
            expect,
        )?)
    }

    /// The last lines of every service's log, for a failure message.
    pub fn logs(&self) -> String {
        bulkhead_cluster::SERVICES
            .iter()
            .filter_map(|s| self.mesh.process(s))
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
