//! Verify: recompute every leaf from its stored fields and the tree from those
//! leaves, check each signed tree head against the recomputed root and its
//! signature, and report the first bad sequence.
//!
//! A changed field shows as a leaf mismatch at its exact sequence. A deleted or
//! reordered row shows as a sequence gap or a leaf mismatch (the leaf holds its
//! sequence). A truncated tail shows as a gap after the last row. A row whose
//! fields and stored leaf hash were both rewritten shows as a root mismatch,
//! located between the last head that still verifies and the first that does
//! not; every head signs the whole tree, so old proofs stop verifying too.

use ed25519_dalek::VerifyingKey;

use crate::checkpoint::TreeHead;
use crate::merkle::Accumulator;
use crate::store::{AuditStore, StoreError};

/// Rows read per query.
const CHUNK: u32 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    LeafMismatch,
    SequenceGap,
    RootMismatch,
    BadSignature,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub first_bad: Option<u64>,
    pub problem: Option<Problem>,
    /// Events checked in the requested range.
    pub checked: u64,
    /// The newest signed head checked.
    pub head: Option<TreeHead>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Verifies sequences `from..=to` (0 and 0: the whole log) and every signed
/// head within reach.
fn fail(report: &mut Report, seq: u64, p: Problem) {
    if report.problem.is_none() {
        report.first_bad = Some(seq);
        report.problem = Some(p);
    }
}

pub async fn verify(
    store: &dyn AuditStore,
    public: &VerifyingKey,
    from: u64,
    to: u64,
) -> Result<Report, StoreError> {
    let heads = store.heads().await?;
    let last_seq = store.last_sequence().await?;
    let latest_head_size = heads.last().map_or(0, |h| h.tree_size);
    let end = if to == 0 {
        last_seq.max(latest_head_size)
    } else {
        to
    };
    let from = from.max(1);
    let mut report = Report {
        first_bad: None,
        problem: None,
        checked: 0,
        head: None,
    };

    // Signatures first: a forged head proves nothing.
    let mut prev_size = 0;
    for h in &heads {
        if !h.verify(public) {
            fail(&mut report, prev_size + 1, Problem::BadSignature);
            return Ok(report);
        }
        prev_size = h.tree_size;
    }

    let in_reach: Vec<&TreeHead> = heads.iter().filter(|h| h.tree_size <= end).collect();
    let mut heads_iter = in_reach.into_iter().peekable();
    // An empty-tree head needs no leaves.
    while let Some(h) = heads_iter.next_if(|h| h.tree_size == 0) {
        report.head = Some(h.clone());
    }
    let mut good_size = 0u64;
    let mut acc = Accumulator::default();
    let mut expected = 1u64;
    'rows: while expected <= end {
        let rows = store.verify_scan(expected - 1, CHUNK).await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let seq = row.sequence;
            if seq > end {
                break 'rows;
            }
            if seq != expected {
                fail(&mut report, expected, Problem::SequenceGap);
                return Ok(report);
            }
            let leaf = row.recomputed;
            if seq >= from {
                report.checked += 1;
                if leaf != row.stored {
                    fail(&mut report, seq, Problem::LeafMismatch);
                    return Ok(report);
                }
            }
            acc.push(leaf);
            while let Some(h) = heads_iter.next_if(|h| h.tree_size == acc.size()) {
                if acc.root() != h.root {
                    fail(&mut report, good_size + 1, Problem::RootMismatch);
                    return Ok(report);
                }
                good_size = h.tree_size;
                report.head = Some(h.clone());
            }
            expected += 1;
        }
    }
    if expected <= end {
        // Rows stop before the signed heads or the requested end: truncated.
        fail(&mut report, expected, Problem::SequenceGap);
    }
    Ok(report)
}
