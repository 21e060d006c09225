//! `bulkhead pki`: the dev CA and SVIDs, written as PEM files (keys 0600).

use std::path::PathBuf;

use anyhow::{Context, bail};
use bulkhead_mesh::pki::{self, Ca, SvidOptions};
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Creates a CA for the trust domain and SVIDs for the five services and
    /// one operator: ca.pem, ca.key, <service>.pem/.key, operator.pem/.key.
    Init {
        /// The trust domain, e.g. bulkhead.example.
        #[arg(long)]
        trust_domain: String,
        /// Directory to write into; refused if it already holds a CA.
        #[arg(long)]
        out: PathBuf,
        /// The operator's name: its SVID is spiffe://TD/admin/<name>.
        #[arg(long, default_value = "operator")]
        operator: String,
    },
    /// Issues an SVID signed by the CA, e.g. for a tenant client
    /// (spiffe://TD/tenant/<t>/client/<name>) or a worker.
    Issue {
        /// The SPIFFE ID to issue; it must be in the CA's trust domain.
        #[arg(long)]
        spiffe_id: String,
        /// Directory to write <name>.pem and <name>.key into.
        #[arg(long)]
        out: PathBuf,
        /// Directory holding ca.pem and ca.key (default: --out).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// File name stem (default: the ID's path segments joined by '-').
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in days.
        #[arg(long, default_value_t = 365)]
        ttl_days: i64,
        /// Extra DNS SANs (for servers dialed by host name).
        #[arg(long = "dns")]
        dns: Vec<String>,
    },
}

pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init {
            trust_domain,
            out,
            operator,
        } => {
            let td = TrustDomain::parse(&trust_domain).context("invalid --trust-domain")?;
            let report = pki::init_dir(&out, &td, &operator)
                .with_context(|| format!("failed to create the pki in {}", out.display()))?;
            println!("trust domain {} in {}", report.trust_domain, out.display());
            println!("  ca.pem, ca.key");
            for (name, id) in report.written {
                println!("  {name}.pem, {name}.key  {id}");
            }
            Ok(())
        }
        PkiCommand::Issue {
            spiffe_id,
            out,
            ca_dir,
            name,
            ttl_days,
            dns,
        } => {
            let id = SpiffeId::parse(&spiffe_id).context("invalid --spiffe-id")?;
            if id.path().is_empty() {
                bail!("--spiffe-id needs a path: an SVID cannot carry the trust domain's own id");
            }
            if ttl_days <= 0 {
                bail!("--ttl-days must be positive");
            }
            let ca_dir = ca_dir.unwrap_or_else(|| out.clone());
            let ca = Ca::load_dir(&ca_dir)
                .with_context(|| format!("failed to load the ca from {}", ca_dir.display()))?;
            let opts = SvidOptions {
                ttl: bulkhead_mesh::pki::days(ttl_days),
                dns_names: dns,
                ..SvidOptions::default()
            };
            let svid = ca.issue(&id, &opts)?;
            std::fs::create_dir_all(&out)?;
            let name = name.unwrap_or_else(|| id.segments().collect::<Vec<_>>().join("-"));
            pki::write_svid(&out, &name, &svid, &ca)?;
            println!("{id}: {0}/{name}.pem, {0}/{name}.key", out.display());
            Ok(())
        }
    }
}
