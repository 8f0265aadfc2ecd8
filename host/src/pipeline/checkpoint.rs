//! The checkpoint: everything needed to resume without the messages it
//! covers, written atomically.
//!
//! Messages are acknowledged to the broker only after a checkpoint holding
//! their effect is on disk: every shard's open buckets (by series key), the
//! flushed points the sink has not confirmed, the watermark, and the hashes
//! of the messages taken since the checkpoint before the last. After a crash
//! the broker redelivers what was not acknowledged; a redelivered message
//! whose hash is in the checkpoint was already counted, and is acknowledged
//! without being counted again.
//!
//! On disk it is `checkpoint.bin`: a magic number, then the [`Checkpoint`]
//! in postcard's binary encoding. Keys are raw bytes and numbers varints:
//! less than half the JSON this replaced (`checkpoint.json`, version 1; 37.5
//! against 80.3 MB for 541 566 open buckets), and no text to format or
//! escape, which matters because a checkpoint holds every open bucket and is
//! written every second or so. A version 1
//! JSON checkpoint left by an older wagg is still read, once: the first new
//! checkpoint replaces it.
//!
//! Version 3 writes series keys with back-references
//! ([`crate::router::KeyValues`]). A version 2 or 1 checkpoint's keys are
//! written again that way as it is read, so that a restored series and its
//! new samples are one series; an older wagg refuses a version 3 file rather
//! than read references as characters of tag values.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::runtime::cache::write_atomic_with;
use crate::shard::StateRow;
use crate::sink::{Point, TOUCH_RUN, touch_key};

/// Format version; a checkpoint of another version is refused, not guessed.
pub const VERSION: u32 = 3;

/// The binary version before keys had back-references: read, not written.
const KEYS_IN_FULL_VERSION: u32 = 2;

/// The JSON checkpoint of older wagg versions, read but not written.
const JSON_VERSION: u32 = 1;

/// The first bytes of a binary checkpoint: "WAGGCKP" and the version.
const MAGIC: [u8; 8] = *b"WAGGCKP\x03";

/// [`MAGIC`] of [`KEYS_IN_FULL_VERSION`].
const MAGIC_KEYS_IN_FULL: [u8; 8] = *b"WAGGCKP\x02";

/// A checkpoint as written to disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`VERSION`].
    pub version: u32,
    /// Buckets ending at or before this were flushed.
    pub flushed_watermark: u64,
    /// Latest event time seen.
    pub max_event_time: u64,
    /// Open buckets of every shard.
    pub rows: Rows,
    /// Flushed points the sink has not confirmed.
    pub pending: Pending,
    /// XXH3 hashes of counted messages whose acknowledgement the broker had
    /// not confirmed (see [`super::dedup`]).
    pub recent_messages: Vec<u64>,
}

/// Items of a checkpoint shared with whoever produced them, in chunks,
/// instead of copied: the outbox's jobs (flushed points, each with its own
/// tag map) and the shards' snapshots (open rows, each holding a key that a
/// copy would touch again: a cache miss per row at hundreds of thousands of
/// live series). On disk it is one flat list, as in version 1 from the
/// start.
#[derive(Debug, Clone)]
pub struct Shared<T>(Vec<Arc<Vec<T>>>);

/// Flushed points the sink has not confirmed.
pub type Pending = Shared<Point>;

/// Open buckets of every shard.
pub type Rows = Shared<StateRow>;

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared(Vec::new())
    }
}

impl<T> Shared<T> {
    /// The items of `chunks`, in order.
    pub fn from_chunks(chunks: Vec<Arc<Vec<T>>>) -> Self {
        Shared(chunks)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.0.iter().map(|c| c.len()).sum()
    }

    /// Whether there is no item.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|c| c.is_empty())
    }

    /// The items, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|c| c.iter())
    }
}

impl<T: Clone> Shared<T> {
    /// The items, in order, owned (copied only from a chunk still shared).
    pub fn into_vec(self) -> Vec<T> {
        let mut items = Vec::with_capacity(self.len());
        for chunk in self.0 {
            match Arc::try_unwrap(chunk) {
                Ok(mut chunk) => items.append(&mut chunk),
                Err(shared) => items.extend(shared.iter().cloned()),
            }
        }
        items
    }
}

/// Equal when the items are, however they are split into chunks.
impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<T> From<Vec<T>> for Shared<T> {
    fn from(items: Vec<T>) -> Self {
        Shared(vec![Arc::new(items)])
    }
}

/// An item whose serialized form reads a series key from elsewhere in
/// memory: [`Shared`] brings a run of them into cache before it serializes
/// the run (see `touch_key` in the sink).
pub trait Touch {
    /// Reads the item's key, so that its cache miss is under way.
    fn touch(&self);
}

