//! RFC 9162 Merkle tree hashing, proofs and their verification.
//!
//! leaf hash = SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right);
//! the root of the empty tree is SHA-256 of the empty string. The tree keeps
//! every perfect subtree's hash, so roots, inclusion proofs and consistency
//! proofs for any past size cost O(log² n) hashes.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Why a proof does not verify or cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("tree size {size} exceeds the log's size {have}")]
    SizeOutOfRange { size: u64, have: u64 },
    #[error("first tree size {first} is larger than second {second}")]
    FirstAfterSecond { first: u64, second: u64 },
    #[error("proof has the wrong number of hashes")]
    WrongLength,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// An append-only Merkle tree. `levels[k][i]` is the hash of the perfect
/// subtree of 2^k leaves starting at leaf i·2^k.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn leaf(&self, index: u64) -> Option<&Hash> {
        self.levels.first()?.get(usize::try_from(index).ok()?)
    }

    /// Appends a leaf hash, completing every perfect subtree it closes.
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut k = 0;
        while self.levels[k].len().is_multiple_of(2) {
            let n = self.levels[k].len();
            let h = node_hash(&self.levels[k][n - 2], &self.levels[k][n - 1]);
            if self.levels.len() == k + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[k + 1].push(h);
            k += 1;
        }
    }

    /// MTH of leaves [start, start + n), which must lie within the tree.
    fn subtree(&self, start: u64, n: u64) -> Hash {
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && start.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            return self.levels[k][(start >> k) as usize];
        }
        let s = split(n);
        node_hash(&self.subtree(start, s), &self.subtree(start + s, n - s))
    }

    /// The root of the tree as it was at `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        Ok(self.subtree(0, size))
    }

    pub fn root(&self) -> Hash {
        self.subtree(0, self.size())
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.size() {
            return Err(ProofError::SizeOutOfRange {
                size,
                have: self.size(),
            });
        }
        Ok(())
    }

    /// The RFC 9162 inclusion proof (PATH) of leaf `index` in the tree of `size`.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        if index >= size {
            return Err(ProofError::IndexOutOfRange { index, size });
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    fn path(&self, m: u64, start: u64, n: u64, out: &mut Vec<Hash>) {
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, start, k, out);
            out.push(self.subtree(start + k, n - k));
        } else {
            self.path(m - k, start + k, n - k, out);
            out.push(self.subtree(start, k));
        }
    }

    /// The RFC 9162 consistency proof between the trees of `first` and `second` leaves.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(second)?;
        if first > second {
            return Err(ProofError::FirstAfterSecond { first, second });
        }
        let mut proof = Vec::new();
        if first > 0 && first < second {
            self.subproof(first, 0, second, true, &mut proof);
        }
        Ok(proof)
    }

    fn subproof(&self, m: u64, start: u64, n: u64, complete: bool, out: &mut Vec<Hash>) {
        if m == n {
            if !complete {
                out.push(self.subtree(start, n));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, k, complete, out);
            out.push(self.subtree(start + k, n - k));
        } else {
            self.subproof(m - k, start + k, n - k, false, out);
            out.push(self.subtree(start, k));
        }
    }
}

/// Computes roots while streaming leaves, in O(log n) memory (Verify's path).
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    /// Perfect subtrees, largest (leftmost) first: (leaf count, hash).
    stack: Vec<(u64, Hash)>,
    size: u64,
}

