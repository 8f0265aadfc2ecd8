//! The recording file: messages with their arrival offsets, compact,
//! versioned and appendable, with a torn tail detected and ignored.
//!
//! # Format (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! header   magic "WAGGREC\0" (8 bytes) | version u16 = 1 | flags u16 = 0 | reserved u32 = 0
//! record*  len u32 | offset_micros u64 | body (len bytes) | crc32 u32
//! ```
//!
//! - `offset_micros`: when the message arrived, in microseconds since the
//!   recording started; non-decreasing through the file. A recording
//!   continued later (appended to) goes on from its last offset: the pause
//!   between the two sessions is not replayed.
//! - `crc32` (IEEE, as zlib and gzip) covers `len`, `offset_micros` and the
//!   body, so a torn write, a flipped bit or a garbage length is caught.
//! - A record whose `len` exceeds [`MAX_RECORD_BYTES`] is corrupt.
//!
//! A process that dies mid-write leaves a partial record at the end. The
//! reader returns every whole record before it and reports the rest as a
//! [`Tail`] (how many bytes, and why) instead of failing: recordings are
//! taken of live traffic and the crash that cut one short should not cost
//! the part already recorded. The reader stops at the *first* bad record,
//! wherever it is: after a checksum failure nothing that follows can be
//! trusted to start at a record boundary. Appending to a file first cuts
//! such a tail off, so that new records follow the last good one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first 8 bytes of every recording.
pub const MAGIC: [u8; 8] = *b"WAGGREC\0";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Size of the file header.
pub const HEADER_BYTES: u64 = 16;
/// Bytes a record adds to its body: length, offset, checksum.
pub const RECORD_OVERHEAD: u64 = 16;
/// Largest body a record may hold (the decoder's default limit is 4 MiB;
/// this leaves room for recordings of hosts configured higher). A larger
/// length read from a file means the file is corrupt there.
pub const MAX_RECORD_BYTES: u32 = 64 << 20;

/// What can go wrong reading or writing a recording.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordingError {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The recording.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`]: it is not a recording.
    #[error("{} is not a wagg recording (wrong magic bytes)", path.display())]
    NotARecording {
        /// The file.
        path: PathBuf,
    },
    /// The file is a recording of a format version this build cannot read.
    #[error(
        "{} is a wagg recording of format version {version}; this wagg reads version {VERSION}",
        path.display()
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it declares.
        version: u16,
    },
    /// A message too large for the format was to be written.
    #[error("a message of {len} bytes is larger than a record may be ({MAX_RECORD_BYTES})")]
    RecordTooLarge {
        /// The body's length.
        len: usize,
    },
}

/// One recorded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Arrival offset since the recording started, microseconds.
    pub offset_micros: u64,
    /// The message body as it arrived.
    pub body: Vec<u8>,
}

/// Why the reader stopped before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailReason {
    /// The file ends inside a record (a crash mid-write).
    Incomplete,
    /// A record's checksum does not match its bytes.
    Checksum,
    /// A record's length is larger than [`MAX_RECORD_BYTES`].
    BadLength,
}

/// Bytes at the end of a recording that are not whole, valid records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// Where the first bad record starts.
    pub at: u64,
    /// Bytes from there to the end of the file, ignored.
    pub dropped_bytes: u64,
    /// What was wrong with the first of them.
    pub reason: TailReason,
}

