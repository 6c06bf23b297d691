//! RFC 6962 Merkle trees: tree heads, inclusion and consistency proofs, and
//! their verification (the algorithms of RFC 9162 section 2.1). Pure.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// MTH over leaf hashes; the empty tree's head is `SHA-256("")`.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` in the tree of `leaves` (RFC 6962 PATH).
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_proof(index, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(index - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// The consistency proof from the first `m` leaves to all of `leaves`
/// (RFC 6962 PROOF).
pub fn consistency_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    if m == 0 || m >= leaves.len() {
        return Vec::new();
    }
    subproof(m, leaves, true)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![root(leaves)]
        };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], complete);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// An append-only tree that keeps every perfect subtree: appending is
/// amortized O(1) and the head or a proof for any size is O(log² n) hashes.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(node);
            let row = &self.levels[level];
            if !row.len().is_multiple_of(2) {
                break;
            }
            node = node_hash(&row[row.len() - 2], &row[row.len() - 1]);
            level += 1;
        }
    }

    /// The number of leaves.
    pub fn len(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Leaf `i`'s hash.
    pub fn leaf(&self, i: usize) -> Option<&Hash> {
        self.levels.first().and_then(|l| l.get(i))
    }

    /// MTH of leaves `lo..hi`.
    fn range(&self, lo: usize, hi: usize) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return Sha256::digest([]).into();
        }
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            return self.levels[k][lo >> k];
        }
        let k = split(n);
        node_hash(&self.range(lo, lo + k), &self.range(lo + k, hi))
    }

    /// The head of the tree of the first `size` leaves.
    pub fn root(&self, size: usize) -> Hash {
        self.range(0, size.min(self.len()))
    }

    /// Leaf `index`'s audit path in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, index: usize, size: usize) -> Vec<Hash> {
        if index >= size || size > self.len() {
            return Vec::new();
        }
        self.path(index, 0, size)
    }

    fn path(&self, m: usize, lo: usize, hi: usize) -> Vec<Hash> {
        let n = hi - lo;
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        if m < lo + k {
            let mut p = self.path(m, lo, lo + k);
            p.push(self.range(lo + k, hi));
            p
        } else {
            let mut p = self.path(m, lo + k, hi);
            p.push(self.range(lo, lo + k));
            p
        }
    }

    /// The consistency proof from `m` leaves to `size` leaves.
    pub fn consistency_proof(&self, m: usize, size: usize) -> Vec<Hash> {
        if m == 0 || m >= size || size > self.len() {
            return Vec::new();
        }
        self.sub(m, 0, size, true)
    }

    fn sub(&self, m: usize, lo: usize, hi: usize, complete: bool) -> Vec<Hash> {
        let n = hi - lo;
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![self.range(lo, hi)]
            };
        }
        let k = split(n);
        if m <= k {
            let mut p = self.sub(m, lo, lo + k, complete);
            p.push(self.range(lo + k, hi));
            p
        } else {
            let mut p = self.sub(m - k, lo + k, hi, false);
            p.push(self.range(lo, lo + k));
            p
        }
    }
}

/// The right edge of an append-only tree: the heads of its perfect
/// subtrees, largest first (one per set bit of its size). It gives the head
/// of the whole tree in O(log n) memory, which is all a log's writer needs:
/// the writer of a run that lasts a day keeps 64 hashes, not every node.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut size = self.size;
        // Each trailing one bit of the size is a subtree as big as the
        // one being carried: they merge, as in binary addition.
        while size & 1 == 1 {
            let Some(left) = self.peaks.pop() else { break };
            node = node_hash(&left, &node);
            size >>= 1;
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The number of leaves.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The head of the whole tree: MTH splits at the largest power of two
    /// below the size, which is the first peak, and so on down.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        match peaks.next() {
            None => Sha256::digest([]).into(),
            Some(last) => peaks.fold(*last, |right, left| node_hash(left, &right)),
        }
    }
}

impl From<&Tree> for Frontier {
    fn from(tree: &Tree) -> Frontier {
        let n = tree.len();
        let mut peaks = Vec::new();
        let mut lo = 0usize;
        for k in (0..usize::BITS as usize).rev() {
            if (n >> k) & 1 == 1 {
                if let Some(h) = tree.levels.get(k).and_then(|row| row.get(lo >> k)) {
                    peaks.push(*h);
                }
                lo += 1 << k;
            }
        }
        Frontier {
            size: n as u64,
            peaks,
        }
    }
}

