//! On-disk cache of compiled modules, so a restart does not recompile.
//!
//! Layout: `<dir>/<engine>/<sha256 of the .wasm>.cwasm`, and beside it
//! `<same>.sum` holding the SHA-256 of the `.cwasm`. `<engine>` is a hash of
//! wasmtime's compatibility key (its version and every setting that changes
//! generated code), so an upgrade or a changed setting starts an empty
//! directory instead of loading incompatible code.
//!
//! `Component::deserialize` trusts its input completely: it maps the bytes
//! as executable code. So the cache only ever deserializes files it wrote
//! itself, named by the hash of the source the user sent, and only after the
//! artifact's checksum matches; a file that does not match (corrupted,
//! truncated by a crash, edited) is removed and the module recompiled. The
//! checksum detects accidents and edits of the artifact alone; whoever can
//! rewrite both files can already replace the wagg binary, so the data
//! directory must be as trusted as the binary.

use std::fs;
use std::hash::Hash;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The compiled-artifact cache of one engine.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
}

/// What a cache lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A verified artifact, deserialized.
    Hit(Component),
    /// Nothing cached for this module.
    Miss,
    /// An artifact was there but failed its checksum or did not load; it has
    /// been removed.
    Rejected(String),
}

impl ArtifactCache {
    /// Opens (creating it if needed) the cache directory for `engine` under
    /// `root`.
    ///
    /// # Errors
    ///
    /// If the directory cannot be created.
    pub fn open(root: &Path, engine: &Engine) -> std::io::Result<Self> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("{:016x}", std::hash::Hasher::finish(&hasher)));
        fs::create_dir_all(&dir)?;
        Ok(ArtifactCache { dir })
    }

    /// The directory this engine's artifacts live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{id}.cwasm")),
            self.dir.join(format!("{id}.sum")),
        )
    }

    /// Loads the artifact for module `id` (the SHA-256 of its `.wasm`).
    pub fn get(&self, engine: &Engine, id: &str) -> Lookup {
        let (artifact, sum) = self.paths(id);
        let Ok(bytes) = fs::read(&artifact) else {
            return Lookup::Miss;
        };
        let expected = fs::read_to_string(&sum).unwrap_or_default();
        let actual = hex::encode(Sha256::digest(&bytes));
        let reason = if expected.trim() != actual {
            "checksum mismatch".to_string()
        } else {
            // SAFETY: these bytes are an artifact this cache serialized
            // itself with an engine of the same compatibility hash (the
            // directory name), and their checksum matches the one written
            // with them, so they are exactly what `serialize` produced.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => return Lookup::Hit(component),
                Err(err) => format!("does not load: {err}"),
            }
        };
        let _ = fs::remove_file(&artifact);
        let _ = fs::remove_file(&sum);
        Lookup::Rejected(reason)
    }

    /// Stores the compiled `component` for module `id`, atomically: a crash
    /// leaves either no artifact or a whole one.
    ///
    /// # Errors
    ///
    /// On a failed write; the cache is then simply not used for this module.
    pub fn put(&self, id: &str, component: &Component) -> std::io::Result<()> {
        let bytes = component
            .serialize()
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        let (artifact, sum) = self.paths(id);
        write_atomic(&sum, hex::encode(Sha256::digest(&bytes)).as_bytes())?;
        write_atomic(&artifact, &bytes)
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it
/// over `path`.
///
/// # Errors
///
/// Any I/O error on the way.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// [`write_atomic`], with the content streamed by `write` into a buffered
/// file: a large file (a checkpoint) is never held in memory whole.
///
/// # Errors
///
/// Any I/O error on the way, or `write`'s; `path` is then untouched.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
    let written = write(&mut file).and_then(|()| {
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(dir) = fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}
