//! The run's output directory (`checkpoint.out_dir`): one run at a time in it (a lock file naming the
//! process and host), never another run's files replaced by mistake, and nothing written through a
//! symbolic link that leads out of it (a run directory copied from elsewhere may hold one).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, FINAL_DIR, RUN_CONFIG_FILE};
use crate::plot::LOSS_PNG;
use crate::train::metrics::METRICS_FILE;

pub const LOCK_FILE: &str = "bessie-train.lock";
/// Where the training data cache and a random base model go (`model.init`).
pub const CACHE_DIR: &str = "cache";
pub const BASE_MODEL_DIR: &str = "base-model";
/// `OUT/previous-run-N/`: where `Start::Overwrite` moves an earlier run.
const PREVIOUS_RUN: &str = "previous-run-";

/// How a run starts in its output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run; refused where another run left checkpoints or metrics.
    Fresh,
    /// A new run that first moves another run's files into `OUT/previous-run-N/` (nothing is deleted).
    Overwrite,
    /// Continues from the newest checkpoint. A checkpoint saved under another configuration is refused
    /// unless `accept_changes` (then the changes are recorded).
    Resume { accept_changes: bool },
}

/// Refuses a symbolic link anywhere training writes: the entries it writes in `out` (checkpoints
/// included) and everything in `out/cache` and `out/base-model`. Following one would overwrite or delete
/// files outside the run directory.
pub fn refuse_links(out: &Path) -> Result<()> {
    let mut paths: Vec<PathBuf> =
        [RUN_CONFIG_FILE, METRICS_FILE, LOSS_PNG, CACHE_DIR, BASE_MODEL_DIR, FINAL_DIR, LOCK_FILE]
            .map(|n| out.join(n))
            .into();
    paths.extend(checkpoint::list(out)?.into_iter().map(|(_, p)| p));
    for dir in [CACHE_DIR, BASE_MODEL_DIR] {
        let dir = out.join(dir);
        if dir.is_dir() && !dir.is_symlink() {
            for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                paths.push(e?.path());
            }
        }
    }
    for p in paths {
        if p.is_symlink() {
            bail!(
                "{} is a symbolic link: training writes there and does not follow links out of its output \
                 directory; remove the link (or choose another checkpoint.out_dir)",
                p.display()
            );
        }
    }
    Ok(())
}

/// What the lock file holds.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    /// The process's start time (clock ticks since boot, `/proc/PID/stat`), so that a recycled pid is
    /// not mistaken for the run that took the lock.
    started: Option<u64>,
}

impl Holder {
    fn this_process() -> Self {
        let pid = std::process::id();
        Self { pid, host: host_name(), started: process_start(pid) }
    }