/// Does `proof` show that `leaf` is leaf `index` of the tree of `size` with
/// head `root`? (RFC 9162 2.1.3.2)
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Does `proof` show that the tree of `size1` with head `root1` is a prefix
/// of the tree of `size2` with head `root2`? (RFC 9162 2.1.4.2)
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> bool {
    if size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    if size1 == 0 {
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if size1.is_power_of_two() {
        path.insert(0, *root1);
    }
    let (mut fnode, mut snode) = (size1 - 1, size2 - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *root1 && sr == *root2
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_frontier_has_the_head_of_the_whole_tree_in_log_memory() {
        let leaves: Vec<Hash> = (0..300u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut frontier = Frontier::default();
        let mut tree = Tree::new();
        assert_eq!(frontier.root(), root(&[]));
        for (i, leaf) in leaves.iter().enumerate() {
            frontier.push(*leaf);
            tree.push(*leaf);
            let n = i + 1;
            assert_eq!(frontier.len(), n as u64);
            assert_eq!(frontier.root(), root(&leaves[..n]), "size {n}");
            assert_eq!(frontier.peaks.len(), n.count_ones() as usize);
            // Made from a whole tree (a log opened again), the same.
            let from_tree = Frontier::from(&tree);
            assert_eq!(from_tree.root(), frontier.root(), "size {n}");
            assert_eq!(from_tree.peaks, frontier.peaks);
        }
    }

    use super::*;

    fn h(s: &str) -> Hash {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    /// The Certificate Transparency reference leaves and tree heads.
    fn ct_leaves() -> Vec<Hash> {
        let data: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        data.iter().map(|d| leaf_hash(d)).collect()
    }

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

    #[test]
    fn tree_heads_match_the_reference() {
        let leaves = ct_leaves();
        for (n, want) in ROOTS.iter().enumerate() {
            assert_eq!(root(&leaves[..n]), h(want), "size {n}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference_and_mutations_fail() {
        let leaves = ct_leaves();
        let cases: [(usize, usize, [&str; 3]); 2] = [
            (
                0,
                8,
                [
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                [
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        let r = h(ROOTS[8]);
        for (i, n, want) in cases {
            let proof = inclusion_proof(i, &leaves[..n]);
            assert_eq!(proof, want.map(h).to_vec(), "leaf {i} of {n}");
            assert!(verify_inclusion(i as u64, n as u64, &leaves[i], &proof, &r));
            // Mutations: each proof element, the index, the size, the leaf, a
            // missing or extra element.
            for j in 0..proof.len() {
                let mut bad = proof.clone();
                bad[j][0] ^= 1;
                assert!(!verify_inclusion(i as u64, n as u64, &leaves[i], &bad, &r));
            }
            assert!(!verify_inclusion(
                i as u64 + 1,
                n as u64,
                &leaves[i],
                &proof,
                &r
            ));
            // No size mutation: the paths of sizes 7 and 8 have the same shape
            // for these leaves, so a size is only ever trusted together with
            // its root, in a signed checkpoint.
            assert!(!verify_inclusion(
                i as u64,
                n as u64,
                &leaves[(i + 1) % n],
                &proof,
                &r
            ));
            assert!(!verify_inclusion(
                i as u64,
                n as u64,
                &leaves[i],
                &proof[..2],
                &r
            ));
            let mut long = proof.clone();
            long.push(r);
            assert!(!verify_inclusion(i as u64, n as u64, &leaves[i], &long, &r));
        }
    }

    #[test]
    fn consistency_proofs_match_the_reference_and_mutations_fail() {
        let leaves = ct_leaves();
        let cases: [(usize, usize, &[&str]); 4] = [
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
        for (m, n, want) in cases {
            let proof = consistency_proof(m, &leaves[..n]);
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            assert_eq!(proof, want, "{m} -> {n}");
            let (r1, r2) = (h(ROOTS[m]), h(ROOTS[n]));
            assert!(
                verify_consistency(m as u64, n as u64, &proof, &r1, &r2),
                "{m} -> {n}"
            );
            for j in 0..proof.len() {
                let mut bad = proof.clone();
                bad[j][5] ^= 0x80;
                assert!(!verify_consistency(m as u64, n as u64, &bad, &r1, &r2));
            }
            if m != n {
                let mut bad_root = r1;
                bad_root[0] ^= 1;
                assert!(!verify_consistency(
                    m as u64, n as u64, &proof, &bad_root, &r2
                ));
                assert!(!verify_consistency(
                    m as u64,
                    n as u64,
                    &proof,
                    &r1,
                    &h(ROOTS[n - 1])
                ));
            }
        }
    }

    #[test]
    fn the_cached_tree_agrees_with_the_definition() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let mut tree = Tree::new();
        for (i, l) in leaves.iter().enumerate() {
            tree.push(*l);
            assert_eq!(tree.root(i + 1), root(&leaves[..=i]), "size {}", i + 1);
        }
        for n in [1usize, 2, 3, 7, 8, 9, 31, 64, 70] {
            assert_eq!(tree.root(n), root(&leaves[..n]));
            for i in 0..n {
                assert_eq!(
                    tree.inclusion_proof(i, n),
                    inclusion_proof(i, &leaves[..n]),
                    "{i}/{n}"
                );
            }
            for m in 1..=n {
                assert_eq!(
                    tree.consistency_proof(m, n),
                    consistency_proof(m, &leaves[..n]),
                    "{m}->{n}"
                );
            }
        }
        assert_eq!(Tree::new().root(0), root(&[]));
    }

    #[test]
    fn every_proof_of_many_trees_verifies() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for n in 1..=leaves.len() {
            let r = root(&leaves[..n]);
            for i in 0..n {
                let p = inclusion_proof(i, &leaves[..n]);
                assert!(
                    verify_inclusion(i as u64, n as u64, &leaves[i], &p, &r),
                    "{i}/{n}"
                );
            }
            for m in 1..=n {
                let p = consistency_proof(m, &leaves[..n]);
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &root(&leaves[..m]), &r),
                    "{m}->{n}"
                );
            }
        }
    }
}
