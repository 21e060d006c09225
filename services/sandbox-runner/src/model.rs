//! The runner's domain types, and the conversions from the generated request
//! types that check every bound (generated types stop at the handler).

use std::time::{Duration, SystemTime};

use bulkhead_mesh::Error;
use bulkhead_proto::sandbox::v1 as pb;
use bulkhead_proto::sealed::v1 as sealed_pb;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Largest JWT-SVID accepted.
pub const MAX_TOKEN: usize = 8 * 1024;
/// Largest payload given to the agent on stdin.
pub const MAX_PAYLOAD: usize = 1 << 20;
pub const MAX_ARGS: usize = 256;
pub const MAX_ARGV_BYTES: usize = 64 * 1024;
pub const MAX_IMAGE: usize = 512;
pub const MAX_KEYS: usize = 256;
pub const MAX_NETWORKS: usize = 8;
pub const MIN_MEMORY: u64 = 16 << 20;

/// How a sandbox is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Docker,
    Process,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Docker => "docker",
            BackendKind::Process => "process",
        }
    }

    pub fn to_pb(self) -> pb::SandboxBackend {
        match self {
            BackendKind::Docker => pb::SandboxBackend::Docker,
            BackendKind::Process => pb::SandboxBackend::Process,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    None,
    AllowList,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub mode: NetworkMode,
    pub allowed: Vec<String>,
}

impl Network {
    pub fn to_pb(&self) -> pb::NetworkPolicy {
        pb::NetworkPolicy {
            mode: match self.mode {
                NetworkMode::None => pb::NetworkMode::None,
                NetworkMode::AllowList => pb::NetworkMode::AllowList,
            } as i32,
            allowed_networks: self.allowed.clone(),
        }
    }
}

/// Limits as requested: zero fields take the runner's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestedLimits {
    pub memory_bytes: u64,
    pub cpu_millis: u32,
    pub pids: u32,
    pub timeout: Option<Duration>,
}

/// Limits as applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_millis: u32,
    pub pids: u32,
    pub timeout: Duration,
}