impl std::fmt::Display for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.reason {
            TailReason::Incomplete => "an incomplete record",
            TailReason::Checksum => "a record whose checksum does not match",
            TailReason::BadLength => "a record with an impossible length",
        };
        write!(
            f,
            "ignored the last {} bytes (from byte {}): {why}",
            self.dropped_bytes, self.at
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecordingError + '_ {
    move |source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn header() -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn checksum(len: u32, offset: u64, body: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(&offset.to_le_bytes());
    crc.update(body);
    crc.finalize()
}

/// Reads as much of `buf` as the stream has; returns the bytes read (less
/// than `buf.len()` only at the end of the stream).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads a recording record by record.
#[derive(Debug)]
pub struct RecordingReader {
    path: PathBuf,
    input: BufReader<File>,
    /// Where the next record starts.
    pos: u64,
    file_len: u64,
    records: u64,
    last_offset: u64,
    tail: Option<Tail>,
    done: bool,
}

impl RecordingReader {
    /// Opens a recording and checks its header.
    ///
    /// # Errors
    ///
    /// [`RecordingError::Io`] if it cannot be read,
    /// [`RecordingError::NotARecording`] for a wrong magic (or a file
    /// shorter than the header), [`RecordingError::UnsupportedVersion`].
    pub fn open(path: &Path) -> Result<Self, RecordingError> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut input = BufReader::with_capacity(256 << 10, file);
        let mut h = [0u8; HEADER_BYTES as usize];
        let n = read_full(&mut input, &mut h).map_err(io_err(path))?;
        if n < h.len() || h[..8] != MAGIC {
            return Err(RecordingError::NotARecording {
                path: path.to_path_buf(),
            });
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(RecordingError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        Ok(RecordingReader {
            path: path.to_path_buf(),
            input,
            pos: HEADER_BYTES,
            file_len,
            records: 0,
            last_offset: 0,
            tail: None,
            done: false,
        })
    }

    /// The next whole record, or `None` at the end of the file or at the
    /// first bad record ([`tail`](Self::tail) then says what was ignored).
    ///
    /// # Errors
    ///
    /// [`RecordingError::Io`] if reading fails.
    pub fn next_record(&mut self) -> Result<Option<Record>, RecordingError> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; 12];
        let n = read_full(&mut self.input, &mut head).map_err(io_err(&self.path))?;
        if n == 0 {
            self.done = true;
            return Ok(None);
        }
        if n < head.len() {
            return Ok(self.stop(TailReason::Incomplete));
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let mut offset_bytes = [0u8; 8];
        offset_bytes.copy_from_slice(&head[4..12]);
        let offset_micros = u64::from_le_bytes(offset_bytes);
        if len > MAX_RECORD_BYTES {
            return Ok(self.stop(TailReason::BadLength));
        }
        // `len` is bounded above, so this allocation is too.
        let mut rest = vec![0u8; len as usize + 4];
        let n = read_full(&mut self.input, &mut rest).map_err(io_err(&self.path))?;
        if n < rest.len() {
            return Ok(self.stop(TailReason::Incomplete));
        }
        let crc_at = len as usize;
        let stored = u32::from_le_bytes([
            rest[crc_at],
            rest[crc_at + 1],
            rest[crc_at + 2],
            rest[crc_at + 3],
        ]);
        rest.truncate(crc_at);
        if checksum(len, offset_micros, &rest) != stored {
            return Ok(self.stop(TailReason::Checksum));
        }
        self.pos += RECORD_OVERHEAD + u64::from(len);
        self.records += 1;
        self.last_offset = offset_micros;
        Ok(Some(Record {
            offset_micros,
            body: rest,
        }))
    }

    fn stop(&mut self, reason: TailReason) -> Option<Record> {
        self.done = true;
        self.tail = Some(Tail {
            at: self.pos,
            dropped_bytes: self.file_len.saturating_sub(self.pos),
            reason,
        });
        None
    }

    /// What was ignored at the end, once the reader got there.
    pub fn tail(&self) -> Option<Tail> {
        self.tail
    }

    /// Whole records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Where the whole records read so far end.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Size of the file when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Offset of the last record read (0 before the first).
    pub fn last_offset(&self) -> u64 {
        self.last_offset
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What [`RecordingWriter::open`] found in an existing file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Continued {
    /// Whole records already in the file.
    pub records: u64,
    /// Offset of the last of them: new records go on from there.
    pub last_offset: u64,
    /// A torn tail that was cut off before appending.
    pub tail: Option<Tail>,
}

/// Writes a recording, new or continued.
#[derive(Debug)]
pub struct RecordingWriter {
    path: PathBuf,
    out: BufWriter<File>,
    base: u64,
    bytes: u64,
    records: u64,
}

impl RecordingWriter {
    /// Opens `path` for recording: creates it with a header if it does not
    /// exist (or is empty), or continues it: checks its header, reads it to
    /// its last whole record, cuts off any torn tail, and appends after it.
    /// Offsets given to [`write`](Self::write) are then counted from the last
    /// existing record's offset.
    ///
    /// # Errors
    ///
    /// Those of [`RecordingReader::open`], and [`RecordingError::Io`].
    pub fn open(path: &Path) -> Result<(Self, Continued), RecordingError> {
        let existing = match std::fs::metadata(path) {
            Ok(m) => m.len() > 0,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut continued = Continued::default();
        let mut end = HEADER_BYTES;
        if existing {
            let mut reader = RecordingReader::open(path)?;
            while reader.next_record()?.is_some() {}
            continued = Continued {
                records: reader.records(),
                last_offset: reader.last_offset(),
                tail: reader.tail(),
            };
            end = reader.position();
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        if existing {
            if let Some(tail) = continued.tail {
                tracing::warn!(
                    path = %path.display(),
                    dropped_bytes = tail.dropped_bytes,
                    "Cutting a torn tail off the recording before appending."
                );
                file.set_len(end).map_err(io_err(path))?;
            }
            file.seek(SeekFrom::Start(end)).map_err(io_err(path))?;
        } else {
            file.set_len(0).map_err(io_err(path))?;
            file.write_all(&header()).map_err(io_err(path))?;
        }
        Ok((
            RecordingWriter {
                path: path.to_path_buf(),
                out: BufWriter::with_capacity(256 << 10, file),
                base: continued.last_offset,
                bytes: end,
                records: continued.records,
            },
            continued,
        ))
    }

    /// Appends a message that arrived `session_micros` after this writer's
    /// session started.
    ///
    /// # Errors
    ///
    /// [`RecordingError::RecordTooLarge`], [`RecordingError::Io`].
    pub fn write(&mut self, session_micros: u64, body: &[u8]) -> Result<(), RecordingError> {
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&l| l <= MAX_RECORD_BYTES)
            .ok_or(RecordingError::RecordTooLarge { len: body.len() })?;
        let offset = self.base.saturating_add(session_micros);
        let mut head = [0u8; 12];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&offset.to_le_bytes());
        let crc = checksum(len, offset, body);
        let path = &self.path;
        self.out.write_all(&head).map_err(io_err(path))?;
        self.out.write_all(body).map_err(io_err(path))?;
        self.out
            .write_all(&crc.to_le_bytes())
            .map_err(io_err(path))?;
        self.bytes += RECORD_OVERHEAD + u64::from(len);
        self.records += 1;
        Ok(())
    }

    /// Hands buffered records to the operating system.
    ///
    /// # Errors
    ///
    /// [`RecordingError::Io`].
    pub fn flush(&mut self) -> Result<(), RecordingError> {
        self.out.flush().map_err(io_err(&self.path))
    }

    /// Flushes and syncs the file to disk.
    ///
    /// # Errors
    ///
    /// [`RecordingError::Io`].
    pub fn finish(mut self) -> Result<(), RecordingError> {
        self.flush()?;
        self.out.get_ref().sync_all().map_err(io_err(&self.path))
    }

    /// Size of the file including what is buffered.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records in the file including those buffered.
    pub fn records(&self) -> u64 {
        self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, n: u64) -> Vec<Record> {
        let (mut w, c) = RecordingWriter::open(path).unwrap();
        assert_eq!(c.records, 0);
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                offset_micros: i * 1000,
                body: format!("message number {i}")
                    .repeat(i as usize % 4 + 1)
                    .into_bytes(),
            })
            .collect();
        for r in &records {
            w.write(r.offset_micros, &r.body).unwrap();
        }
        w.finish().unwrap();
        records
    }

    fn read_all(path: &Path) -> (Vec<Record>, Option<Tail>) {
        let mut r = RecordingReader::open(path).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            out.push(rec);
        }
        (out, r.tail())
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wrec");
        let written = write(&path, 10);
        let (read, tail) = read_all(&path);
        assert_eq!(read, written);
        assert_eq!(tail, None);
    }

    #[test]
    fn a_truncated_recording_reads_up_to_the_last_whole_record_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wrec");
        let written = write(&path, 5);
        let len = std::fs::metadata(&path).unwrap().len();
        let last = RECORD_OVERHEAD + written[4].body.len() as u64;
        for chop in [1, 3, 4, 5, 13, last - 1] {
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len - chop).unwrap();
            let (read, tail) = read_all(&path);
            assert_eq!(read, written[..4], "chopped {chop}");
            let tail = tail.expect("a tail is reported");
            assert_eq!(tail.reason, TailReason::Incomplete);
            assert_eq!(tail.dropped_bytes, last - chop, "chopped {chop}");
            assert_eq!(tail.at, len - last);
        }
    }

    #[test]
    fn a_flipped_byte_in_the_last_record_is_caught_by_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wrec");
        let written = write(&path, 5);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = RECORD_OVERHEAD as usize + written[4].body.len();
        let middle = bytes.len() - last / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let (read, tail) = read_all(&path);
        assert_eq!(read, written[..4]);
        let tail = tail.unwrap();
        assert_eq!(tail.reason, TailReason::Checksum);
        assert_eq!(tail.dropped_bytes, last as u64);
        // A garbage length is not followed into a huge allocation.
        let at = bytes.len() - last;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_all(&path).1.unwrap().reason, TailReason::BadLength);
    }

    #[test]
    fn appending_continues_offsets_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wrec");
        write(&path, 3);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let (mut w, c) = RecordingWriter::open(&path).unwrap();
        assert_eq!(c.records, 2);
        assert_eq!(c.last_offset, 1000);
        assert_eq!(c.tail.unwrap().reason, TailReason::Incomplete);
        w.write(500, b"after the crash").unwrap();
        w.finish().unwrap();
        let (read, tail) = read_all(&path);
        assert_eq!(tail, None);
        assert_eq!(read.len(), 3);
        assert_eq!(read[2].offset_micros, 1500);
        assert_eq!(read[2].body, b"after the crash");
    }

    #[test]
    fn wrong_magic_and_version_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wrec");
        std::fs::write(&path, b"{\"pop\":\"lga\"}\n").unwrap();
        let err = RecordingReader::open(&path).unwrap_err();
        assert!(matches!(err, RecordingError::NotARecording { .. }), "{err}");
        assert!(
            RecordingWriter::open(&path).is_err(),
            "no append to a foreign file"
        );
        let mut h = header();
        h[8] = 9;
        std::fs::write(&path, h).unwrap();
        let err = RecordingReader::open(&path).unwrap_err();
        assert!(
            matches!(err, RecordingError::UnsupportedVersion { version: 9, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
