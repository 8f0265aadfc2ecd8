//! The file sink: points appended to a local file as JSON lines, one
//! OpenTSDB `/api/put` object per line. The embedded default sink of
//! `wagg demo`; the file can be replayed into OpenTSDB or read with `jq`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{Point, SinkError, WriteReport, encode_json_lines};

/// `[sink]` with `kind = "file"`: JSON lines appended to a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The file points are appended to, one OpenTSDB `/api/put` JSON object
    /// per line. Created if missing (its directory must exist); never
    /// truncated.
    pub path: PathBuf,
}

/// Appends points to a file as JSON lines; each write is on disk
/// (`fdatasync`) before it returns. Concurrent writes are serialized, so
/// lines never interleave.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl FileSink {
    /// Opens (creates) the file for appending.
    ///
    /// # Errors
    ///
    /// [`SinkError::Io`] if the file cannot be opened.
    pub fn open(cfg: FileSinkConfig) -> Result<FileSink, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .map_err(|source| SinkError::Io {
                op: "cannot open for appending",
                path: cfg.path.clone(),
                source,
            })?;
        Ok(FileSink {
            path: cfg.path,
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends `points` (those [`Point::invalid_reason`] passes; the others
    /// are refused) and syncs the file's data to disk, on a blocking thread.
    ///
    /// # Errors
    ///
    /// [`SinkError::Io`] if the write or the sync fails (some lines may have
    /// been written), [`SinkError::Task`] if the blocking task panicked.
    pub async fn write(&self, points: &[Point]) -> Result<WriteReport, SinkError> {
        let mut report = WriteReport::default();
        let mut lines = Vec::new();
        if points.iter().all(|p| p.invalid_reason().is_none()) {
            encode_json_lines(points, &mut lines);
            report.written = points.len();
        } else {
            for p in points {
                match p.invalid_reason() {
                    Some(reason) => report.refused.push((p.clone(), reason.to_owned())),
                    None => {
                        encode_json_lines(std::slice::from_ref(p), &mut lines);
                        report.written += 1;
                    }
                }
            }
            warn!(
                refused = report.refused.len(),
                first_reason = %report.refused[0].1,
                "Points were refused; they are dropped."
            );
        }
        if lines.is_empty() {
            return Ok(report);
        }
        let file = self.file.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave the File itself
            // inconsistent: keep using it.
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let io = |op| {
                let path = &path;
                move |source| SinkError::Io {
                    op,
                    path: path.clone(),
                    source,
                }
            };
            file.write_all(&lines).map_err(io("cannot append to"))?;
            file.flush().map_err(io("cannot flush"))?;
            file.sync_data().map_err(io("cannot sync"))
        })
        .await
        .map_err(SinkError::Task)??;
        debug!(points = report.written, path = %self.path.display(), "Appended points to file.");
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::point;
    use super::*;

    #[tokio::test]
    async fn appends_lines_that_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.jsonl");
        let sink = FileSink::open(FileSinkConfig { path: path.clone() }).unwrap();
        let first = vec![point("a", 1, 1.0, &[("h", "x")]), point("b", 2, 2.5, &[])];
        let second = vec![point("c", 3, -3.0, &[("h", "y")])];
        assert_eq!(sink.write(&first).await.unwrap().written, 2);
        assert_eq!(sink.write(&second).await.unwrap().written, 1);
        drop(sink);
        // Reopening appends, never truncates.
        let sink = FileSink::open(FileSinkConfig { path: path.clone() }).unwrap();
        let bad = vec![point("", 4, 0.0, &[]), point("d", 4, 4.0, &[])];
        let report = sink.write(&bad).await.unwrap();
        assert_eq!((report.written, report.refused.len()), (1, 1));

        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<Point> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expected: Vec<Point> = first
            .into_iter()
            .chain(second)
            .chain([bad[1].clone()])
            .collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn open_error_names_the_path() {
        let err = FileSink::open(FileSinkConfig {
            path: "/nonexistent-dir/x.jsonl".into(),
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/x.jsonl"),
            "{err}"
        );
    }
}
