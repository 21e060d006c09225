//! `bulkhead profile` and `bulkhead secret`: the operator's verbs on
//! sealed-vault.
//!
//! - `profile create|update|get|list|delete`: a tenant's profiles, their
//!   non-secret settings and their secrets' metadata (never values).
//! - `secret put`: writes a value, read from stdin or a private file, or a
//!   backend reference. There is no flag that takes a value: a command line is
//!   visible to every user of the host (`ps`, `/proc/PID/cmdline`) and kept in
//!   shell history.
//! - `secret reveal`: the one verb that prints a value, to stdout alone, for a
//!   reason that audit records.
//! - `secret delete|revoke|lift|revocations`.
//!
//! Values live in zeroizing buffers here, read without std's stdin buffer and
//! never grown (a grown `Vec` leaves its old block behind, unzeroed). The
//! gRPC layer's own encode and decode buffers are out of our reach: they are
//! freed, not zeroed.
//!
//! Every verb finds the mesh through `--dir DIR` (or `BULKHEAD_DIR`) and calls
//! sealed-vault over mTLS as the operator named in `DIR/endpoints.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal as _, Read, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bulkhead_cluster::Endpoints;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::sealed::v1 as pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use crate::audit::MeshDir;

/// The largest value sealed-vault stores.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// The largest page the list RPCs serve.
const MAX_PAGE: u32 = 1000;
/// How many pages a listing follows before it gives up.
const MAX_PAGES: usize = 10_000;

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Creates a profile: settings only; add secrets with `secret put`.
    Create {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile's name, unique in its tenant.
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Changes a profile's settings: each setting given replaces the current
    /// one (a repeated flag replaces the whole list), the others stay as they
    /// are. Secrets are not touched.
    Update {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile's name.
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Empties a setting. Clearing `tools` lifts the tool ACL: every tool
        /// then receives every key.
        #[arg(long, value_enum, value_name = "SETTING")]
        clear: Vec<Setting>,
        /// Apply only if the profile is still at this revision (as `profile
        /// get` shows it). Without it, the update applies to the revision it
        /// read, and fails if the profile changes in between.
        #[arg(long, value_name = "N")]
        expected_revision: Option<u64>,
    },
    /// Prints a profile: its settings and its secrets' metadata (backend,
    /// version, fingerprint, revocation), never their values.
    Get {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Lists profiles, by tenant then name.
    List {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only this tenant's profiles (default: every tenant's).
        #[arg(long)]
        tenant: Option<String>,
        /// Only profiles carrying this tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Deletes a profile and every secret in it. Their data keys are
    /// destroyed: the values cannot be recovered.
    Delete {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// A profile's non-secret settings, as flags.
#[derive(Debug, Clone, Default, Args)]
pub struct SpecArgs {
    /// Free text (at most 1024 bytes).
    #[arg(long)]
    pub description: Option<String>,
    /// Who owns the profile: a team, a person, an email.
    #[arg(long)]
    pub owner: Option<String>,
    /// A tag for search; repeat for more.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// An agent allowed to use the profile; repeat for more. None: every
    /// approved agent.
    #[arg(long = "agent", value_name = "AGENT")]
    pub agents: Vec<String>,
    /// A non-secret setting given to runs (a knob such as DEBUG=1); repeat for
    /// more. Never a secret: settings are shown to the dispatcher, workers and
    /// previews, and a command line is visible to every user of this host.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The secret keys a tool may receive; repeat for more tools. Once any tool
    /// is listed, a tool not listed receives no secret of the profile.
    #[arg(long = "tool", value_name = "TOOL=KEY,...", value_parser = parse_tool)]
    pub tools: Vec<(String, Vec<String>)>,
}

/// A list setting `profile update --clear` empties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Setting {
    /// The tags.
    Tags,
    /// The allowed agents (then every approved agent may use the profile).
    Agents,
    /// The non-secret settings.
    Env,
    /// The tool ACL (then every tool receives every key).
    Tools,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Writes a secret into a profile, or rotates it (its version goes up by
    /// one). The value is read from stdin until end of file, or from --file;
    /// one trailing newline is dropped (`\n` or `\r\n`), and an empty value is
    /// refused. There is deliberately no way to give the value on the command
    /// line. Prints the key, its version and its fingerprint.
    ///
    /// Examples:
    ///   pass show acme/anthropic | bulkhead secret put --tenant acme --profile default ANTHROPIC_API_KEY
    ///   bulkhead secret put --tenant acme --profile default ANTHROPIC_API_KEY --file ./key   (mode 0600)
    ///   bulkhead secret put --tenant acme --profile default DB_PASSWORD --reference vault://kv/acme/db#password
    #[command(verbatim_doc_comment)]
    #[command(group(ArgGroup::new("source").args(["file", "reference"])))]
    Put {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile to write into; it must exist.
        #[arg(long)]
        profile: String,
        /// The key name: an environment variable name.
        #[arg(value_name = "KEY")]
        key: String,
        /// Read the value from this file instead of stdin. Refused when the
        /// file is readable by its group or others (chmod 600 it).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Read --file even when its group or others may read it.
        #[arg(long, requires = "file")]
        allow_loose_file: bool,
        /// Store a reference to a backend instead of a value:
        /// vault://MOUNT/PATH#FIELD, aws-sm://SECRET_ID[#JSON_KEY] or
        /// agentcore://PROVIDER. Nothing is read from stdin.
        #[arg(long, value_name = "REF")]
        reference: Option<String>,
    },
    /// Deletes a secret from a profile and destroys its data key.
    Delete {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile.
        #[arg(long)]
        profile: String,
        /// The key name.
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Writes a secret's value to stdout, exactly (no trailing newline), for a
    /// pipe. Recorded in audit with the reason; rate limited per operator.
    Reveal {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile.
        #[arg(long)]
        profile: String,
        /// The key name.
        #[arg(value_name = "KEY")]
        key: String,
        /// Why you need the value; recorded in audit (1 to 512 bytes).
        #[arg(long)]
        reason: String,
    },
    /// Revokes one key of a profile, or the whole profile: runs can no longer
    /// resolve it and tasks naming it are refused at enqueue. Prints the
    /// revocation's id and the runs that hold the secret.
    #[command(group(ArgGroup::new("what").required(true).args(["key", "whole_profile"])))]
    Revoke {
        #[command(flatten)]
        mesh: MeshDir,
        /// The profile's tenant.
        #[arg(long)]
        tenant: String,
        /// The profile.
        #[arg(long)]
        profile: String,
        /// The key to revoke.
        #[arg(value_name = "KEY")]
        key: Option<String>,
        /// Revoke every key of the profile.
        #[arg(long)]
        whole_profile: bool,
        /// Why; recorded in audit and shown in the revocation list.
        #[arg(long)]
        reason: String,
        /// Also kill the sandboxes of the runs that hold the secret, now
        /// (default: runs that already hold it may finish).
        #[arg(long)]
        hard: bool,
    },
    /// Lifts a revocation: the key resolves again. Runs killed by a hard
    /// revocation stay revoked.
    Lift {
        #[command(flatten)]
        mesh: MeshDir,
        /// The revocation's tenant.
        #[arg(long)]
        tenant: String,
        /// The revocation's id (as `secret revocations` shows it).
        #[arg(value_name = "REVOCATION_ID")]
        revocation_id: String,
        /// Why; recorded in audit.
        #[arg(long)]
        reason: String,
    },
    /// Lists secret revocations in force, newest first.
    Revocations {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only this tenant's (default: every tenant's).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this profile's.
        #[arg(long)]
        profile: Option<String>,
        /// Include lifted revocations.
        #[arg(long)]
        all: bool,
    },
}

pub async fn run_profile(cmd: ProfileCommand) -> anyhow::Result<()> {
    match cmd {
        ProfileCommand::Create {
            mesh,
            tenant,
            name,
            spec,
        } => create_profile(&mesh.dir, tenant, name, spec).await,
        ProfileCommand::Update {
            mesh,
            tenant,
            name,
            spec,
            clear,
            expected_revision,
        } => update_profile(&mesh.dir, tenant, name, spec, &clear, expected_revision).await,
        ProfileCommand::Get { mesh, tenant, name } => get_profile(&mesh.dir, tenant, name).await,
        ProfileCommand::List { mesh, tenant, tag } => {
            list_profiles(
                &mesh.dir,
                tenant.unwrap_or_default(),
                tag.unwrap_or_default(),
            )
            .await
        }
        ProfileCommand::Delete { mesh, tenant, name } => {
            delete_profile(&mesh.dir, tenant, name).await
        }
    }
}

pub async fn run_secret(cmd: SecretCommand) -> anyhow::Result<()> {
    match cmd {
        SecretCommand::Put {
            mesh,
            tenant,
            profile,
            key,
            file,
            allow_loose_file,
            reference,
        } => {
            let source = match (reference, file) {
                (Some(r), _) => pb::put_secret_request::Source::Reference(r),
                (None, Some(path)) => value_source(read_file(&path, allow_loose_file)?),
                (None, None) => value_source(read_stdin()?),
            };
            put_secret(
                &mesh.dir,
                pb::PutSecretRequest {
                    tenant,
                    profile,
                    key,
                    source: Some(source),
                },
            )
            .await
        }
        SecretCommand::Delete {
            mesh,
            tenant,
            profile,
            key,
        } => delete_secret(&mesh.dir, tenant, profile, key).await,
        SecretCommand::Reveal {
            mesh,
            tenant,
            profile,
            key,
            reason,
        } => {
            reveal_secret(
                &mesh.dir,
                pb::RevealSecretRequest {
                    tenant,
                    profile,
                    key,
                    reason,
                },
            )
            .await
        }
        SecretCommand::Revoke {
            mesh,
            tenant,
            profile,
            key,
            whole_profile: _,
            reason,
            hard,
        } => {
            // clap requires exactly one of KEY and --whole-profile.
            revoke(
                &mesh.dir,
                pb::RevokeSecretRequest {
                    tenant,
                    profile,
                    key: key.unwrap_or_default(),
                    hard,
                    reason,
                },
            )
            .await
        }
        SecretCommand::Lift {
            mesh,
            tenant,
            revocation_id,
            reason,
        } => {
            lift(
                &mesh.dir,
                pb::LiftRevocationRequest {
                    tenant,
                    revocation_id,
                    reason,
                },
            )
            .await
        }
        SecretCommand::Revocations {
            mesh,
            tenant,
            profile,
            all,
        } => {
            revocations(
                &mesh.dir,
                tenant.unwrap_or_default(),
                profile.unwrap_or_default(),
                all,
            )
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// Flags.

/// `KEY=VALUE`: the value may hold `=`, the key may not be empty.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `TOOL=KEY1,KEY2`: a tool and the secret keys it may receive (possibly none).
pub fn parse_tool(s: &str) -> Result<(String, Vec<String>), String> {
    match s.split_once('=') {
        Some((tool, keys)) if !tool.is_empty() => Ok((
            tool.to_owned(),
            keys.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
        )),
        _ => Err(format!("{s:?} is not TOOL=KEY1,KEY2")),
    }
}

impl SpecArgs {
    fn is_empty(&self) -> bool {
        self.description.is_none()
            && self.owner.is_none()
            && self.tags.is_empty()
            && self.agents.is_empty()
            && self.env.is_empty()
            && self.tools.is_empty()
    }

    fn env_map(&self) -> anyhow::Result<std::collections::HashMap<String, String>> {
        let mut map = std::collections::HashMap::new();
        for (k, v) in &self.env {
            if map.insert(k.clone(), v.clone()).is_some() {
                bail!("--env {k} is given twice");
            }
        }
        Ok(map)
    }

    fn tool_map(&self) -> anyhow::Result<std::collections::HashMap<String, pb::ToolKeys>> {
        let mut map = std::collections::HashMap::new();
        for (tool, keys) in &self.tools {
            let keys = pb::ToolKeys { keys: keys.clone() };
            if map.insert(tool.clone(), keys).is_some() {
                bail!("--tool {tool} is given twice (list its keys once: --tool {tool}=KEY1,KEY2)");
            }
        }
        Ok(map)
    }

    /// The spec these flags describe, for a new profile.
    pub fn to_spec(&self) -> anyhow::Result<pb::ProfileSpec> {
        let mut spec = pb::ProfileSpec::default();
        self.apply(&mut spec, &[])?;
        Ok(spec)
    }

    /// Applies the flags given (and `clear`) over `spec`; what is not named
    /// stays as it is.
    pub fn apply(&self, spec: &mut pb::ProfileSpec, clear: &[Setting]) -> anyhow::Result<()> {
        for (setting, given, flag) in [
            (Setting::Tags, !self.tags.is_empty(), "--tag"),
            (Setting::Agents, !self.agents.is_empty(), "--agent"),
            (Setting::Env, !self.env.is_empty(), "--env"),
            (Setting::Tools, !self.tools.is_empty(), "--tool"),
        ] {
            if given && clear.contains(&setting) {
                bail!(
                    "--clear {} and {flag} contradict each other ({flag} alone replaces the list)",
                    setting_name(setting)
                );
            }
        }
        if let Some(d) = &self.description {
            spec.description.clone_from(d);
        }
        if let Some(o) = &self.owner {
            spec.owner.clone_from(o);
        }
        if !self.tags.is_empty() || clear.contains(&Setting::Tags) {
            spec.tags.clone_from(&self.tags);
        }
        if !self.agents.is_empty() || clear.contains(&Setting::Agents) {
            spec.allowed_agents.clone_from(&self.agents);
        }
        if !self.env.is_empty() || clear.contains(&Setting::Env) {
            spec.env = self.env_map()?;
        }
        if !self.tools.is_empty() || clear.contains(&Setting::Tools) {
            spec.tool_acl = self.tool_map()?;
        }
        Ok(())
    }
}

fn setting_name(s: Setting) -> &'static str {
    match s {
        Setting::Tags => "tags",
        Setting::Agents => "agents",
        Setting::Env => "env",
        Setting::Tools => "tools",
    }
}

// ---------------------------------------------------------------------------
// Reading values.

/// Reads a secret value from `r` until end of input, into one buffer that is
/// never grown and is zeroed when dropped. Drops one trailing newline (`\n` or
/// `\r\n`); refuses an empty value and one larger than [`MAX_VALUE_LEN`].
/// Errors name `from`, never the value.
pub fn read_value(mut r: impl Read, from: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    // Room for the largest value, its newline, and one byte that proves the
    // input is too long.
    let room = MAX_VALUE_LEN + 2;
    let mut buf = Zeroizing::new(vec![0_u8; room + 1]);
    let mut len = 0;
    while len < buf.len() {
        match r.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("failed to read {from}")));
            }
        }
    }
    if len > room {
        bail!(
            "the value in {from} is larger than {} KiB, the most sealed-vault stores",
            MAX_VALUE_LEN / 1024
        );
    }
    if buf[..len].ends_with(b"\r\n") {
        len -= 2;
    } else if buf[..len].ends_with(b"\n") {
        len -= 1;
    }
    if len == 0 {
        bail!("{from} holds no value (empty, or only a newline): nothing was written");
    }
    if len > MAX_VALUE_LEN {
        bail!(
            "the value in {from} is larger than {} KiB, the most sealed-vault stores",
            MAX_VALUE_LEN / 1024
        );
    }
    // Shrinking keeps the allocation (and zeroizing zeroes all of it).
    buf.truncate(len);
    Ok(buf)
}

/// The value piped into stdin. Refused when stdin is a terminal: typed there,
/// it would be echoed on the screen.
fn read_stdin() -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!(
            "stdin is a terminal: the value would be echoed as you type it. Pipe it in (e.g. \
             `pass show NAME | bulkhead secret put ...`, or `< FILE`) or use --file PATH"
        );
    }
    // A duplicate of fd 0, read unbuffered: std's stdin buffer is never zeroed.
    let fd = stdin
        .as_fd()
        .try_clone_to_owned()
        .context("failed to read stdin")?;
    read_value(File::from(fd), "stdin")
}

