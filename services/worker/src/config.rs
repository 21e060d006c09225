//! What a worker is told: its flags, and the [`WorkerConfig`] they become
//! (which tests and benchmarks build directly).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use bulkhead_mesh::telemetry::{LogFormat, TelemetryConfig};
use bulkhead_mesh::tls::TrustBundle;
use zeroize::Zeroizing;

use crate::backoff::BackoffConfig;
use crate::run::Backend;

/// At most this many labels per worker (the dispatcher's bound).
pub const MAX_LABELS: usize = 64;
/// Label keys are 1 to this many bytes.
pub const MAX_LABEL_KEY_LEN: usize = 128;
/// Label values are at most this many bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 128;
/// The bounds of `--max-concurrent-runs`.
pub const MAX_CONCURRENT_RUNS: u32 = 1024;

/// Why a label list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label {0:?} is not k=v")]
    NotPair(String),
    #[error("label key {0:?} must be 1 to 128 bytes of [A-Za-z0-9._/-]")]
    BadKey(String),
    #[error("label {0:?} has a value longer than 128 bytes or with control characters")]
    BadValue(String),
    #[error("label key {0:?} appears twice")]
    Duplicate(String),
    #[error("more than 64 labels")]
    TooMany,
}

/// A worker's labels: a task is offered to it only if these are a superset of
/// the task's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Checks and collects `pairs` under the dispatcher's bounds.
    pub fn new<I, K, V>(pairs: I) -> Result<Self, LabelError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            let (k, v) = (k.into(), v.into());
            let key_ok = !k.is_empty()
                && k.len() <= MAX_LABEL_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
            if !key_ok {
                return Err(LabelError::BadKey(k));
            }
            if v.len() > MAX_LABEL_VALUE_LEN || v.chars().any(char::is_control) {
                return Err(LabelError::BadValue(k));
            }
            if map.insert(k.clone(), v).is_some() {
                return Err(LabelError::Duplicate(k));
            }
            if map.len() > MAX_LABELS {
                return Err(LabelError::TooMany);
            }
        }
        Ok(Self(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for Labels {
    type Err = LabelError;

    /// Parses `k=v,k2=v2` (what `--labels` takes); an empty string is no labels.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        let mut pairs = Vec::new();
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| LabelError::NotPair(item.to_owned()))?;
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Self::new(pairs)
    }
}

/// A join token: a credential, so it never prints and is wiped when dropped.
#[derive(Clone)]
pub struct JoinToken(Zeroizing<String>);

impl JoinToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(Zeroizing::new(token.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken([redacted])")
    }
}

/// Why a worker name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker name {0:?} must be 1 to 63 bytes of [a-z0-9-], starting with a letter or digit")]
pub struct NameError(String);

/// Checks a worker name (what identity accepts in EnrollWorker).
pub fn check_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError(name.to_owned()))
    }
}

/// The host's name made into a worker name, or `worker`.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    let name = name.trim_matches('-').to_owned();
    if check_name(&name).is_ok() {
        name
    } else {
        "worker".into()
    }
}

/// Where a worker's runs go when its host has a sandbox-runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The host's sandbox-runner, `host:port` (loopback).
    pub runner: String,
    /// The backend asked for, and the one the worker registers with.
    pub backend: Backend,
    /// Docker networks asked for each sandbox (NETWORK_MODE_ALLOW_LIST); the
    /// runner still allows only those its own allow-list gives the tenant.
    /// Empty: no network (NETWORK_MODE_NONE).
    pub networks: Vec<String>,
}