impl Limits {
    pub fn to_pb(&self) -> pb::Limits {
        pb::Limits {
            memory_bytes: self.memory_bytes,
            cpu_millis: self.cpu_millis,
            pids: self.pids,
            timeout: Some(prost_types::Duration {
                seconds: i64::try_from(self.timeout.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(self.timeout.subsec_nanos()).unwrap_or(0),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Running,
    Exited,
    Released,
}

impl State {
    pub fn to_pb(self) -> pb::SandboxState {
        match self {
            State::Starting => pb::SandboxState::Starting,
            State::Running => pb::SandboxState::Running,
            State::Exited => pb::SandboxState::Exited,
            State::Released => pb::SandboxState::Released,
        }
    }

    pub fn from_pb(s: pb::SandboxState) -> Option<Self> {
        match s {
            pb::SandboxState::Unspecified => None,
            pb::SandboxState::Starting => Some(State::Starting),
            pb::SandboxState::Running => Some(State::Running),
            pb::SandboxState::Exited => Some(State::Exited),
            pb::SandboxState::Released => Some(State::Released),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Exited,
    TimedOut,
    OomKilled,
    Revoked,
    Released,
    Failed,
}

impl ExitReason {
    pub fn to_pb(self) -> pb::ExitReason {
        match self {
            ExitReason::Exited => pb::ExitReason::Exited,
            ExitReason::TimedOut => pb::ExitReason::TimedOut,
            ExitReason::OomKilled => pb::ExitReason::OomKilled,
            ExitReason::Revoked => pb::ExitReason::Revoked,
            ExitReason::Released => pb::ExitReason::Released,
            ExitReason::Failed => pb::ExitReason::Failed,
        }
    }
}

/// How a sandbox's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
    pub code: i32,
    pub signal: i32,
    /// Redacted, at most 512 bytes.
    pub message: String,
    pub at: SystemTime,
}

impl Exit {
    pub fn to_pb(&self) -> pb::ExitStatus {
        pb::ExitStatus {
            reason: self.reason.to_pb() as i32,
            exit_code: self.code,
            signal: self.signal,
            message: self.message.clone(),
            exited_at: Some(timestamp(self.at)),
        }
    }
}

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub sandbox_destroyed: bool,
    pub files_removed: bool,
    pub credentials_zeroized: bool,
    pub zeroized_values: u32,
    pub scrubbed_keys: Vec<String>,
    pub run_identity_revoked: bool,
    pub audit_sequence: u64,
    pub released_at: SystemTime,
}

impl ScrubReport {
    pub fn to_pb(&self) -> pb::ScrubReport {
        pb::ScrubReport {
            sandbox_destroyed: self.sandbox_destroyed,
            files_removed: self.files_removed,
            credentials_zeroized: self.credentials_zeroized,
            zeroized_values: self.zeroized_values,
            scrubbed_keys: self.scrubbed_keys.clone(),
            run_identity_revoked: self.run_identity_revoked,
            audit_sequence: self.audit_sequence,
            released_at: Some(timestamp(self.released_at)),
        }
    }
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A StartSandbox request, checked.
pub struct StartRequest {
    pub tenant: String,
    pub run_jwt_svid: Zeroizing<String>,
    pub task_id: String,
    pub image: String,
    pub command: Vec<String>,
    pub cascade: Option<sealed_pb::Cascade>,
    pub agent: String,
    pub tool: String,
    pub secret_keys: Vec<String>,
    pub payload: bytes::Bytes,
    pub limits: RequestedLimits,
    pub network: Network,
    pub backend: Option<BackendKind>,
}

impl std::fmt::Debug for StartRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartRequest")
            .field("tenant", &self.tenant)
            .field("run_jwt_svid", &"[redacted]")
            .field("task_id", &self.task_id)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("agent", &self.agent)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Tenant names: 1 to 63 bytes of [a-z0-9-], not starting with `-`.
pub fn valid_tenant(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Ids minted by Bulkhead: 1 to 64 bytes of [A-Za-z0-9_-].
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Environment names: 1 to 128 bytes of [A-Za-z0-9_], not starting with a digit.
pub fn valid_key(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// A tenant field that may be empty (a pool run), else a tenant name.
pub fn check_tenant_field(tenant: &str) -> Result<(), Error> {
    if tenant.is_empty() || valid_tenant(tenant) {
        Ok(())
    } else {
        Err(Error::invalid("tenant", "1 to 63 bytes of [a-z0-9-]"))
    }
}

pub fn check_sandbox_id(id: &str) -> Result<(), Error> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Error::invalid(
            "sandbox_id",
            "1 to 64 bytes of [A-Za-z0-9_-]",
        ))
    }
}

fn duration(
    field: &'static str,
    d: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    let d = Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs());
    if d.is_zero() {
        return Ok(None);
    }
    if d < Duration::from_secs(1) || d > Duration::from_secs(24 * 3600) {
        return Err(Error::invalid(field, "1 second to 24 hours"));
    }
    Ok(Some(d))
}

impl TryFrom<pb::StartSandboxRequest> for StartRequest {
    type Error = Error;

    fn try_from(r: pb::StartSandboxRequest) -> Result<Self, Error> {
        check_tenant_field(&r.tenant)?;
        let token = Zeroizing::new(r.run_jwt_svid);
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(Error::invalid("run_jwt_svid", "1 byte to 8 KiB"));
        }
        if !r.task_id.is_empty() && !valid_id(&r.task_id) {
            return Err(Error::invalid("task_id", "1 to 64 bytes of [A-Za-z0-9_-]"));
        }
        // Empty: the assignment's (the runner takes image, command, cascade,
        // agent, tool, keys and payload from the dispatcher's assignment).
        if r.image.len() > MAX_IMAGE {
            return Err(Error::invalid("image", "at most 512 bytes"));
        }
        if r.image.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(Error::invalid("image", "no spaces or control characters"));
        }
        if r.command.len() > MAX_ARGS {
            return Err(Error::invalid("command", "at most 256 arguments"));
        }
        if r.command.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES {
            return Err(Error::invalid("command", "at most 64 KiB in total"));
        }
        if r.command.iter().any(|a| a.contains('\0')) {
            return Err(Error::invalid("command", "no NUL bytes"));
        }
        if r.agent.len() > 64 {
            return Err(Error::invalid("agent", "at most 64 bytes"));
        }
        if r.tool.len() > 64 {
            return Err(Error::invalid("tool", "at most 64 bytes"));
        }
        if r.secret_keys.len() > MAX_KEYS {
            return Err(Error::invalid("secret_keys", "at most 256"));
        }
        if r.secret_keys.iter().any(|k| !valid_key(k)) {
            return Err(Error::invalid(
                "secret_keys",
                "environment names: [A-Za-z_][A-Za-z0-9_]*, at most 128 bytes",
            ));
        }
        if r.payload.len() > MAX_PAYLOAD {
            return Err(Error::invalid("payload", "at most 1 MiB"));
        }
        if r.tenant.is_empty() && r.cascade.is_some() {
            return Err(Error::invalid(
                "cascade",
                "a run of an org-global pool task has no cascade",
            ));
        }
        let l = r.limits.unwrap_or_default();
        if l.memory_bytes != 0 && l.memory_bytes < MIN_MEMORY {
            return Err(Error::invalid("limits.memory_bytes", "at least 16 MiB"));
        }
        let limits = RequestedLimits {
            memory_bytes: l.memory_bytes,
            cpu_millis: l.cpu_millis,
            pids: l.pids,
            timeout: duration("limits.timeout", l.timeout)?,
        };
        let n = r.network.unwrap_or_default();
        let mode = match pb::NetworkMode::try_from(n.mode) {
            Ok(pb::NetworkMode::Unspecified | pb::NetworkMode::None) => NetworkMode::None,
            Ok(pb::NetworkMode::AllowList) => NetworkMode::AllowList,
            Err(_) => return Err(Error::invalid("network.mode", "unknown mode")),
        };
        if mode == NetworkMode::None && !n.allowed_networks.is_empty() {
            return Err(Error::invalid(
                "network.allowed_networks",
                "only with NETWORK_MODE_ALLOW_LIST",
            ));
        }
        if mode == NetworkMode::AllowList && n.allowed_networks.is_empty() {
            return Err(Error::invalid(
                "network.allowed_networks",
                "NETWORK_MODE_ALLOW_LIST needs at least one network",
            ));
        }
        if n.allowed_networks.len() > MAX_NETWORKS
            || n.allowed_networks
                .iter()
                .any(|x| x.is_empty() || x.len() > 128)
        {
            return Err(Error::invalid(
                "network.allowed_networks",
                "at most 8 names of 1 to 128 bytes",
            ));
        }
        let backend = match pb::SandboxBackend::try_from(r.backend) {
            Ok(pb::SandboxBackend::Unspecified) => None,
            Ok(pb::SandboxBackend::Docker) => Some(BackendKind::Docker),
            Ok(pb::SandboxBackend::Process) => Some(BackendKind::Process),
            Err(_) => return Err(Error::invalid("backend", "unknown backend")),
        };
        Ok(StartRequest {
            tenant: r.tenant,
            run_jwt_svid: token,
            task_id: r.task_id,
            image: r.image,
            command: r.command,
            cascade: r.cascade,
            agent: r.agent,
            tool: r.tool,
            secret_keys: r.secret_keys,
            payload: r.payload,
            limits,
            network: Network {
                mode,
                allowed: n.allowed_networks,
            },
            backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> pb::StartSandboxRequest {
        pb::StartSandboxRequest {
            tenant: "acme".into(),
            run_jwt_svid: "a.b.c".into(),
            task_id: "t1".into(),
            image: "agent:1".into(),
            command: vec!["sh".into()],
            ..Default::default()
        }
    }

    fn field(r: pb::StartSandboxRequest) -> String {
        match StartRequest::try_from(r) {
            Err(Error::InvalidArgument { field, .. }) => field.to_owned(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_field_is_named() {
        assert!(StartRequest::try_from(ok()).is_ok());
        assert_eq!(
            field(pb::StartSandboxRequest {
                tenant: "Acme".into(),
                ..ok()
            }),
            "tenant"
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                run_jwt_svid: String::new(),
                ..ok()
            }),
            "run_jwt_svid"
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                image: "a b".into(),
                ..ok()
            }),
            "image"
        );
        // Empty fields take the assignment's.
        assert!(
            StartRequest::try_from(pb::StartSandboxRequest {
                image: String::new(),
                command: Vec::new(),
                ..ok()
            })
            .is_ok()
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                task_id: "a/b".into(),
                ..ok()
            }),
            "task_id"
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                command: vec!["x".into(); 257],
                ..ok()
            }),
            "command"
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                secret_keys: vec!["1X".into()],
                ..ok()
            }),
            "secret_keys"
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                payload: vec![0; MAX_PAYLOAD + 1].into(),
                ..ok()
            }),
            "payload"
        );
        let limits = |l: pb::Limits| pb::StartSandboxRequest {
            limits: Some(l),
            ..ok()
        };
        assert_eq!(
            field(limits(pb::Limits {
                memory_bytes: 1024,
                ..Default::default()
            })),
            "limits.memory_bytes"
        );
        assert_eq!(
            field(limits(pb::Limits {
                timeout: Some(prost_types::Duration {
                    seconds: 90_000,
                    nanos: 0
                }),
                ..Default::default()
            })),
            "limits.timeout"
        );
        let net = |mode: pb::NetworkMode, names: &[&str]| pb::StartSandboxRequest {
            network: Some(pb::NetworkPolicy {
                mode: mode as i32,
                allowed_networks: names.iter().map(|s| (*s).to_owned()).collect(),
            }),
            ..ok()
        };
        assert_eq!(
            field(net(pb::NetworkMode::None, &["x"])),
            "network.allowed_networks"
        );
        assert_eq!(
            field(net(pb::NetworkMode::AllowList, &[])),
            "network.allowed_networks"
        );
        assert!(StartRequest::try_from(net(pb::NetworkMode::AllowList, &["x"])).is_ok());
        assert_eq!(
            field(pb::StartSandboxRequest { backend: 9, ..ok() }),
            "backend"
        );
        assert_eq!(
            field(pb::StartSandboxRequest {
                tenant: String::new(),
                cascade: Some(Default::default()),
                ..ok()
            }),
            "cascade"
        );
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let r = StartRequest::try_from(ok()).expect("valid");
        assert!(!format!("{r:?}").contains("a.b.c"));
    }
}
