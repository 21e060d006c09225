//! Cascade resolution: levels system → agent → run, each a profile of the
//! request's tenant plus overrides. A later level wins per key, an empty
//! override removes a key, and every entry records the level it came from.
//! No value is read here: entries say where a value is, not what it is.

use std::collections::BTreeMap;

use bulkhead_proto::sealed::v1 as pb;

use crate::store::{ProfileBundle, SecretMaterial, SecretRevocation};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    System,
    Agent,
    Run,
}

impl Origin {
    pub fn to_pb(self) -> pb::Origin {
        match self {
            Origin::System => pb::Origin::System,
            Origin::Agent => pb::Origin::Agent,
            Origin::Run => pb::Origin::Run,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    No,
    Soft,
    Hard,
}

impl Revoked {
    pub fn to_pb(self) -> pb::RevocationState {
        match self {
            Revoked::No => pb::RevocationState::NotRevoked,
            Revoked::Soft => pb::RevocationState::SoftRevoked,
            Revoked::Hard => pb::RevocationState::HardRevoked,
        }
    }
}

/// Where one key's value is.
#[derive(Debug, Clone)]
pub enum Source {
    /// A secret version of a profile (sealed here, or a reference it stores).
    Stored {
        material: SecretMaterial,
        version: u64,
        fingerprint: String,
    },
    /// A reference given by a cascade override.
    Reference(String),
    /// A non-secret env value.
    Plain(String),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub origin: Origin,
    /// The profile the entry came from; empty for an override.
    pub profile: String,
    pub source: Source,
    pub revoked: Revoked,
}

impl Entry {
    pub fn is_secret(&self) -> bool {
        !matches!(self.source, Source::Plain(_))
    }
}

/// An override of one level.
#[derive(Debug, Clone)]
pub enum Override {
    Plain(String),
    Reference(String),
    Remove,
}

/// One level as loaded: its profile (if any) and its overrides.
#[derive(Debug)]
pub struct Level {
    pub origin: Origin,
    pub profile: Option<ProfileBundle>,
    pub overrides: BTreeMap<String, Override>,
}

fn revocation_of(revocations: &[SecretRevocation], key: &str) -> Revoked {
    let mut state = Revoked::No;
    for r in revocations.iter().filter(|r| r.lifted.is_none()) {
        if r.key.as_deref().is_none_or(|k| k == key) {
            state = if r.hard {
                Revoked::Hard
            } else {
                state.max_soft()
            };
        }
        if state == Revoked::Hard {
            break;
        }
    }
    state
}

impl Revoked {
    fn max_soft(self) -> Self {
        if self == Revoked::Hard {
            self
        } else {
            Revoked::Soft
        }
    }
}

/// Applies the levels in order; the result is keyed by name.
pub fn apply(levels: &[Level]) -> BTreeMap<String, Entry> {
    let mut out: BTreeMap<String, Entry> = BTreeMap::new();
    for level in levels {
        if let Some(bundle) = &level.profile {
            let profile = &bundle.profile;
            for (k, v) in &profile.spec.env {
                out.insert(
                    k.clone(),
                    Entry {
                        key: k.clone(),
                        origin: level.origin,
                        profile: profile.name.clone(),
                        source: Source::Plain(v.clone()),
                        revoked: Revoked::No,
                    },
                );
            }
            for s in &bundle.secrets {
                out.insert(
                    s.id.key.clone(),
                    Entry {
                        key: s.id.key.clone(),
                        origin: level.origin,
                        profile: profile.name.clone(),
                        source: Source::Stored {
                            material: s.material.clone(),
                            version: s.id.version,
                            fingerprint: s.fingerprint.clone(),
                        },
                        revoked: revocation_of(&bundle.revocations, &s.id.key),
                    },
                );
            }
        }
        for (k, o) in &level.overrides {
            match o {
                Override::Remove => {
                    out.remove(k);
                }
                Override::Plain(v) => {
                    out.insert(
                        k.clone(),
                        Entry {
                            key: k.clone(),
                            origin: level.origin,
                            profile: String::new(),
                            source: Source::Plain(v.clone()),
                            revoked: Revoked::No,
                        },
                    );
                }
                Override::Reference(r) => {
                    out.insert(
                        k.clone(),
                        Entry {
                            key: k.clone(),
                            origin: level.origin,
                            profile: String::new(),
                            source: Source::Reference(r.clone()),
                            revoked: Revoked::No,
                        },
                    );
                }
            }
        }
    }
    out
}