/// Whom a file's mode lets read it besides its owner, if anyone.
pub fn loose_readers(mode: u32) -> Option<&'static str> {
    match (mode & 0o040 != 0, mode & 0o004 != 0) {
        (true, true) => Some("its group and every other user"),
        (true, false) => Some("its group"),
        (false, true) => Some("every other user"),
        (false, false) => None,
    }
}

/// The value in a file, which must be private to its owner unless
/// `allow_loose`. The mode is checked on the opened file, so it is the file
/// that is read.
fn read_file(path: &Path, allow_loose: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let file = File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("failed to read {}", path.display()))?;
    if meta.is_dir() {
        bail!("{} is a directory", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if let Some(who) = loose_readers(mode) {
        if !allow_loose {
            bail!(
                "refusing to read a secret from {}: its mode {mode:03o} lets {who} read it. Make \
                 it private (chmod 600 {}), or pass --allow-loose-file",
                path.display(),
                path.display()
            );
        }
        eprintln!(
            "warning: {} is readable by {who} (mode {mode:03o}); reading it anyway \
             (--allow-loose-file)",
            path.display()
        );
    }
    read_value(file, &path.display().to_string())
}

/// The request's value: the bytes stay in the zeroizing buffer, which the
/// request owns and zeroes when it is dropped.
fn value_source(value: Zeroizing<Vec<u8>>) -> pb::put_secret_request::Source {
    pb::put_secret_request::Source::Value(bytes::Bytes::from_owner(value))
}

// ---------------------------------------------------------------------------
// Printing.

/// RFC 3339 in UTC to the second; `-` when unset.
fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let full = bulkhead_audit::event::format_time_us(t.seconds.saturating_mul(1_000_000));
            match full.split_once('.') {
                Some((secs, _)) => format!("{secs}Z"),
                None => full,
            }
        }
    }
}