/// Everything a worker runs on. Build it with [`WorkerConfig::new`] and adjust
/// the public fields; the CLI builds it from [`Flags`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The dispatcher, `host:port`.
    pub dispatcher: String,
    /// The identity service, `host:port`: needed to enroll and to renew the
    /// worker's SVID. Without it an SVID given in-process is never renewed.
    pub identity: Option<String>,
    /// The trust domain's authorities.
    pub bundle: TrustBundle,
    /// Enrolls the worker when there is no valid SVID in `state_dir`.
    pub join_token: Option<JoinToken>,
    /// The worker's name, sent when enrolling.
    pub name: String,
    pub labels: Labels,
    /// How many runs it takes at once, 1 to 1024.
    pub max_concurrent_runs: u32,
    /// Where the worker keeps its key and SVID across restarts.
    pub state_dir: Option<PathBuf>,
    /// Where runs get their fresh working directories (the system temp dir
    /// when unset).
    pub work_dir: Option<PathBuf>,
    /// On shutdown, how long running tasks may go on before they are killed.
    pub shutdown_grace: Duration,
    /// After shutdown or drain, how long the worker waits for the dispatcher
    /// to acknowledge its last reports.
    pub report_ack_wait: Duration,
    /// Reconnecting to the dispatcher.
    pub reconnect: BackoffConfig,
    /// After this many refusals of its identity in a row (PERMISSION_DENIED,
    /// UNAUTHENTICATED, a TLS alert about its certificate), the worker gives up.
    pub auth_failure_limit: u32,
    /// Runs go to the host's sandbox-runner; unset: they run bare.
    pub sandbox: Option<SandboxConfig>,
}

impl WorkerConfig {
    pub fn new(dispatcher: impl Into<String>, bundle: TrustBundle) -> Self {
        Self {
            dispatcher: dispatcher.into(),
            identity: None,
            bundle,
            join_token: None,
            name: "worker".into(),
            labels: Labels::default(),
            max_concurrent_runs: 1,
            state_dir: None,
            work_dir: None,
            shutdown_grace: Duration::from_secs(30),
            report_ack_wait: Duration::from_secs(10),
            reconnect: BackoffConfig::default(),
            auth_failure_limit: 5,
            sandbox: None,
        }
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_runs == 0 || self.max_concurrent_runs > MAX_CONCURRENT_RUNS {
            return Err(ConfigError::MaxConcurrentRuns(self.max_concurrent_runs));
        }
        check_name(&self.name)?;
        if self.sandbox.is_some() && self.identity.is_none() {
            // Runs mint their JWT-SVIDs for the sandbox-runner at identity.
            return Err(ConfigError::SandboxNeedsIdentity);
        }
        if let Some(s) = &self.sandbox
            && s.networks.len() > MAX_SANDBOX_NETWORKS
        {
            return Err(ConfigError::SandboxNetworks(s.networks.len()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("max concurrent runs must be 1 to 1024, not {0}")]
    MaxConcurrentRuns(u32),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("a sandbox-runner needs the identity service's address")]
    SandboxNeedsIdentity,
    #[error("at most {MAX_SANDBOX_NETWORKS} sandbox networks, not {0}")]
    SandboxNetworks(usize),
    #[error("failed to load the ca bundle: {0}")]
    Ca(#[from] bulkhead_mesh::tls::TlsError),
}

/// The worker's command line.
#[derive(Debug, clap::Parser)]
#[command(name = "bulkhead-worker", version, about = "Bulkhead worker agent")]
pub struct Flags {
    /// The dispatcher, host:port.
    #[arg(long)]
    pub dispatcher: String,
    /// The identity service, host:port (enrollment and SVID renewal).
    #[arg(long)]
    pub identity: String,
    /// A join token made by `bulkhead identity join-token create`. Needed only
    /// when the state dir holds no valid SVID.
    #[arg(long, env = "BULKHEAD_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Labels, k=v,... (a task is offered only to workers whose labels are a
    /// superset of its own).
    #[arg(long, default_value = "", value_parser = parse_labels)]
    pub labels: Labels,
    /// The trust domain's CA certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// The worker's name (default: the host name).
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
    /// Keeps the worker's key (0600) and SVID here, reused across restarts.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// How many runs the worker takes at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONCURRENT_RUNS)))]
    pub max_concurrent_runs: u32,
    /// Where runs get their working directories (default: the temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// On SIGTERM, seconds running tasks may go on before they are killed.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for spans, e.g. http://127.0.0.1:4317.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// The host's sandbox-runner, host:port: runs go into its sandboxes.
    /// Without it runs are bare child processes with an empty environment.
    #[arg(long, value_name = "HOST:PORT")]
    pub sandbox_runner: Option<String>,
    /// The sandbox backend asked of the sandbox-runner (and registered with
    /// the dispatcher).
    #[arg(
        long,
        value_enum,
        default_value = "docker",
        requires = "sandbox_runner"
    )]
    pub sandbox_backend: Backend,
    /// A Docker network each sandbox joins (repeatable): its runs then get
    /// that network instead of none. The sandbox-runner allows only the
    /// networks its own allow-list gives the worker's tenant.
    #[arg(
        long = "sandbox-network",
        value_name = "NAME",
        requires = "sandbox_runner",
        value_parser = parse_network
    )]
    pub sandbox_networks: Vec<String>,
}

