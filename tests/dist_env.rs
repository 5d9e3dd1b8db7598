//! A default build (no `mpi` feature) started as one of several MPI ranks refuses to train alone on what
//! would be a shard of the data, and says how to build for MPI.
#![cfg(not(feature = "mpi"))]

use std::process::{Command, Stdio};

#[test]
fn several_ranks_without_the_mpi_feature_fail_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_bessie-train"))
        .args(["--set", "train.max_steps=1"])
        // What Open MPI's mpirun tells each of 2 ranks.
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .stdin(Stdio::null())
        .output()
        .expect("starting bessie-train");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let want = "launched with 2 ranks but built without the `mpi` feature: cargo build --release --features mpi";
    assert!(stderr.contains(want), "stderr: {stderr}");
}
