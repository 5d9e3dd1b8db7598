//! With feature `cuda`, compiles `src/kernels/*.cu` to PTX with nvcc (`$NVCC`, `$CUDA_HOME/bin/nvcc` or
//! `nvcc` on the path) for `$CUDA_COMPUTE_CAP` (default 90: H100 and H200); `src/kernels` includes the
//! PTX and the driver JIT-compiles it at first use. The default build needs no CUDA and runs nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernel modules that use Hopper's arch-specific instructions.
const HOPPER_ONLY: [&str; 2] = ["flash_hopper", "int8_gemm"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").ok().map(PathBuf::from).unwrap_or_else(|| match std::env::var("CUDA_HOME") {
        Ok(home) => Path::new(&home).join("bin/nvcc"),
        Err(_) => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/kernels")
        .expect("reading src/kernels")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src.file_stem().unwrap();
        let ptx = out.join(stem).with_extension("ptx");
        // Modules of Hopper's own instructions (wgmma) are built for sm_90a where the target is 90 (PTX that
        // only an sm_90 card loads; their Rust side checks the card first), and elsewhere build empty.
        let arch = match HOPPER_ONLY.contains(&stem.to_str().unwrap()) && cap == "90" {
            true => format!("-arch=compute_{cap}a"),
            false => format!("-arch=compute_{cap}"),
        };
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &arch, "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("running {} for {}: {e} (set NVCC or CUDA_HOME)", nvcc.display(), src.display())
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
