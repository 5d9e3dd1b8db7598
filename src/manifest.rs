//! Per-file checksums of a checkpoint directory, in its own `checksums.json`: silent corruption (a failing
//! disk, an interrupted copy, a truncated download) is reported naming the file instead of loading as
//! garbage weights. CRC-32, as zip and gzip use: it catches accidents, not deliberate tampering, and runs
//! at memory speed, so checking a checkpoint costs about as much as reading it once.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "checksums.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    files: BTreeMap<String, FileSum>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSum {
    bytes: u64,
    /// Eight hex digits.
    crc32: String,
}

fn file_sum(path: &Path) -> Result<FileSum> {
    let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut hasher, mut bytes) = (crc32fast::Hasher::new(), 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum { bytes, crc32: format!("{:08x}", hasher.finalize()) })
}

/// Writes `dir/checksums.json` for every regular file directly in `dir` (checkpoints are flat), hidden
/// temporaries excepted.
pub fn write(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST_FILE || name.starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        files.insert(name, file_sum(&entry.path())?);
    }
    let path = dir.join(MANIFEST_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(&Manifest { files })?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Checks every file `dir/checksums.json` lists; the error names the first damaged file. A directory
/// without the manifest (written by other tools, or an export) passes: there is nothing to check against.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a checksum manifest (the file is damaged)", path.display()))?;
    for (name, want) in &manifest.files {
        // Names are plain file names in this directory: a manifest must not point elsewhere.
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            bail!("{}: `{name}` is not a file name in the checkpoint", path.display());
        }
        let file = dir.join(name);
        if !file.is_file() {
            bail!("{}: missing ({MANIFEST_FILE} lists it): the checkpoint is incomplete", file.display());
        }
        let got = file_sum(&file)?;
        if got.bytes != want.bytes {
            bail!(
                "{}: {} bytes where {MANIFEST_FILE} says {}: the file is truncated or damaged",
                file.display(),
                got.bytes,
                want.bytes
            );
        }
        if got.crc32 != want.crc32 {
            bail!(
                "{}: checksum {} where {MANIFEST_FILE} says {}: the file is damaged",
                file.display(),
                got.crc32,
                want.crc32
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_reported_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("model.safetensors");
        std::fs::write(&weights, vec![7u8; 3000]).unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join(".config.json.tmp-1"), "partial").unwrap();
        verify(dir.path()).unwrap(); // no manifest: nothing to check
        write(dir.path()).unwrap();
        let listed: Manifest = serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(listed.files.keys().collect::<Vec<_>>(), ["config.json", "model.safetensors"]);
        verify(dir.path()).unwrap();

        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[1234] ^= 1; // one flipped bit, same size
        std::fs::write(&weights, &bytes).unwrap();
        let e = format!("{:#}", verify(dir.path()).unwrap_err());
        assert!(e.contains("model.safetensors: checksum") && e.contains("damaged"), "{e}");
        std::fs::write(&weights, &bytes[..100]).unwrap();
        let e = format!("{:#}", verify(dir.path()).unwrap_err());
        assert!(e.contains("model.safetensors: 100 bytes where checksums.json says 3000"), "{e}");
        std::fs::remove_file(&weights).unwrap();
        let e = format!("{:#}", verify(dir.path()).unwrap_err());
        assert!(e.contains("model.safetensors: missing"), "{e}");
    }
}