/// Free text as printed: control characters escaped, the rest as is.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() {
        "-".into()
    } else if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// A value as printed in a table: as is when it is one plain word, else quoted
/// with control characters escaped (values come from other operators and must
/// not drive the terminal).
fn plain(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() {
        "-".into()
    } else if s
        .chars()
        .all(|c| !c.is_control() && !c.is_whitespace() && c != '"' && c != '\\')
    {
        s.into()
    } else {
        format!("{s:?}").into()
    }
}

fn backend(b: i32) -> &'static str {
    match pb::SecretBackend::try_from(b) {
        Ok(pb::SecretBackend::Builtin) => "builtin",
        Ok(pb::SecretBackend::Vault) => "vault",
        Ok(pb::SecretBackend::AwsSecretsManager) => "aws-sm",
        Ok(pb::SecretBackend::Agentcore) => "agentcore",
        _ => "?",
    }
}

fn revocation_state(r: i32) -> &'static str {
    match pb::RevocationState::try_from(r) {
        Ok(pb::RevocationState::NotRevoked) => "active",
        Ok(pb::RevocationState::SoftRevoked) => "soft-revoked",
        Ok(pb::RevocationState::HardRevoked) => "hard-revoked",
        _ => "-",
    }
}

fn mode(hard: bool) -> &'static str {
    if hard { "hard" } else { "soft" }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items
            .iter()
            .map(|i| plain(i).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A profile as `profile get` prints it: settings, then a table of secrets.
pub fn format_profile(p: &pb::Profile) -> String {
    let spec = p.spec.clone().unwrap_or_default();
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "profile {}/{}  (revision {}, {})",
        plain(&p.tenant),
        plain(&p.name),
        p.revision,
        revocation_state(p.revocation)
    ));
    line(format!("  description:  {}", printable(&spec.description)));
    line(format!("  owner:        {}", printable(&spec.owner)));
    line(format!("  tags:         {}", list(&spec.tags)));
    line(format!(
        "  agents:       {}",
        if spec.allowed_agents.is_empty() {
            "any approved agent".into()
        } else {
            list(&spec.allowed_agents)
        }
    ));
    let env: BTreeMap<_, _> = spec.env.iter().collect();
    if env.is_empty() {
        line("  env:          -".into());
    }
    for (i, (k, v)) in env.iter().enumerate() {
        let label = if i == 0 { "env:" } else { "" };
        line(format!("  {label:<13} {}={}", plain(k), printable(v)));
    }
    let tools: BTreeMap<_, _> = spec.tool_acl.iter().collect();
    if tools.is_empty() {
        line("  tool acl:     none (every tool receives every key)".into());
    }
    for (i, (tool, keys)) in tools.iter().enumerate() {
        let label = if i == 0 { "tool acl:" } else { "" };
        let keys = if keys.keys.is_empty() {
            "(no keys)".into()
        } else {
            list(&keys.keys)
        };
        line(format!("  {label:<13} {} -> {keys}", plain(tool)));
    }
    line(format!("  created:      {}", when(p.created_at.as_ref())));
    line(format!("  updated:      {}", when(p.updated_at.as_ref())));
    line(format!(
        "  last rotated: {}",
        when(p.last_rotated_at.as_ref())
    ));
    if p.secrets.is_empty() {
        line("secrets: none (add one with `bulkhead secret put`)".into());
    } else {
        line(format!("secrets ({}):", p.secrets.len()));
        line(format!(
            "  {:<32}  {:<9}  {:>7}  {:<64}  {:<12}  {:<20}  REFERENCE",
            "KEY", "BACKEND", "VERSION", "FINGERPRINT", "STATE", "ROTATED"
        ));
        for k in &p.secrets {
            line(format!(
                "  {:<32}  {:<9}  {:>7}  {:<64}  {:<12}  {:<20}  {}",
                plain(&k.name),
                backend(k.backend),
                k.version,
                plain(&k.fingerprint),
                revocation_state(k.revocation),
                when(k.last_rotated_at.as_ref()),
                plain(&k.reference),
            ));
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Talking to sealed-vault.

fn load_endpoints(dir: &Path) -> anyhow::Result<Endpoints> {
    let path = Endpoints::path(dir);
    if !path.is_file() {
        bail!(
            "no mesh at {}: {} does not exist (start one with `bulkhead dev up --dir {}`, or pass \
             --dir / BULKHEAD_DIR)",
            dir.display(),
            path.display(),
            dir.display()
        );
    }
    Endpoints::load(dir).with_context(|| format!("failed to read {}", path.display()))
}

/// Dials sealed-vault as the operator named in `endpoints.json`.
async fn connect(dir: &Path) -> anyhow::Result<SealedVaultServiceClient<MeshChannel>> {
    let endpoints = load_endpoints(dir)?;
    let addr = endpoints.address("sealed-vault").with_context(|| {
        format!(
            "{} names no sealed-vault service",
            Endpoints::path(dir).display()
        )
    })?;
    let (identity, bundle) = endpoints
        .operator()
        .context("failed to load the operator certificate named in endpoints.json")?;
    let channel = bulkhead_mesh::client::connect(
        addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("sealed-vault".into()),
    )
    .await
    .with_context(|| format!("cannot reach sealed-vault at {addr} (is the mesh running?)"))?;
    Ok(SealedVaultServiceClient::new(channel))
}

/// A refused or failed RPC as an error that names the RPC, the code and the
/// service's message, with what the code means for the operator.
fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |s| {
        let hint = match s.code() {
            tonic::Code::PermissionDenied => {
                " (the certificate in endpoints.json is not allowed to do this, operators are \
                 spiffe://<td>/admin/*; or sealed-vault's backend configuration does not allow \
                 the reference for this tenant)"
            }
            tonic::Code::Unavailable => {
                " (nothing was done: sealed-vault, or the audit log, store or backend it needs, \
                 cannot be reached)"
            }
            tonic::Code::ResourceExhausted => {
                " (reveals are rate limited per operator; try again in a minute)"
            }
            _ => "",
        };
        anyhow::anyhow!(
            "sealed-vault {what} failed: {:?}: {}{hint}",
            s.code(),
            if s.message().is_empty() {
                "(no message)"
            } else {
                s.message()
            }
        )
    }
}

// ---------------------------------------------------------------------------
// Profiles.

async fn create_profile(
    dir: &Path,
    tenant: String,
    name: String,
    spec: SpecArgs,
) -> anyhow::Result<()> {
    let spec = spec.to_spec()?;
    let mut client = connect(dir).await?;
    let p = client
        .create_profile(pb::CreateProfileRequest {
            tenant,
            name,
            spec: Some(spec),
        })
        .await
        .map_err(rpc("CreateProfile"))?
        .into_inner()
        .profile
        .context("sealed-vault answered CreateProfile without the profile")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "created profile {}/{}",
        plain(&p.tenant),
        plain(&p.name)
    )?;
    write!(out, "{}", format_profile(&p))?;
    Ok(())
}