impl Touch for Point {
    fn touch(&self) {
        self.tags.touch();
    }
}

impl Touch for StateRow {
    fn touch(&self) {
        touch_key(&self.key);
    }
}

impl<T: Serialize + Touch> Serialize for Shared<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // The length up front: binary encodings need it.
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for run in self.0.iter().flat_map(|chunk| chunk.chunks(TOUCH_RUN)) {
            run.iter().for_each(Touch::touch);
            for item in run {
                seq.serialize_element(item)?;
            }
        }
        seq.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(Shared::from)
    }
}

/// Errors reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The checkpoint file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a checkpoint of this version.
    #[error("checkpoint {path} is unreadable: {reason}")]
    Corrupt {
        /// The checkpoint file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where a pipeline keeps its checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
    json: PathBuf,
}

impl CheckpointStore {
    /// The checkpoint file in `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        CheckpointStore {
            path: data_dir.join("checkpoint.bin"),
            json: data_dir.join("checkpoint.json"),
        }
    }

    /// The checkpoint file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the checkpoint (or an older wagg's JSON one); `None` if there
    /// is none yet.
    ///
    /// # Errors
    ///
    /// If the file exists but cannot be read or parsed: starting without it
    /// would silently lose (or double-count) the data it holds, so this is
    /// an error for the operator.
    pub fn load(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        if let Some(bytes) = read(&self.path)? {
            return decode_binary(&bytes)
                .map(Some)
                .map_err(|reason| self.corrupt(&self.path, reason));
        }
        let Some(bytes) = read(&self.json)? else {
            return Ok(None);
        };
        let mut cp: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(&self.json, e.to_string()))?;
        if cp.version != JSON_VERSION {
            return Err(self.corrupt(
                &self.json,
                format!(
                    "version {} (this wagg reads {JSON_VERSION} as JSON)",
                    cp.version
                ),
            ));
        }
        cp.reencode_keys();
        Ok(Some(cp))
    }

    /// Writes `cp` atomically (temporary file, fsync, rename), streamed:
    /// it is never held in memory whole.
    ///
    /// # Errors
    ///
    /// On any I/O error; the previous checkpoint is then still in place.
    pub fn save(&self, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        write_atomic_with(&self.path, |w| {
            w.write_all(&MAGIC)?;
            postcard::to_io(cp, w)
                .map(drop)
                .map_err(std::io::Error::other)
        })
        .map_err(io)?;
        // The JSON checkpoint of an older wagg is superseded now.
        match std::fs::remove_file(&self.json) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::Io {
                path: self.json.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn corrupt(&self, path: &Path, reason: String) -> CheckpointError {
        CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }
    }
}

/// The file's bytes; `None` if it does not exist.
fn read(path: &Path) -> Result<Option<Vec<u8>>, CheckpointError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn decode_binary(bytes: &[u8]) -> Result<Checkpoint, String> {
    let (body, version) = match bytes.strip_prefix(&MAGIC) {
        Some(body) => (body, VERSION),
        None => bytes
            .strip_prefix(&MAGIC_KEYS_IN_FULL)
            .map(|body| (body, KEYS_IN_FULL_VERSION))
            .ok_or(format!(
                "not a wagg checkpoint of version {KEYS_IN_FULL_VERSION} or {VERSION} (wrong magic number)"
            ))?,
    };
    let mut cp: Checkpoint = postcard::from_bytes(body).map_err(|e| e.to_string())?;
    if cp.version != version {
        return Err(format!(
            "version {} under the magic number of version {version}",
            cp.version
        ));
    }
    if version == KEYS_IN_FULL_VERSION {
        cp.reencode_keys();
    }
    Ok(cp)
}

impl Checkpoint {
    /// Makes a checkpoint of an older version one of [`VERSION`]: its keys,
    /// written in full, written as this version writes them. A key that is
    /// not a series key is left as it is, for the restore to name.
    fn reencode_keys(&mut self) {
        let mut rows = std::mem::take(&mut self.rows).into_vec();
        for row in &mut rows {
            if let Some(key) = crate::router::reencode_key(&row.key) {
                row.key = key.into();
            }
        }
        self.rows = rows.into();
        self.version = VERSION;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        assert_eq!(store.load().unwrap(), None);
        let cp = Checkpoint {
            version: VERSION,
            flushed_watermark: 120,
            max_event_time: 130,
            recent_messages: vec![1, 2],
            rows: vec![StateRow {
                key: vec![0, 0xfe, 0xff].into(),
                bucket: 60,
                count: u64::MAX,
                sum: -0.0,
                min: f64::MIN_POSITIVE,
                max: 1e300,
            }]
            .into(),
            pending: Pending::from_chunks(vec![
                Arc::new(vec![point(1), point(2)]),
                Arc::new(vec![point(3)]),
            ]),
        };
        store.save(&cp).unwrap();
        assert_eq!(store.load().unwrap(), Some(cp));
        for garbage in [&b"WAGGCKP\x03garbage"[..], b"WAGGCKP\x02garbage"] {
            std::fs::write(store.path(), garbage).unwrap();
            assert!(matches!(store.load(), Err(CheckpointError::Corrupt { .. })));
        }
        std::fs::write(store.path(), b"{not binary").unwrap();
        assert!(matches!(store.load(), Err(CheckpointError::Corrupt { .. })));
    }