impl Accumulator {
    pub fn push(&mut self, leaf: Hash) {
        let mut cur = (1u64, leaf);
        while let Some(&(n, h)) = self.stack.last() {
            if n != cur.0 {
                break;
            }
            self.stack.pop();
            cur = (n * 2, node_hash(&h, &cur.1));
        }
        self.stack.push(cur);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn root(&self) -> Hash {
        let mut iter = self.stack.iter().rev();
        let Some(&(_, mut h)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            h = node_hash(left, &h);
        }
        h
    }
}

/// RFC 9162 §2.1.3.2: verifies that `leaf` is at `index` in the tree of `size`
/// whose root is `root`.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: verifies that the tree of `first` leaves with root
/// `first_root` is a prefix of the tree of `second` leaves with root `second_root`.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first > second {
        return Err(ProofError::FirstAfterSecond { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if first == 0 {
        // Every tree extends the empty tree; there is nothing to prove.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != first_root || &sr != second_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Certificate Transparency reference inputs (RFC 6962 test data).
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    /// Roots of the trees of sizes 0 to 8 over LEAVES.
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    /// (leaf index, tree size, proof).
    const INCLUSION: &[(u64, u64, &[&str])] = &[
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    /// (first size, second size, proof).
    const CONSISTENCY: &[(u64, u64, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    fn h(s: &str) -> Hash {
        hex::decode(s).expect("hex").try_into().expect("32 bytes")
    }

    fn reference_tree() -> Tree {
        let mut t = Tree::new();
        for l in LEAVES {
            t.push(leaf_hash(&hex::decode(l).expect("hex")));
        }
        t
    }

    #[test]
    fn roots_match_the_reference_vectors() {
        let t = reference_tree();
        let mut acc = Accumulator::default();
        assert_eq!(acc.root(), h(ROOTS[0]));
        for (n, root) in ROOTS.iter().enumerate() {
            assert_eq!(t.root_at(n as u64).expect("size"), h(root), "size {n}");
            if n > 0 {
                acc.push(*t.leaf(n as u64 - 1).expect("leaf"));
                assert_eq!(acc.root(), h(root), "streamed size {n}");
            }
        }
    }

    #[test]
    fn inclusion_vectors_are_produced_and_verified() {
        let t = reference_tree();
        for (index, size, want) in INCLUSION {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            let got = t.inclusion_proof(*index, *size).expect("proof");
            assert_eq!(got, want, "leaf {index} size {size}");
            let leaf = t.leaf(*index).expect("leaf");
            verify_inclusion(leaf, *index, *size, &got, &h(ROOTS[*size as usize]))
                .expect("verifies");
        }
    }

    #[test]
    fn consistency_vectors_are_produced_and_verified() {
        let t = reference_tree();
        for (first, second, want) in CONSISTENCY {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            let got = t.consistency_proof(*first, *second).expect("proof");
            assert_eq!(got, want, "{first} -> {second}");
            verify_consistency(
                *first,
                *second,
                &h(ROOTS[*first as usize]),
                &h(ROOTS[*second as usize]),
                &got,
            )
            .expect("verifies");
        }
    }

    #[test]
    fn malformed_proofs_are_rejected() {
        let t = reference_tree();
        let root8 = h(ROOTS[8]);
        let leaf = *t.leaf(5).expect("leaf");
        let mut proof = t.inclusion_proof(5, 8).expect("proof");
        // Hashes left over.
        let mut long = proof.clone();
        long.push(root8);
        assert_eq!(
            verify_inclusion(&leaf, 5, 8, &long, &root8),
            Err(ProofError::WrongLength)
        );
        // Too few hashes.
        assert_eq!(
            verify_inclusion(&leaf, 5, 8, &proof[..2], &root8),
            Err(ProofError::WrongLength)
        );
        // Index out of range.
        assert!(matches!(
            verify_inclusion(&leaf, 8, 8, &proof, &root8),
            Err(ProofError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            t.inclusion_proof(9, 8),
            Err(ProofError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            t.inclusion_proof(0, 9),
            Err(ProofError::SizeOutOfRange { .. })
        ));
        // Wrong leaf, wrong index, flipped hash.
        assert_eq!(
            verify_inclusion(&leaf, 4, 8, &proof, &root8),
            Err(ProofError::RootMismatch)
        );
        proof[1][0] ^= 1;
        assert_eq!(
            verify_inclusion(&leaf, 5, 8, &proof, &root8),
            Err(ProofError::RootMismatch)
        );

        // Consistency: first > second, left-over hashes, empty proof, wrong root.
        let c = t.consistency_proof(6, 8).expect("proof");
        let (r6, r8) = (h(ROOTS[6]), h(ROOTS[8]));
        assert!(matches!(
            verify_consistency(8, 6, &r8, &r6, &c),
            Err(ProofError::FirstAfterSecond { .. })
        ));
        assert!(matches!(
            t.consistency_proof(8, 6),
            Err(ProofError::FirstAfterSecond { .. })
        ));
        let mut long = c.clone();
        long.push(r8);
        assert_eq!(
            verify_consistency(6, 8, &r6, &r8, &long),
            Err(ProofError::WrongLength)
        );
        assert_eq!(
            verify_consistency(6, 8, &r6, &r8, &[]),
            Err(ProofError::WrongLength)
        );
        assert_eq!(
            verify_consistency(6, 8, &h(ROOTS[5]), &r8, &c),
            Err(ProofError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(8, 8, &r8, &r8, &c),
            Err(ProofError::WrongLength)
        );
    }

    #[test]
    fn every_proof_of_every_size_verifies() {
        let mut t = Tree::new();
        for i in 0u32..70 {
            t.push(leaf_hash(&i.to_be_bytes()));
        }
        for size in 1..=70u64 {
            let root = t.root_at(size).expect("root");
            for index in 0..size {
                let p = t.inclusion_proof(index, size).expect("proof");
                verify_inclusion(t.leaf(index).expect("leaf"), index, size, &p, &root)
                    .unwrap_or_else(|e| panic!("{index}/{size}: {e}"));
            }
            for first in 0..=size {
                let p = t.consistency_proof(first, size).expect("proof");
                let r1 = t.root_at(first).expect("root");
                verify_consistency(first, size, &r1, &root, &p)
                    .unwrap_or_else(|e| panic!("{first}->{size}: {e}"));
            }
        }
    }
}