async fn fetch_profile(
    client: &mut SealedVaultServiceClient<MeshChannel>,
    tenant: String,
    name: String,
) -> anyhow::Result<pb::Profile> {
    client
        .get_profile(pb::GetProfileRequest { tenant, name })
        .await
        .map_err(rpc("GetProfile"))?
        .into_inner()
        .profile
        .context("sealed-vault answered GetProfile without the profile")
}

async fn update_profile(
    dir: &Path,
    tenant: String,
    name: String,
    args: SpecArgs,
    clear: &[Setting],
    expected_revision: Option<u64>,
) -> anyhow::Result<()> {
    if args.is_empty() && clear.is_empty() {
        bail!("nothing to change: give the settings to replace, or --clear SETTING");
    }
    let mut client = connect(dir).await?;
    // UpdateProfile replaces the whole spec: read it, change what was asked,
    // and write it back only if nobody changed it in between.
    let current = fetch_profile(&mut client, tenant.clone(), name.clone()).await?;
    if let Some(n) = expected_revision
        && n != current.revision
    {
        bail!(
            "profile {}/{} is at revision {}, not {n}: it changed since (see `bulkhead profile \
             get`); nothing was changed",
            plain(&tenant),
            plain(&name),
            current.revision
        );
    }
    let mut spec = current.spec.unwrap_or_default();
    args.apply(&mut spec, clear)?;
    let p = client
        .update_profile(pb::UpdateProfileRequest {
            tenant,
            name,
            spec: Some(spec),
            expected_revision: current.revision,
        })
        .await
        .map_err(rpc("UpdateProfile"))?
        .into_inner()
        .profile
        .context("sealed-vault answered UpdateProfile without the profile")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "updated profile {}/{} (revision {} -> {})",
        plain(&p.tenant),
        plain(&p.name),
        current.revision,
        p.revision
    )?;
    write!(out, "{}", format_profile(&p))?;
    Ok(())
}

