//! Layered configuration: defaults < TOML file < environment < flags.
//!
//! Environment variables are `BULKHEAD_<SERVICE>__<KEY>`, with `__` between
//! nested keys: `BULKHEAD_SEALED_VAULT__TLS__CA=/etc/bulkhead/ca.pem`.
//! Every binary prints the merged result with `--dump-config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::telemetry::{LogFormat, TelemetryConfig};
use crate::tls::{Identity, TlsError, TrustBundle};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot render configuration: {0}")]
    Render(#[from] toml::ser::Error),
}

/// Where a process finds its X.509-SVID and the trust bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsFiles {
    /// PEM of the trust domain's CA certificate(s).
    pub ca: PathBuf,
    /// PEM of this process's X.509-SVID (leaf first).
    pub cert: PathBuf,
    /// PEM of this process's private key (mode 0600).
    pub key: PathBuf,
    /// The trust domain, when the `ca` roots carry no SPIFFE ID (an outside
    /// root above the trust domain's intermediate CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            ca: PathBuf::from("pki/ca.pem"),
            cert: PathBuf::from("pki/svid.pem"),
            key: PathBuf::from("pki/svid.key"),
            trust_domain: None,
        }
    }
}

impl TlsFiles {
    pub fn load(&self) -> Result<(Identity, TrustBundle), TlsError> {
        let bundle = match &self.trust_domain {
            None => TrustBundle::from_pem_file(&self.ca)?,
            Some(td) => {
                let td = crate::spiffe::TrustDomain::parse(td)
                    .map_err(|e| TlsError::Bundle(format!("tls.trust_domain: {e}")))?;
                let pem = std::fs::read(&self.ca).map_err(|source| TlsError::Read {
                    path: self.ca.display().to_string(),
                    source,
                })?;
                let certs = rustls_pemfile::certs(&mut &pem[..])
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| TlsError::Read {
                        path: self.ca.display().to_string(),
                        source,
                    })?;
                TrustBundle::with_trust_domain(certs, td)?
            }
        };
        let identity = Identity::from_pem_files(&self.cert, &self.key)?;
        Ok((identity, bundle))
    }

    /// The conventional layout of `bulkhead pki`: `<dir>/ca.pem`,
    /// `<dir>/<name>.pem`, `<dir>/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            trust_domain: None,
        }
    }
}

/// Addresses of the other services, `host:port`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Peers {
    pub identity: Option<String>,
    pub audit: Option<String>,
    pub sealed_vault: Option<String>,
    pub dispatcher: Option<String>,
}

/// What every service's configuration holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshConfig {
    /// Address to serve gRPC on (mTLS).
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// Where the service keeps its embedded state.
    pub data_dir: PathBuf,
    pub telemetry: TelemetryConfig,
    pub peers: Peers,
}

impl MeshConfig {
    pub fn with_port(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            tls: TlsFiles::default(),
            data_dir: PathBuf::from("data"),
            telemetry: TelemetryConfig::default(),
            peers: Peers::default(),
        }
    }
}

/// Flags every service binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonFlags {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to serve on, e.g. 127.0.0.1:7401 (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the service's embedded state.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC endpoint for spans, e.g. http://127.0.0.1:4317.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Print the merged configuration as TOML and exit.
    #[arg(long)]
    pub dump_config: bool,
    /// Write the bound address to this file once serving (for `--listen 127.0.0.1:0`).
    #[arg(long, value_name = "PATH")]
    pub addr_file: Option<PathBuf>,
}

#[derive(Serialize)]
struct FlagLayer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry: Option<TelemetryFlags<'a>>,
}

#[derive(Serialize)]
struct TelemetryFlags<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<&'a str>,
}

/// The environment prefix of a service: `BULKHEAD_SEALED_VAULT__` for `sealed-vault`.
pub fn env_prefix(service: &str) -> String {
    format!(
        "BULKHEAD_{}__",
        service.to_ascii_uppercase().replace('-', "_")
    )
}

/// Merges defaults < file < env < flags into `T`, whose `mesh` part the common
/// flags override (so `T` must have a `#[serde(flatten)]`ed or top-level
/// `listen`, `data_dir` and `telemetry`).
pub fn load<T>(service: &str, defaults: &T, flags: &CommonFlags) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned,
{
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = &flags.config {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.clone()));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    fig = fig.merge(Env::prefixed(&env_prefix(service)).split("__"));
    let telemetry =
        (flags.log_format.is_some() || flags.otlp_endpoint.is_some()).then_some(TelemetryFlags {
            log_format: flags.log_format,
            otlp_endpoint: flags.otlp_endpoint.as_deref(),
        });
    fig = fig.merge(Serialized::defaults(FlagLayer {
        listen: flags.listen,
        data_dir: flags.data_dir.as_deref(),
        telemetry,
    }));
    fig.extract().map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// Renders a configuration as TOML, for `--dump-config`.
pub fn render<T: Serialize>(config: &T) -> Result<String, ConfigError> {
    Ok(toml::to_string_pretty(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Cfg {
        #[serde(flatten)]
        mesh: MeshConfig,
        knob: u32,
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn layers_merge_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nknob = 2\n[telemetry]\nlog_filter = \"debug\"\n",
        )
        .expect("write");
        let defaults = Cfg {
            mesh: MeshConfig::with_port(7000),
            knob: 1,
        };
        // Jail serializes environment changes across tests and restores them.
        figment::Jail::expect_with(|jail| {
            jail.set_env("BULKHEAD_CFG_TEST__KNOB", "3");
            jail.set_env("BULKHEAD_CFG_TEST__TELEMETRY__LOG_FILTER", "warn");
            let flags = CommonFlags {
                config: Some(file.clone()),
                listen: Some("127.0.0.1:9100".parse().expect("addr")),
                ..Default::default()
            };
            let c: Cfg = load("cfg-test", &defaults, &flags).expect("load");
            assert_eq!(c.knob, 3, "env beats file");
            assert_eq!(
                c.mesh.telemetry.log_filter, "warn",
                "env beats file, nested"
            );
            assert_eq!(c.mesh.listen.port(), 9100, "flag beats file");
            let no_flags = CommonFlags {
                config: Some(file.clone()),
                ..Default::default()
            };
            let c: Cfg = load("cfg-test", &defaults, &no_flags).expect("load");
            assert_eq!(c.mesh.listen.port(), 9000, "file beats default");
            let rendered = render(&c).expect("render");
            assert!(rendered.contains("knob = 3"), "{rendered}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let flags = CommonFlags {
            config: Some(PathBuf::from("/nonexistent/bulkhead.toml")),
            ..Default::default()
        };
        let err = load("x", &MeshConfig::with_port(1), &flags).expect_err("missing file");
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }
}