    /// Whether the holder still runs; None when that cannot be told (another host).
    fn alive(&self) -> Option<bool> {
        if self.host != host_name() {
            return None;
        }
        Some(process_start(self.pid).is_some_and(|s| self.started.is_none_or(|started| s == started)))
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Field 22 of `/proc/PID/stat` (after the parenthesized command name, which may hold spaces).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// The run's hold on its output directory; released when dropped (a killed run's lock is stale, and the
/// next run on the same host takes it over).
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    pub fn acquire(out: &Path) -> Result<Self> {
        let path = out.join(LOCK_FILE);
        let me = Holder::this_process();
        // Twice at most: a stale lock is removed once, and the second attempt races fairly with any other
        // run that removed it too (only one create_new succeeds).
        let text = serde_json::to_vec(&me)?;
        for _ in 0..2 {
            match publish(&path, &text) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
            let text = std::fs::read(&path).unwrap_or_default();
            let holder: Option<Holder> = serde_json::from_slice(&text).ok();
            let age = std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            let stale = match &holder {
                Some(h) => match h.alive() {
                    Some(alive) => !alive,
                    None => bail!(
                        "{} is in use by bessie-train (pid {} on host {}; lock file {}). If that run is no \
                         longer running, delete the lock file",
                        out.display(),
                        h.pid,
                        h.host,
                        path.display()
                    ),
                },
                // Empty or damaged (a file system without hard links, killed between creating and writing
                // it), unless that is happening now.
                None => age.is_some_and(|a| a.as_secs() >= 10),
            };
            if !stale {
                let who = holder.map(|h| format!("pid {}", h.pid)).unwrap_or_else(|| "a run starting now".into());
                bail!(
                    "{} is in use by another bessie-train run ({who}, lock file {}): two runs in one output \
                     directory would overwrite each other's checkpoints and metrics; wait for it, or choose \
                     another checkpoint.out_dir",
                    out.display(),
                    path.display()
                );
            }
            if let Some(h) = &holder {
                eprintln!("taking over the lock of a run that no longer runs (pid {} on {})", h.pid, h.host);
            }
            std::fs::remove_file(&path).with_context(|| format!("removing the stale lock {}", path.display()))?;
        }
        bail!("{}: another run took the lock at the same moment", path.display())
    }
}

/// Creates the lock file `path` holding `text`, or fails with `AlreadyExists` where it exists. The file
/// appears whole: written under a name of this process's and linked into place (a link, like `create_new`,
/// fails where the name exists), so a run killed while taking the lock leaves no empty lock for the next
/// run to wait out. Where the file system has no hard links, created and then written.
fn publish(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let write = |file: &mut std::fs::File| file.write_all(text).and_then(|_| file.sync_all());
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    // A leftover of an earlier process with this pid goes first; create_new never writes through a link.
    let _ = std::fs::remove_file(&tmp);
    write(&mut std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            write(&mut std::fs::OpenOptions::new().write(true).create_new(true).open(path)?)
        }
        other => other,
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The files of an earlier run in `out`: its checkpoints, final checkpoint and (non-empty) metrics.
fn earlier_run(out: &Path) -> Result<Vec<String>> {
    let mut found: Vec<String> = checkpoint::list(out)?
        .iter()
        .map(|(_, p)| p.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    if out.join(FINAL_DIR).exists() {
        found.push(FINAL_DIR.into());
    }
    let metrics = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap_or_default();
    if !metrics.trim().is_empty() {
        found.push(format!("{METRICS_FILE} ({} lines)", metrics.lines().count()));
    }
    Ok(found)
}

/// Makes `out` ready for a run started as `start`: a fresh run refuses a directory holding another run;
/// an overwriting one moves that run (and its base model and run config) into `OUT/previous-run-N/`.
pub fn claim(out: &Path, start: Start) -> Result<()> {
    let found = earlier_run(out)?;
    match start {
        Start::Resume { .. } => return Ok(()),
        _ if found.is_empty() => return Ok(()),
        Start::Fresh => bail!(
            "{} holds another run ({}): pass --resume to continue it, choose another checkpoint.out_dir, or \
             pass --overwrite to move it into {}/{PREVIOUS_RUN}N and start afresh (nothing is deleted)",
            out.display(),
            found.join(", "),
            out.display()
        ),
        Start::Overwrite => {}
    }
    let aside = (1..)
        .map(|n| out.join(format!("{PREVIOUS_RUN}{n}")))
        .find(|p| p.symlink_metadata().is_err())
        .expect("a free name");
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    let mut moved: Vec<PathBuf> = checkpoint::list(out)?.into_iter().map(|(_, p)| p).collect();
    moved.extend([FINAL_DIR, METRICS_FILE, LOSS_PNG, RUN_CONFIG_FILE, BASE_MODEL_DIR].map(|n| out.join(n)));
    for p in moved.iter().filter(|p| p.symlink_metadata().is_ok()) {
        let to = aside.join(p.file_name().expect("named entries"));
        std::fs::rename(p, &to).with_context(|| format!("moving {} to {}", p.display(), to.display()))?;
    }
    eprintln!("--overwrite: moved the earlier run ({}) into {}", found.join(", "), aside.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_refuses_a_live_holder_and_takes_over_a_dead_one() {
        let out = tempfile::tempdir().unwrap();
        let lock = Lock::acquire(out.path()).unwrap();
        let held: Holder = serde_json::from_slice(&std::fs::read(out.path().join(LOCK_FILE)).unwrap()).unwrap();
        assert_eq!(held, Holder::this_process());
        let e = format!("{:#}", Lock::acquire(out.path()).unwrap_err());
        assert!(e.contains(&format!("in use by another bessie-train run (pid {},", std::process::id())), "{e}");
        drop(lock);
        assert!(!out.path().join(LOCK_FILE).exists());

        // A pid that does not run (beyond Linux's range), and one that runs but started at another time.
        for started in [None, Some(u64::MAX)] {
            let pid = if started.is_none() { 4_000_000_000 } else { std::process::id() };
            let dead = Holder { pid, host: host_name(), started };
            std::fs::write(out.path().join(LOCK_FILE), serde_json::to_vec(&dead).unwrap()).unwrap();
            drop(Lock::acquire(out.path()).unwrap());
        }
        // Another host's lock cannot be judged: refused, naming it.
        let remote = Holder { pid: 7, host: "elsewhere".into(), started: None };
        std::fs::write(out.path().join(LOCK_FILE), serde_json::to_vec(&remote).unwrap()).unwrap();
        let e = format!("{:#}", Lock::acquire(out.path()).unwrap_err());
        assert!(e.contains("pid 7 on host elsewhere") && e.contains("delete the lock file"), "{e}");
    }

    #[test]
    fn links_where_training_writes_are_refused() {
        let out = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        refuse_links(out.path()).unwrap();
        std::fs::create_dir(out.path().join(BASE_MODEL_DIR)).unwrap();
        for link in [RUN_CONFIG_FILE, METRICS_FILE, CACHE_DIR, "base-model/tokenizer.model", "checkpoint-3"] {
            let path = out.path().join(link);
            std::os::unix::fs::symlink(target.path().join("x"), &path).unwrap();
            let e = format!("{:#}", refuse_links(out.path()).unwrap_err());
            assert!(e.contains(&format!("{} is a symbolic link", path.display())), "{e}");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_fresh_run_refuses_an_earlier_one_and_overwrite_moves_it_aside() {
        let out = tempfile::tempdir().unwrap();
        claim(out.path(), Start::Fresh).unwrap();
        std::fs::write(out.path().join(METRICS_FILE), "").unwrap();
        claim(out.path(), Start::Fresh).unwrap(); // an empty log holds nothing
        std::fs::create_dir(out.path().join("checkpoint-4")).unwrap();
        std::fs::write(out.path().join(METRICS_FILE), "{}\n{}\n").unwrap();
        let e = format!("{:#}", claim(out.path(), Start::Fresh).unwrap_err());
        assert!(e.contains("holds another run (checkpoint-4, metrics.jsonl (2 lines))"), "{e}");
        assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
        claim(out.path(), Start::Resume { accept_changes: false }).unwrap();
        for n in [1, 2] {
            std::fs::create_dir_all(out.path().join("checkpoint-4")).unwrap();
            claim(out.path(), Start::Overwrite).unwrap();
            let aside = out.path().join(format!("previous-run-{n}"));
            assert!(aside.join("checkpoint-4").is_dir(), "run {n} moved into {}", aside.display());
            assert!(!out.path().join("checkpoint-4").exists());
        }
        assert!(out.path().join("previous-run-1").join(METRICS_FILE).exists());
    }
}
