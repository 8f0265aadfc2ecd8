//! Uploaded modules, on disk so a restart keeps them.
//!
//! Layout under `<data_dir>/modules/`: `<id>.wasm` (the uploaded component,
//! as sent) and `index.json` (name, version, options, rollback reason of
//! each). A module's id is the SHA-256 of its bytes. The built-in strategies
//! are registered as `<name>@builtin` and never written to disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::AdminError;
use crate::runtime::cache::write_atomic;
use crate::runtime::{self, LoadedModule, Runtime};
use crate::shard::Assignment;

/// What the registry knows of one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// SHA-256 of the component, hex.
    pub id: String,
    /// Name given at upload (a built-in's name).
    pub name: String,
    /// Version given at upload (`builtin` for built-ins).
    pub version: String,
    /// Options its `configure` gets.
    pub options: Vec<(String, String)>,
    /// Whether it is embedded in the binary.
    pub builtin: bool,
    /// Why it was rolled back, if it was.
    pub rolled_back: Option<String>,
}

impl ModuleRecord {
    /// `name@version`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    record: ModuleRecord,
    module: Arc<LoadedModule>,
}

/// The module registry.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    runtime: Runtime,
    entries: BTreeMap<String, Entry>,
}

/// Bucket width used to check an upload's options: any valid width would
/// do, options do not depend on it.
const CHECK_BUCKET_SECONDS: u32 = 60;

impl Registry {
    /// Opens the registry in `data_dir`: the built-ins, then every module
    /// uploaded before (compiled again or taken from the compiled cache).
    ///
    /// # Errors
    ///
    /// If the index cannot be read, or a stored module no longer loads.
    pub fn open(data_dir: &Path, runtime: Runtime) -> Result<Self, AdminError> {
        let dir = data_dir.join("modules");
        std::fs::create_dir_all(&dir)
            .map_err(|e| AdminError::Storage(format!("{}: {e}", dir.display())))?;
        let mut entries = BTreeMap::new();
        for name in runtime::builtin_names() {
            let bytes = runtime::builtin(name).unwrap_or_default();
            let module = runtime
                .load(bytes)
                .map_err(|e| AdminError::Storage(format!("built-in {name}: {e}")))?;
            let record = ModuleRecord {
                id: module.id().to_string(),
                name: name.to_string(),
                version: "builtin".into(),
                options: Vec::new(),
                builtin: true,
                rolled_back: None,
            };
            entries.insert(record.id.clone(), Entry { record, module });
        }
        let mut registry = Registry {
            dir,
            runtime,
            entries,
        };
        for record in registry.read_index()? {
            let path = registry.wasm_path(&record.id);
            let bytes = std::fs::read(&path)
                .map_err(|e| AdminError::Storage(format!("{}: {e}", path.display())))?;
            let module = registry.runtime.load(&bytes).map_err(|e| {
                AdminError::Storage(format!("stored module {}: {e}", record.label()))
            })?;
            if let Some(builtin) = registry.entries.get_mut(&record.id)
                && builtin.record.builtin
            {
                builtin.record.rolled_back = record.rolled_back;
                continue;
            }
            registry
                .entries
                .insert(record.id.clone(), Entry { record, module });
        }
        Ok(registry)
    }

