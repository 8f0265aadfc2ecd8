//! Loading a module: checks, compile (or cache hit), type check, trial run.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::{AGGREGATOR_EXPORT, Aggregates, ModulePre};
use super::cache::{ArtifactCache, Lookup};
use super::engine::{RuntimeLimits, new_engine};
use super::error::LoadError;
use super::instance::{Batch, HostState, Instance};

/// What `wagg module validate` prints about a module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleInfo {
    /// SHA-256 of the `.wasm`, hex: the module's identity.
    pub id: String,
    /// The world the module targets.
    pub world: &'static str,
    /// Version of the WIT package it was built against.
    pub version: &'static str,
    /// Names of the component's exports.
    pub exports: Vec<String>,
    /// Size of the `.wasm` in bytes.
    pub size_bytes: usize,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
    /// Time spent compiling (or loading from the cache).
    pub compile_time: Duration,
}

/// A module that passed every check, ready to instantiate any number of
/// times.
pub struct LoadedModule {
    engine: Engine,
    pre: ModulePre<HostState>,
    info: ModuleInfo,
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl LoadedModule {
    /// The module's id: SHA-256 of its `.wasm`, hex.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// What is known about the module.
    pub fn info(&self) -> &ModuleInfo {
        &self.info
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn pre(&self) -> &ModulePre<HostState> {
        &self.pre
    }
}

/// The module runtime: one engine, its limits and its compiled-module cache.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    limits: RuntimeLimits,
    cache: Option<ArtifactCache>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("limits", &self.limits)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Bucket width of the trial run: any valid width would do.
const TRIAL_BUCKET_SECONDS: u32 = 60;

impl Runtime {
    /// A runtime with `limits`, caching compiled modules under `cache_dir`
    /// when given.
    ///
    /// # Errors
    ///
    /// If wasmtime refuses the engine settings or the cache directory cannot
    /// be created.
    pub fn new(limits: RuntimeLimits, cache_dir: Option<&Path>) -> Result<Self, LoadError> {
        let engine = new_engine(&limits).map_err(|err| LoadError::Engine(format!("{err:#}")))?;
        let cache = cache_dir
            .map(|dir| ArtifactCache::open(dir, &engine))
            .transpose()?;
        // An empty linker: modules import nothing, so there is nothing to
        // link, and anything a module imports fails to resolve.
        let linker = Arc::new(Linker::new(&engine));
        Ok(Runtime {
            engine,
            linker,
            limits,
            cache,
        })
    }

    /// The limits every instance of this runtime gets.
    pub fn limits(&self) -> &RuntimeLimits {
        &self.limits
    }

    /// Loads a module from the bytes of a `.wasm` component: refuses what is
    /// not a component or is a precompiled artifact, compiles it off the
    /// caller's thread under the compile timeout (or takes it from the
    /// cache), refuses any import, checks the exports against the world, and
    /// runs it once in a scratch store (instantiate, configure, put, stats,
    /// export, merge, flush) with the runtime's limits.
    ///
    /// # Errors
    ///
    /// A [`LoadError`] naming the reason.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<LoadedModule>, LoadError> {
        check_header(bytes)?;
        let id = super::content_id(bytes);
        let started = Instant::now();
        let (component, from_cache) = self.compile_cached(&id, bytes)?;
        let compile_time = started.elapsed();

        let ty = component.component_type();
        if let Some((name, _)) = ty.imports(&self.engine).next() {
            return Err(LoadError::Import(name.to_string()));
        }
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        if !exports.iter().any(|e| e == AGGREGATOR_EXPORT) {
            return Err(LoadError::WrongWorld {
                expected: AGGREGATOR_EXPORT,
                found: if exports.is_empty() {
                    "nothing".into()
                } else {
                    exports.join(", ")
                },
            });
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(ModulePre::new)
            .map_err(|err| LoadError::WrongTypes(format!("{err:#}")))?;
        let module = Arc::new(LoadedModule {
            engine: self.engine.clone(),
            pre,
            info: ModuleInfo {
                id,
                world: "wagg:aggregator/module",
                version: "0.1.0",
                exports,
                size_bytes: bytes.len(),
                from_cache,
                compile_time,
            },
        });
        self.trial(&module)?;
        Ok(module)
    }

    /// Starts an instance of `module` configured for `bucket_seconds` and
    /// `options`.
    ///
    /// # Errors
    ///
    /// See [`Instance::new`].
    pub fn instantiate(
        &self,
        module: &Arc<LoadedModule>,
        bucket_seconds: u32,
        options: &[(String, String)],
    ) -> Result<Instance, super::InstanceError> {
        Instance::new(module.clone(), &self.limits, bucket_seconds, options)
    }

    /// Exercises every export once. Pre-instantiation misses some type
    /// mismatches (a wrong parameter type passes it and fails only at
    /// instantiation), and a module that cannot aggregate three samples
    /// should be refused at upload, not on a shard.
    fn trial(&self, module: &Arc<LoadedModule>) -> Result<(), LoadError> {
        let trial = || -> Result<(), super::InstanceError> {
            let mut instance = self.instantiate(module, TRIAL_BUCKET_SECONDS, &[])?;
            let mut batch = Batch::with_capacity(3);
            batch.push(1, 60, 1.0);
            batch.push(2, 61, 2.0);
            batch.push(1, 125, 3.0);
            instance.put(&batch)?;
            let known = |id: u64| id == 1 || id == 2;
            instance.stats()?;
            let state = instance.export_state(&known)?;
            let mut scratch = self.instantiate(module, TRIAL_BUCKET_SECONDS, &[])?;
            scratch.merge(&state)?;
            let flushed: Aggregates = scratch.flush(u64::MAX / 2, &known)?;
            if flushed.len() != 3 {
                return Err(super::InstanceError::BadOutput {
                    call: "flush",
                    reason: format!(
                        "trial: 3 samples in 3 (series, bucket) rows merged into a fresh instance flushed as {} rows",
                        flushed.len()
                    ),
                });
            }
            instance.flush(120, &known)?;
            Ok(())
        };
        trial().map_err(LoadError::Trial)
    }

    fn compile_cached(&self, id: &str, bytes: &[u8]) -> Result<(Component, bool), LoadError> {
        if let Some(cache) = &self.cache {
            match cache.get(&self.engine, id) {
                Lookup::Hit(component) => return Ok((component, true)),
                Lookup::Miss => {}
                Lookup::Rejected(reason) => {
                    tracing::warn!(
                        module = id,
                        reason,
                        "Cached compiled module refused; recompiling."
                    );
                }
            }
        }
        let component = compile(&self.engine, bytes, self.limits.compile_timeout())?;
        if let Some(cache) = &self.cache
            && let Err(err) = cache.put(id, &component)
        {
            tracing::warn!(module = id, error = %err, "Could not cache the compiled module.");
        }
        Ok((component, false))
    }
}

/// Refuses bytes that are not a component before anything parses them.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if Engine::detect_precompiled(bytes).is_some() {
        return Err(LoadError::Precompiled);
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm(
            "it does not start with the `\\0asm` magic",
        ));
    }
    // Bytes 4..8 are the version and layer: 1.0 for a core module, 0xd with
    // layer 1 for a component (the binary format of the component model).
    match &bytes[4..8] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule),
        [0x0d, 0, 1, 0] => Ok(()),
        _ => Err(LoadError::NotWasm("unknown WebAssembly version or layer")),
    }
}

/// Compiles on a thread of its own at the lowest CPU priority, so a compile
/// never competes with shards on a small machine, and gives up waiting after
/// `timeout`. A compile cannot be interrupted: on a timeout the thread runs
/// to its end in the background and its result is dropped.
fn compile(engine: &Engine, bytes: &[u8], timeout: Duration) -> Result<Component, LoadError> {
    let (tx, rx) = mpsc::sync_channel(1);
    let engine = engine.clone();
    let bytes = bytes.to_vec();
    std::thread::Builder::new()
        .name("wagg-compile".into())
        .spawn(move || {
            lower_thread_priority();
            let _ = tx.send(Component::new(&engine, &bytes));
        })
        .map_err(LoadError::Cache)?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(component)) => Ok(component),
        Ok(Err(err)) => Err(LoadError::Compile(format!("{err:#}"))),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(LoadError::CompileTimeout(timeout)),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(LoadError::Compile("the compile thread panicked".into()))
        }
    }
}

fn lower_thread_priority() {
    // On Linux, nice values are per thread: `setpriority` on this thread's
    // id lowers only the compile thread.
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls with no pointers; failure only leaves the
    // priority unchanged.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}