    #[test]
    fn an_older_json_checkpoint_is_read_once_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let row = StateRow {
            key: vec![0, 0xff, b'a'].into(),
            bucket: 60,
            count: 2,
            sum: 3.0,
            min: 1.0,
            max: 2.0,
        };
        // As wagg wrote it before version 2: JSON, keys in hex.
        let json = serde_json::json!({
            "version": 1, "flushed_watermark": 60, "max_event_time": 70,
            "rows": [{"key": "00ff61", "bucket": 60, "count": 2, "sum": 3.0, "min": 1.0, "max": 2.0}],
            "pending": [], "recent_messages": [7]
        });
        std::fs::write(dir.path().join("checkpoint.json"), json.to_string()).unwrap();
        let cp = store.load().unwrap().unwrap();
        assert_eq!(cp.rows, vec![row].into());
        assert_eq!((cp.version, cp.recent_messages.clone()), (VERSION, vec![7]));
        store.save(&cp).unwrap();
        assert!(!dir.path().join("checkpoint.json").exists());
        assert_eq!(store.load().unwrap(), Some(cp));
    }

    #[test]
    fn a_version_2_checkpoints_keys_are_written_as_new_keys_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let row = |key: &[u8]| StateRow {
            key: key.into(),
            bucket: 60,
            count: 2,
            sum: 3.0,
            min: 1.0,
            max: 2.0,
        };
        let in_full = b"\x01c1\0ex.com\0www.ex.com\0";
        let not_a_key = b"\x01no terminator";
        let mut old = Checkpoint {
            version: KEYS_IN_FULL_VERSION,
            rows: vec![row(in_full), row(not_a_key)].into(),
            ..Checkpoint::default()
        };
        let mut bytes = MAGIC_KEYS_IN_FULL.to_vec();
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        std::fs::write(store.path(), &bytes).unwrap();
        let cp = store.load().unwrap().unwrap();
        assert_eq!(cp.version, VERSION);
        assert_eq!(
            cp.rows,
            vec![row(b"\x01c1\0ex.com\0www\x02\0"), row(not_a_key)].into()
        );
        // A version 2 file with the version 3 number is refused, not read
        // as either.
        old.version = VERSION;
        let mut bytes = MAGIC_KEYS_IN_FULL.to_vec();
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        std::fs::write(store.path(), &bytes).unwrap();
        assert!(matches!(store.load(), Err(CheckpointError::Corrupt { .. })));
    }

    #[test]
    fn pending_points_are_one_flat_list_on_disk() {
        let pending =
            Pending::from_chunks(vec![Arc::new(vec![point(1)]), Arc::new(vec![point(2)])]);
        let json = serde_json::to_value(&pending).unwrap();
        assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");
        let back: Pending = serde_json::from_value(json).unwrap();
        assert_eq!(back, pending);
        assert_eq!(
            back.into_vec()
                .iter()
                .map(|p| p.timestamp)
                .collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[test]
    fn points_with_tags_read_from_their_key_are_stored_as_their_tags() {
        let layout = Arc::new(
            crate::sink::KeyLayout::new(["customer", "pop"], [("rollup".into(), "c".into())])
                .unwrap(),
        );
        let key: crate::router::SharedKey = b"\x00c1\0lga\0".as_slice().into();
        let keyed = Point {
            tags: layout.tags(&key).unwrap(),
            ..point(7)
        };
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let cp = Checkpoint {
            version: VERSION,
            pending: vec![keyed.clone()].into(),
            ..Checkpoint::default()
        };
        store.save(&cp).unwrap();
        let back = store.load().unwrap().unwrap().pending.into_vec();
        assert_eq!(back, vec![keyed]);
        assert_eq!(back[0].tags.get("pop").as_deref(), Some("lga"));
        assert_eq!(back[0].tags.len(), 3);
    }

    fn point(timestamp: u64) -> Point {
        Point {
            metric: "m".into(),
            timestamp,
            value: 1.0,
            tags: [("k".to_string(), "v".to_string())].into_iter().collect(),
        }
    }
}
