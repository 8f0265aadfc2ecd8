//! The data directory's ownership: one `wagg run` at a time, and what a
//! killed one left half-written cleared away.
//!
//! Two hosts on one data directory would overwrite each other's checkpoint
//! (and ack what the other counted), so `wagg run` holds an exclusive lock
//! on `<data_dir>/wagg.lock` while it runs; the kernel releases it when the
//! process dies, however it dies. Holding it also proves that no other
//! process is writing here, so the temporary files of atomic writes
//! (`<name>.tmp<pid>`) that a killed process left behind can be removed: a
//! SIGKILL during a checkpoint leaves one as large as the checkpoint, and a
//! crash loop would otherwise fill the disk.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Why the data directory cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another process holds the lock: an operator's mistake.
    #[error(
        "another wagg is running on data directory {path} (it holds {path}/wagg.lock); \
         give each host its own [pipeline] data_dir"
    )]
    Busy {
        /// The data directory.
        path: PathBuf,
    },
    /// The directory or its lock file cannot be used: a disk or permission
    /// problem.
    #[error("cannot use data directory {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The lock on a data directory, held until dropped.
#[derive(Debug)]
pub struct DataDir {
    _lock: File,
    /// Stale temporaries removed when it was taken: (path, bytes).
    pub removed: Vec<(PathBuf, u64)>,
}

impl DataDir {
    /// Creates `path` if needed, takes its lock, and removes the stale
    /// temporaries in it and its subdirectories.
    ///
    /// # Errors
    ///
    /// [`DataDirError::Busy`] if another process holds the lock,
    /// [`DataDirError::Io`] otherwise.
    pub fn take(path: &Path) -> Result<DataDir, DataDirError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| DataDirError::Io { path: p, source }
        };
        std::fs::create_dir_all(path).map_err(io(path))?;
        let lock_path = path.join("wagg.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Busy {
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let mut removed = Vec::new();
        remove_temporaries(path, &mut removed).map_err(io(path))?;
        Ok(DataDir {
            _lock: lock,
            removed,
        })
    }
}

/// Whether `name` is an atomic write's temporary: `<stem>.tmp<digits>`.
fn is_temporary(name: &str) -> bool {
    name.rsplit_once(".tmp").is_some_and(|(stem, pid)| {
        !stem.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The subdirectories wagg writes atomically into (compiled modules, the
/// module registry); nothing else under the data directory is touched, so
/// a data directory shared with other programs loses none of their files.
const OWN_SUBDIRS: [&str; 2] = ["compiled", "modules"];

fn remove_temporaries(dir: &Path, removed: &mut Vec<(PathBuf, u64)>) -> std::io::Result<()> {
    remove_in(dir, removed)?;
    for sub in OWN_SUBDIRS {
        match remove_in(&dir.join(sub), removed) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                dir = %dir.join(sub).display(),
                error = %e,
                "Could not look for stale temporary files."
            ),
            _ => {}
        }
    }
    Ok(())
}

fn remove_in(dir: &Path, removed: &mut Vec<(PathBuf, u64)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.file_name().to_str().is_some_and(is_temporary) {
            let path = entry.path();
            let bytes = entry.metadata().map_or(0, |m| m.len());
            std::fs::remove_file(&path)?;
            removed.push((path, bytes));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_checkpoint_write_left_its_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("compiled")).unwrap();
        for name in [
            "checkpoint.tmp4242",
            "compiled/abc.cwasm.tmp7",
            "checkpoint.bin",
        ] {
            std::fs::write(data.join(name), b"x").unwrap();
        }
        std::fs::write(data.join("notes.tmp"), b"kept").unwrap();
        std::fs::create_dir_all(data.join("other")).unwrap();
        std::fs::write(data.join("other/theirs.tmp9"), b"kept").unwrap();
        let taken = DataDir::take(&data).unwrap();
        let mut removed: Vec<_> = taken.removed.iter().map(|(p, _)| p.clone()).collect();
        removed.sort();
        assert_eq!(
            removed,
            [
                data.join("checkpoint.tmp4242"),
                data.join("compiled/abc.cwasm.tmp7")
            ]
        );
        assert!(data.join("checkpoint.bin").exists());
        assert!(data.join("notes.tmp").exists());
        assert!(
            data.join("other/theirs.tmp9").exists(),
            "not wagg's directory"
        );
    }

    #[test]
    fn a_second_host_on_the_same_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::take(dir.path()).unwrap();
        let err = DataDir::take(dir.path()).unwrap_err();
        assert!(matches!(err, DataDirError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("own [pipeline] data_dir"), "{err}");
        drop(first);
        DataDir::take(dir.path()).unwrap();
    }
}