/// At most this many networks per sandbox (the runner's bound).
pub const MAX_SANDBOX_NETWORKS: usize = 8;

/// A Docker network name: 1 to 128 bytes of letters, digits, `_`, `.`, `-`.
fn parse_network(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a network name is 1 to 128 letters, digits, '_', '.' or '-'".into())
    }
}

fn parse_labels(s: &str) -> Result<Labels, LabelError> {
    s.parse()
}

fn parse_name(s: &str) -> Result<String, NameError> {
    check_name(s).map(|()| s.to_owned())
}

impl Flags {
    /// The worker's logs and span export.
    pub fn telemetry(&self) -> TelemetryConfig {
        TelemetryConfig {
            log_format: self.log_format,
            otlp_endpoint: self.otlp_endpoint.clone(),
            ..TelemetryConfig::default()
        }
    }

    pub fn into_config(self) -> Result<WorkerConfig, ConfigError> {
        let bundle = TrustBundle::from_pem_file(&self.ca)?;
        let mut config = WorkerConfig::new(self.dispatcher, bundle);
        config.identity = Some(self.identity);
        config.join_token = self.join_token.map(JoinToken::new);
        config.name = self.name.unwrap_or_else(default_name);
        config.labels = self.labels;
        config.max_concurrent_runs = self.max_concurrent_runs;
        config.state_dir = self.state_dir;
        config.work_dir = self.work_dir;
        config.shutdown_grace = Duration::from_secs(self.shutdown_grace_secs);
        config.sandbox = self.sandbox_runner.map(|runner| SandboxConfig {
            runner,
            backend: self.sandbox_backend,
            networks: self.sandbox_networks,
        });
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_labels() {
        let l: Labels = "gpu=a100,region=eu-west-1,team/x=".parse().expect("valid");
        assert_eq!(l.len(), 3);
        assert_eq!(l.get("gpu"), Some("a100"));
        assert_eq!(l.get("region"), Some("eu-west-1"));
        assert_eq!(l.get("team/x"), Some(""));
        let l: Labels = "k=a=b".parse().expect("value may hold =");
        assert_eq!(l.get("k"), Some("a=b"));
        assert!("".parse::<Labels>().expect("empty").is_empty());
    }

    #[test]
    fn refuses_bad_labels() {
        let bad = [
            ("gpu", LabelError::NotPair("gpu".into())),
            ("a=1,", LabelError::NotPair(String::new())),
            ("=x", LabelError::BadKey(String::new())),
            ("sp ace=1", LabelError::BadKey("sp ace".into())),
            ("k=é,k!=1", LabelError::BadKey("k!".into())),
            ("a=1,a=2", LabelError::Duplicate("a".into())),
        ];
        for (input, want) in bad {
            assert_eq!(input.parse::<Labels>(), Err(want), "{input:?}");
        }
        let long_key = format!("{}=v", "k".repeat(129));
        assert!(matches!(
            long_key.parse::<Labels>(),
            Err(LabelError::BadKey(_))
        ));
        let long_value = format!("k={}", "v".repeat(129));
        assert!(matches!(
            long_value.parse::<Labels>(),
            Err(LabelError::BadValue(_))
        ));
        assert!(matches!(
            Labels::new([("k", "a\nb")]),
            Err(LabelError::BadValue(_))
        ));
        let many: Vec<String> = (0..65).map(|i| format!("k{i}=v")).collect();
        assert_eq!(many.join(",").parse::<Labels>(), Err(LabelError::TooMany));
        let max: Vec<String> = (0..64).map(|i| format!("k{i}=v")).collect();
        assert_eq!(max.join(",").parse::<Labels>().map(|l| l.len()), Ok(64));
    }

    #[test]
    fn the_cli_refuses_bad_labels_names_and_run_counts() {
        let base = [
            "bulkhead-worker",
            "--dispatcher",
            "d:1",
            "--identity",
            "i:1",
            "--ca",
            "ca.pem",
        ];
        let with = |extra: &[&str]| Flags::try_parse_from(base.iter().chain(extra.iter()).copied());
        let ok = with(&["--labels", "gpu=1,zone=b", "--name", "host-1"]).expect("valid");
        assert_eq!(ok.labels.get("zone"), Some("b"));
        assert_eq!(ok.max_concurrent_runs, 1);
        assert!(ok.join_token.is_none());
        assert!(with(&["--labels", "gpu"]).is_err());
        assert!(with(&["--labels", "a=1,a=2"]).is_err());
        assert!(with(&["--name", "Host_1"]).is_err());
        assert!(with(&["--max-concurrent-runs", "0"]).is_err());
        assert!(with(&["--max-concurrent-runs", "1025"]).is_err());
        assert!(with(&["--max-concurrent-runs", "1024"]).is_ok());
    }

    #[test]
    fn the_sandbox_runner_is_chosen_by_flag() {
        let base = [
            "bulkhead-worker",
            "--dispatcher",
            "d:1",
            "--identity",
            "i:1",
            "--ca",
            "ca.pem",
        ];
        let with = |extra: &[&str]| Flags::try_parse_from(base.iter().chain(extra.iter()).copied());
        let bare = with(&[]).expect("valid");
        assert_eq!(bare.sandbox_runner, None);
        let docker = with(&["--sandbox-runner", "127.0.0.1:7404"]).expect("valid");
        assert_eq!(docker.sandbox_runner.as_deref(), Some("127.0.0.1:7404"));
        assert_eq!(docker.sandbox_backend, Backend::Docker, "docker by default");
        let process = with(&[
            "--sandbox-runner",
            "127.0.0.1:7404",
            "--sandbox-backend",
            "process",
        ])
        .expect("valid");
        assert_eq!(process.sandbox_backend, Backend::Process);
        assert!(
            with(&["--sandbox-backend", "process"]).is_err(),
            "needs a runner"
        );
        assert!(with(&["--sandbox-runner", "r:1", "--sandbox-backend", "vm"]).is_err());
        assert!(docker.sandbox_networks.is_empty(), "no network by default");
        let networked = with(&[
            "--sandbox-runner",
            "r:1",
            "--sandbox-network",
            "vendor-net",
            "--sandbox-network",
            "metrics",
        ])
        .expect("valid");
        assert_eq!(networked.sandbox_networks, ["vendor-net", "metrics"]);
        assert!(
            with(&["--sandbox-network", "vendor-net"]).is_err(),
            "needs a runner"
        );
        assert!(with(&["--sandbox-runner", "r:1", "--sandbox-network", ""]).is_err());
        assert!(with(&["--sandbox-runner", "r:1", "--sandbox-network", "a b"]).is_err());
    }

    #[test]
    fn a_sandbox_runner_needs_identity() {
        let bundle = TrustBundle::from_pem(
            bulkhead_mesh::pki::Ca::generate(
                &bulkhead_mesh::spiffe::TrustDomain::parse("bulkhead.test").expect("td"),
            )
            .expect("ca")
            .0
            .cert_pem()
            .as_bytes(),
            "ca",
        )
        .expect("bundle");
        let mut config = WorkerConfig::new("d:1", bundle);
        config.sandbox = Some(SandboxConfig {
            runner: "r:1".into(),
            backend: Backend::Docker,
            networks: Vec::new(),
        });
        assert!(matches!(
            config.validate(),
            Err(ConfigError::SandboxNeedsIdentity)
        ));
        config.identity = Some("i:1".into());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn names() {
        assert!(check_name("host-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("UPPER").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
        assert!(check_name(&default_name()).is_ok());
    }

    #[test]
    fn join_tokens_do_not_print() {
        let t = JoinToken::new("bh_jt_secret-value");
        assert!(!format!("{t:?}").contains("secret"));
    }
}
