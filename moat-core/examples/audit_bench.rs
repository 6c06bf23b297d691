//! Audit log benchmark: durable appends per second with group commit, full
//! verification rate, and inclusion proof cost at 1,000,000 entries.
//!
//! Run: `cargo run --release -p moat-core --example audit_bench`
//! (writes in a temporary directory; about a minute on 2 cores).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use moat_core::audit::{self, merkle, AuditWriter};
use serde_json::json;

fn main() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    println!("| measure | result | goal |");
    println!("|---|---:|---|");

    // 1. Durable appends: 64 writers each waiting for their entry to be on disk.
    let dir = t.path().join("appends");
    let w = Arc::new(AuditWriter::open(&dir, &home, "bench").unwrap());
    let threads = 64;
    let per = 1500;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let w = w.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    w.append("request", json!({"k": k, "i": i, "host": "api.github.com", "path": "/user", "status": 200})).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    w.close().unwrap();
    let n = threads * per;
    println!(
        "| durable appends/s (64 concurrent writers, fsync per 10 ms group) | {:.0} | >= 20,000 |",
        n as f64 / secs
    );

    // 2. Full verification of a 1,000,000-entry log.
    let dir = t.path().join("million");
    let w = AuditWriter::open(&dir, &home, "million").unwrap();
    for i in 0..1_000_000u64 {
        w.append_nowait("request", json!({"i": i, "host": "api.github.com", "path": "/repos/o/r/pulls", "status": 200, "grant": "github"}));
    }
    w.close().unwrap();
    let start = Instant::now();
    let r = audit::verify(&dir, &home, None).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(r.ok && r.entries == 1_000_000, "{:?}", r.problems);
    println!(
        "| full verification, entries/s (1,000,000 entries, {} checkpoints) | {:.0} | >= 500,000 |",
        r.checkpoints.len(),
        r.entries as f64 / secs
    );

    // 3. Inclusion proofs at 1,000,000 leaves.
    let mut tree = merkle::Tree::new();
    for i in 0u64..1_000_000 {
        tree.push(merkle::leaf_hash(&i.to_le_bytes()));
    }
    let size = tree.len();
    let root = tree.root(size);
    let samples = 20_000usize;
    let idx: Vec<usize> = (0..samples).map(|i| (i * 7919 + 13) % size).collect();
    let start = Instant::now();
    let proofs: Vec<_> = idx.iter().map(|&i| tree.inclusion_proof(i, size)).collect();
    let gen_us = start.elapsed().as_secs_f64() * 1e6 / samples as f64;
    let start = Instant::now();
    for (k, &i) in idx.iter().enumerate() {
        assert!(merkle::verify_inclusion(
            i as u64,
            size as u64,
            tree.leaf(i).unwrap(),
            &proofs[k],
            &root
        ));
    }
    let ver_us = start.elapsed().as_secs_f64() * 1e6 / samples as f64;
    println!(
        "| inclusion proof generation at 1,000,000 entries, mean | {gen_us:.1} µs | <= 50 µs |"
    );
    println!(
        "| inclusion proof verification at 1,000,000 entries, mean | {ver_us:.1} µs | <= 20 µs |"
    );
}