    fn wasm_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.wasm"))
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn read_index(&self) -> Result<Vec<ModuleRecord>, AdminError> {
        match std::fs::read(self.index_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| AdminError::Storage(format!("{}: {e}", self.index_path().display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(AdminError::Storage(format!(
                "{}: {e}",
                self.index_path().display()
            ))),
        }
    }

    fn write_index(&self) -> Result<(), AdminError> {
        // Built-ins are listed only when something about them must survive
        // a restart (a rollback reason).
        let records: Vec<&ModuleRecord> = self
            .entries
            .values()
            .map(|e| &e.record)
            .filter(|r| !r.builtin || r.rolled_back.is_some())
            .collect();
        let bytes =
            serde_json::to_vec_pretty(&records).map_err(|e| AdminError::Storage(e.to_string()))?;
        write_atomic(&self.index_path(), &bytes).map_err(|e| AdminError::Storage(e.to_string()))
    }

    /// Validates, compiles and stores an uploaded component.
    ///
    /// Blocking (it compiles): call it off the async workers.
    ///
    /// # Errors
    ///
    /// See [`check_new`](Self::check_new), [`compile`](Self::compile) and
    /// [`insert`](Self::insert).
    pub fn add(
        &mut self,
        bytes: &[u8],
        name: &str,
        version: &str,
        options: Vec<(String, String)>,
    ) -> Result<ModuleRecord, AdminError> {
        self.check_new(name, version)?;
        let module = Self::compile(&self.runtime, bytes, &options)?;
        self.insert(bytes, module, name, version, options)
    }

    /// Checks that `name@version` may be registered.
    ///
    /// # Errors
    ///
    /// [`AdminError::BadRequest`] for a malformed name or version,
    /// [`AdminError::Conflict`] if it exists.
    pub fn check_new(&self, name: &str, version: &str) -> Result<(), AdminError> {
        check_name("name", name)?;
        check_name("version", version)?;
        if version == "builtin" {
            return Err(AdminError::BadRequest(
                "version `builtin` is reserved".into(),
            ));
        }
        if self.find_label(name, version).is_some() {
            return Err(AdminError::Conflict(format!(
                "{name}@{version} is already registered"
            )));
        }
        Ok(())
    }

    /// The runtime modules are compiled with.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Loads `bytes` (checks, compile, trial run) and checks that the module
    /// accepts `options`. Blocking; needs no registry lock.
    ///
    /// # Errors
    ///
    /// [`AdminError::Invalid`] with the reason.
    pub fn compile(
        runtime: &Runtime,
        bytes: &[u8],
        options: &[(String, String)],
    ) -> Result<Arc<LoadedModule>, AdminError> {
        let module = runtime
            .load(bytes)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        runtime
            .instantiate(&module, CHECK_BUCKET_SECONDS, options)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        Ok(module)
    }

    /// Stores a compiled module under `name@version`.
    ///
    /// # Errors
    ///
    /// [`AdminError::Conflict`] if the name or the bytes are already
    /// registered, [`AdminError::Storage`] if it cannot be written.
    pub fn insert(
        &mut self,
        bytes: &[u8],
        module: Arc<LoadedModule>,
        name: &str,
        version: &str,
        options: Vec<(String, String)>,
    ) -> Result<ModuleRecord, AdminError> {
        self.check_new(name, version)?;
        if let Some(existing) = self.entries.get(module.id()) {
            return Err(AdminError::Conflict(format!(
                "the same component is already registered as {}",
                existing.record.label()
            )));
        }
        let record = ModuleRecord {
            id: module.id().to_string(),
            name: name.to_string(),
            version: version.to_string(),
            options,
            builtin: false,
            rolled_back: None,
        };
        write_atomic(&self.wasm_path(&record.id), bytes)
            .map_err(|e| AdminError::Storage(e.to_string()))?;
        self.entries.insert(
            record.id.clone(),
            Entry {
                record: record.clone(),
                module,
            },
        );
        self.write_index()?;
        Ok(record)
    }

    /// Removes an uploaded module (the caller checks it is idle).
    ///
    /// # Errors
    ///
    /// [`AdminError::NotFound`], [`AdminError::Conflict`] for a built-in,
    /// [`AdminError::Storage`].
    pub fn remove(&mut self, id: &str) -> Result<ModuleRecord, AdminError> {
        let entry = self
            .entries
            .get(id)
            .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
        if entry.record.builtin {
            return Err(AdminError::Conflict(
                "built-in modules cannot be removed".into(),
            ));
        }
        let entry = self
            .entries
            .remove(id)
            .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
        self.write_index()?;
        let _ = std::fs::remove_file(self.wasm_path(id));
        Ok(entry.record)
    }

    /// Finds a module by id, an id prefix of at least 8 hex digits,
    /// `name@version`, or a name that only one module has.
    pub fn resolve(&self, key: &str) -> Option<&ModuleRecord> {
        if let Some(e) = self.entries.get(key) {
            return Some(&e.record);
        }
        if let Some((name, version)) = key.split_once('@') {
            return self.find_label(name, version);
        }
        if key.len() >= 8
            && key.bytes().all(|b| b.is_ascii_hexdigit())
            && let Some(r) = unique(self.records().filter(|r| r.id.starts_with(key)))
        {
            return Some(r);
        }
        unique(self.records().filter(|r| r.name == key))
    }

    fn find_label(&self, name: &str, version: &str) -> Option<&ModuleRecord> {
        self.records()
            .find(|r| r.name == name && r.version == version)
    }

    /// Every record.
    pub fn records(&self) -> impl Iterator<Item = &ModuleRecord> {
        self.entries.values().map(|e| &e.record)
    }

    /// The record of `id`.
    pub fn get(&self, id: &str) -> Option<&ModuleRecord> {
        self.entries.get(id).map(|e| &e.record)
    }

    /// The shard assignment for module `id` (with its upload options).
    pub fn assignment(&self, id: &str) -> Option<Assignment> {
        let e = self.entries.get(id)?;
        Some(Assignment::new(
            e.module.clone(),
            e.record.options.clone(),
            &e.record.label(),
        ))
    }

    /// Records that `id` was rolled back, and why (kept across restarts).
    ///
    /// # Errors
    ///
    /// [`AdminError::Storage`] if the index cannot be written.
    pub fn set_rolled_back(&mut self, id: &str, reason: Option<String>) -> Result<(), AdminError> {
        if let Some(e) = self.entries.get_mut(id) {
            e.record.rolled_back = reason;
        }
        self.write_index()
    }
}

/// The only item of `it`, if it has exactly one.
fn unique<'a>(mut it: impl Iterator<Item = &'a ModuleRecord>) -> Option<&'a ModuleRecord> {
    match (it.next(), it.next()) {
        (Some(r), None) => Some(r),
        _ => None,
    }
}

fn check_name(field: &str, value: &str) -> Result<(), AdminError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AdminError::BadRequest(format!(
            "{field} must be 1..=64 characters of letters, digits, '-', '_', '.'"
        )))
    }
}