async fn get_profile(dir: &Path, tenant: String, name: String) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let p = fetch_profile(&mut client, tenant, name).await?;
    print!("{}", format_profile(&p));
    Ok(())
}

async fn list_profiles(dir: &Path, tenant: String, tag: String) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut profiles = Vec::new();
    let mut page_token = String::new();
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let resp = client
            .list_profiles(pb::ListProfilesRequest {
                tenant: tenant.clone(),
                tag: tag.clone(),
                page_size: MAX_PAGE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(rpc("ListProfiles"))?
            .into_inner();
        profiles.extend(resp.profiles);
        if resp.next_page_token.is_empty() {
            complete = true;
            break;
        }
        if resp.next_page_token == page_token {
            bail!("sealed-vault returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    if !complete {
        bail!("more than {MAX_PAGES} pages of profiles; narrow the listing with --tenant or --tag");
    }
    let mut out = std::io::stdout().lock();
    if profiles.is_empty() {
        writeln!(out, "no profiles")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24}  {:<24}  {:>8}  {:>7}  {:<20}  {:<24}  {:<24}  DESCRIPTION",
        "TENANT", "NAME", "REVISION", "SECRETS", "UPDATED", "OWNER", "TAGS"
    )?;
    for p in &profiles {
        let spec = p.spec.clone().unwrap_or_default();
        writeln!(
            out,
            "{:<24}  {:<24}  {:>8}  {:>7}  {:<20}  {:<24}  {:<24}  {}",
            plain(&p.tenant),
            plain(&p.name),
            p.revision,
            p.secrets.len(),
            when(p.updated_at.as_ref()),
            plain(&spec.owner),
            list(&spec.tags),
            printable(&spec.description),
        )?;
    }
    Ok(())
}

async fn delete_profile(dir: &Path, tenant: String, name: String) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let resp = client
        .delete_profile(pb::DeleteProfileRequest {
            tenant: tenant.clone(),
            name: name.clone(),
        })
        .await
        .map_err(rpc("DeleteProfile"))?
        .into_inner();
    println!(
        "deleted profile {}/{} and its {} (their data keys are destroyed)",
        plain(&tenant),
        plain(&name),
        match resp.secrets_deleted {
            1 => "1 secret".to_owned(),
            n => format!("{n} secrets"),
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Secrets.

async fn put_secret(dir: &Path, req: pb::PutSecretRequest) -> anyhow::Result<()> {
    let (tenant, profile) = (req.tenant.clone(), req.profile.clone());
    let mut client = connect(dir).await?;
    let k = client
        .put_secret(req)
        .await
        .map_err(rpc("PutSecret"))?
        .into_inner()
        .secret
        .context("sealed-vault answered PutSecret without the secret's metadata")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "wrote secret {} to {}/{}",
        plain(&k.name),
        plain(&tenant),
        plain(&profile)
    )?;
    writeln!(out, "  key:         {}", plain(&k.name))?;
    writeln!(out, "  version:     {}", k.version)?;
    writeln!(out, "  fingerprint: {}", plain(&k.fingerprint))?;
    writeln!(out, "  backend:     {}", backend(k.backend))?;
    if !k.reference.is_empty() {
        writeln!(out, "  reference:   {}", plain(&k.reference))?;
    }
    Ok(())
}

async fn delete_secret(
    dir: &Path,
    tenant: String,
    profile: String,
    key: String,
) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let resp = client
        .delete_secret(pb::DeleteSecretRequest {
            tenant: tenant.clone(),
            profile: profile.clone(),
            key: key.clone(),
        })
        .await
        .map_err(rpc("DeleteSecret"))?
        .into_inner();
    println!(
        "deleted secret {} (version {}) from {}/{}; its data key is destroyed",
        plain(&key),
        resp.version,
        plain(&tenant),
        plain(&profile)
    );
    Ok(())
}

async fn reveal_secret(dir: &Path, req: pb::RevealSecretRequest) -> anyhow::Result<()> {
    let (tenant, profile, key) = (req.tenant.clone(), req.profile.clone(), req.key.clone());
    let mut client = connect(dir).await?;
    let resp = client
        .reveal_secret(req)
        .await
        .map_err(rpc("RevealSecret"))?
        .into_inner();
    let version = resp.secret.as_ref().map_or(0, |s| s.version);
    let value = Zeroizing::new(resp.value.to_vec());
    drop(resp);
    eprintln!(
        "revealed {}/{} {} (version {version}): this reveal is recorded in audit \
         (sealed.secret.revealed) with your reason",
        plain(&tenant),
        plain(&profile),
        plain(&key)
    );
    // A duplicate of fd 1, written unbuffered: std's stdout buffer is never
    // zeroed.
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("failed to write to stdout")?;
    let mut out = File::from(fd);
    out.write_all(&value)
        .and_then(|()| out.flush())
        .context("failed to write the value to stdout")?;
    Ok(())
}

fn print_revocation(out: &mut impl std::io::Write, r: &pb::SecretRevocation) -> anyhow::Result<()> {
    let what = if r.key.is_empty() {
        "every key".to_owned()
    } else {
        format!("key {}", plain(&r.key))
    };
    writeln!(
        out,
        "revocation {}: {what} of {}/{} ({})",
        plain(&r.revocation_id),
        plain(&r.tenant),
        plain(&r.profile),
        mode(r.hard)
    )?;
    writeln!(
        out,
        "  revoked:       {} by {}",
        when(r.revoked_at.as_ref()),
        plain(&r.revoked_by)
    )?;
    writeln!(out, "  reason:        {}", printable(&r.reason))?;
    if r.lifted_at.is_some() {
        writeln!(
            out,
            "  lifted:        {} by {}",
            when(r.lifted_at.as_ref()),
            plain(&r.lifted_by)
        )?;
        writeln!(out, "  lift reason:   {}", printable(&r.lift_reason))?;
    }
    Ok(())
}

async fn revoke(dir: &Path, req: pb::RevokeSecretRequest) -> anyhow::Result<()> {
    let hard = req.hard;
    let mut client = connect(dir).await?;
    let resp = client
        .revoke_secret(req)
        .await
        .map_err(rpc("RevokeSecret"))?
        .into_inner();
    let r = resp
        .revocation
        .context("sealed-vault answered RevokeSecret without the revocation")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "revocation id: {}", plain(&r.revocation_id))?;
    print_revocation(&mut out, &r)?;
    if resp.affected_run_ids.is_empty() {
        writeln!(out, "  affected runs: none")?;
    } else {
        writeln!(
            out,
            "  affected runs ({}){}:",
            resp.affected_run_ids.len(),
            if hard {
                ", revoked at identity: their sandboxes are killed"
            } else {
                ", may finish"
            }
        )?;
        for run in &resp.affected_run_ids {
            writeln!(out, "    {}", plain(run))?;
        }
    }
    Ok(())
}

