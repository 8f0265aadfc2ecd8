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

/// Points encoded and written at a time: a flush of millions of points is
/// streamed through a buffer of about this many lines (~200 bytes each),
/// not built whole in memory.
const CHUNK_POINTS: usize = 4096;

/// Appends points to a file as JSON lines; each write is on disk
/// (`fdatasync`) before it returns. Concurrent writes are serialized, so
/// lines never interleave.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    /// Held for a whole write: its chunks go to the file in one piece.
    writing: tokio::sync::Mutex<()>,
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
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends `points` (those [`Point::invalid_reason`] passes; the others
    /// are refused) and syncs the file's data to disk, on blocking threads,
    /// [`CHUNK_POINTS`] lines at a time.
    ///
    /// # Errors
    ///
    /// [`SinkError::Io`] if a write or the sync fails (some lines may have
    /// been written), [`SinkError::Task`] if a blocking task panicked.
    pub async fn write(&self, points: &[Point]) -> Result<WriteReport, SinkError> {
        let _writing = self.writing.lock().await;
        let mut report = WriteReport::default();
        let mut lines = Vec::new();
        for chunk in points.chunks(CHUNK_POINTS) {
            lines.clear();
            if chunk.iter().all(|p| p.invalid_reason().is_none()) {
                encode_json_lines(chunk, &mut lines);
                report.written += chunk.len();
            } else {
                for p in chunk {
                    match p.invalid_reason() {
                        Some(reason) => report.refused.push((p.clone(), reason.to_owned())),
                        None => {
                            encode_json_lines(std::slice::from_ref(p), &mut lines);
                            report.written += 1;
                        }
                    }
                }
            }
            if !lines.is_empty() {
                lines = self.blocking(lines, false).await?;
            }
        }
        if let Some((_, first_reason)) = report.refused.first() {
            warn!(
                refused = report.refused.len(),
                first_reason = %first_reason,
                "Points were refused; they are dropped."
            );
        }
        if report.written == 0 {
            return Ok(report);
        }
        self.blocking(Vec::new(), true).await?;
        debug!(points = report.written, path = %self.path.display(), "Appended points to file.");
        Ok(report)
    }

    /// Appends `bytes` (and with `sync`, flushes and syncs the data) on a
    /// blocking thread; returns the buffer for the next chunk.
    async fn blocking(&self, bytes: Vec<u8>, sync: bool) -> Result<Vec<u8>, SinkError> {
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
            file.write_all(&bytes).map_err(io("cannot append to"))?;
            if sync {
                file.flush().map_err(io("cannot flush"))?;
                file.sync_data().map_err(io("cannot sync"))?;
            }
            Ok(bytes)
        })
        .await
        .map_err(SinkError::Task)?
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

    #[tokio::test]
    async fn a_flush_larger_than_a_chunk_is_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.jsonl");
        let sink = FileSink::open(FileSinkConfig { path: path.clone() }).unwrap();
        let n = CHUNK_POINTS * 2 + 7;
        let mut points: Vec<Point> = (0..n)
            .map(|i| point("m", i as u64, i as f64, &[("i", &i.to_string())]))
            .collect();
        // One refused point in the second chunk.
        points[CHUNK_POINTS + 3] = point("", 1, 0.0, &[]);
        let report = sink.write(&points).await.unwrap();
        assert_eq!((report.written, report.refused.len()), (n - 1, 1));
        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<Point> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        points.remove(CHUNK_POINTS + 3);
        assert_eq!(back, points);
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