async fn lift(dir: &Path, req: pb::LiftRevocationRequest) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let r = client
        .lift_revocation(req)
        .await
        .map_err(rpc("LiftRevocation"))?
        .into_inner()
        .revocation
        .context("sealed-vault answered LiftRevocation without the revocation")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "lifted revocation {}", plain(&r.revocation_id))?;
    print_revocation(&mut out, &r)?;
    if r.hard {
        writeln!(
            out,
            "  runs revoked at identity by this hard revocation stay revoked"
        )?;
    }
    Ok(())
}

async fn revocations(dir: &Path, tenant: String, profile: String, all: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut entries = Vec::new();
    let mut page_token = String::new();
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let resp = client
            .list_revocations(pb::ListRevocationsRequest {
                tenant: tenant.clone(),
                profile: profile.clone(),
                include_lifted: all,
                page_size: MAX_PAGE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(rpc("ListRevocations"))?
            .into_inner();
        entries.extend(resp.revocations);
        if resp.next_page_token.is_empty() {
            complete = true;
            break;
        }
        if resp.next_page_token == page_token {
            bail!("sealed-vault returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    if !complete {
        bail!(
            "more than {MAX_PAGES} pages of revocations; narrow the listing with --tenant or \
             --profile"
        );
    }
    let mut out = std::io::stdout().lock();
    if entries.is_empty() {
        writeln!(
            out,
            "no secret revocations{}",
            if all { "" } else { " in force" }
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<16}  {:<24}  {:<32}  {:<4}  {:<20}  {:<7}  {:>4}  {:<40}  REASON",
        "ID", "TENANT", "PROFILE", "KEY", "MODE", "REVOKED AT", "STATE", "RUNS", "BY"
    )?;
    for r in &entries {
        writeln!(
            out,
            "{:<36}  {:<16}  {:<24}  {:<32}  {:<4}  {:<20}  {:<7}  {:>4}  {:<40}  {}",
            plain(&r.revocation_id),
            plain(&r.tenant),
            plain(&r.profile),
            if r.key.is_empty() {
                "(every key)".into()
            } else {
                plain(&r.key)
            },
            mode(r.hard),
            when(r.revoked_at.as_ref()),
            if r.lifted_at.is_some() {
                "lifted"
            } else {
                "active"
            },
            r.affected_run_ids.len(),
            plain(&r.revoked_by),
            printable(&r.reason),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &[u8]) -> anyhow::Result<Vec<u8>> {
        read_value(input, "stdin").map(|v| v.to_vec())
    }

    #[test]
    fn one_trailing_newline_is_dropped() -> anyhow::Result<()> {
        assert_eq!(read(b"s3cret")?, b"s3cret");
        assert_eq!(read(b"s3cret\n")?, b"s3cret");
        assert_eq!(read(b"s3cret\r\n")?, b"s3cret");
        assert_eq!(read(b"s3cret\n\n")?, b"s3cret\n");
        assert_eq!(read(b" a b \n")?, b" a b ");
        Ok(())
    }

    #[test]
    fn empty_and_oversized_values_are_refused() -> anyhow::Result<()> {
        for empty in [&b""[..], b"\n", b"\r\n"] {
            let err = read(empty).expect_err("empty").to_string();
            assert!(err.contains("no value"), "{err}");
        }
        let max = vec![b'x'; MAX_VALUE_LEN];
        assert_eq!(read(&max)?.len(), MAX_VALUE_LEN);
        let mut with_newline = max.clone();
        with_newline.extend_from_slice(b"\r\n");
        assert_eq!(read(&with_newline)?.len(), MAX_VALUE_LEN);
        for len in [MAX_VALUE_LEN + 1, MAX_VALUE_LEN + 3, 10 * MAX_VALUE_LEN] {
            let err = read(&vec![b'x'; len]).expect_err("too large").to_string();
            assert!(err.contains("larger than 64 KiB"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn errors_never_hold_the_value() {
        struct Broken(bool);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if std::mem::replace(&mut self.0, true) {
                    Err(std::io::Error::other("pipe closed"))
                } else {
                    buf[..6].copy_from_slice(b"CANARY");
                    Ok(6)
                }
            }
        }
        let err = format!(
            "{:#}",
            read_value(Broken(false), "stdin").expect_err("fails")
        );
        assert!(err.contains("failed to read stdin"), "{err}");
        assert!(!err.contains("CANARY"), "{err}");
    }

    #[test]
    fn loose_modes_are_named() {
        assert_eq!(loose_readers(0o600), None);
        assert_eq!(loose_readers(0o400), None);
        assert_eq!(loose_readers(0o620), None);
        assert_eq!(loose_readers(0o640), Some("its group"));
        assert_eq!(loose_readers(0o604), Some("every other user"));
        assert_eq!(loose_readers(0o644), Some("its group and every other user"));
    }

    #[test]
    fn env_and_tool_flags_parse() {
        assert_eq!(
            parse_env("URL=https://x?a=b"),
            Ok(("URL".into(), "https://x?a=b".into()))
        );
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("=v").is_err());
        assert_eq!(
            parse_tool("web-search=A, B,,"),
            Ok(("web-search".into(), vec!["A".into(), "B".into()]))
        );
        assert_eq!(parse_tool("shell="), Ok(("shell".into(), vec![])));
        assert!(parse_tool("shell").is_err());
    }

    #[test]
    fn update_replaces_only_what_is_named() -> anyhow::Result<()> {
        let mut spec = SpecArgs {
            description: Some("d".into()),
            owner: Some("o".into()),
            tags: vec!["t".into()],
            agents: vec!["a".into()],
            env: vec![("DEBUG".into(), "1".into())],
            tools: vec![("web".into(), vec!["K".into()])],
        }
        .to_spec()?;
        let owner_only = SpecArgs {
            owner: Some("new".into()),
            ..SpecArgs::default()
        };
        owner_only.apply(&mut spec, &[])?;
        assert_eq!(spec.owner, "new");
        assert_eq!(spec.description, "d");
        assert_eq!(spec.tags, ["t"]);
        assert_eq!(spec.env.get("DEBUG").map(String::as_str), Some("1"));
        assert_eq!(spec.tool_acl["web"].keys, ["K"]);

        SpecArgs::default().apply(&mut spec, &[Setting::Env, Setting::Tags])?;
        assert!(spec.env.is_empty() && spec.tags.is_empty());
        assert_eq!(spec.tool_acl.len(), 1, "the tool ACL is kept");

        let both = SpecArgs {
            tools: vec![("x".into(), vec![])],
            ..SpecArgs::default()
        };
        assert!(both.apply(&mut spec, &[Setting::Tools]).is_err());
        let twice = SpecArgs {
            env: vec![("A".into(), "1".into()), ("A".into(), "2".into())],
            ..SpecArgs::default()
        };
        assert!(twice.to_spec().is_err());
        Ok(())
    }
}
