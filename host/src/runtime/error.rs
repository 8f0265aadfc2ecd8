//! Typed errors of the module runtime.

use std::time::Duration;

/// Why a module was refused at load time (upload, `wagg module validate`,
/// start-up). Every variant's message names what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary: {0}")]
    NotWasm(&'static str),
    /// A core module: wagg needs a component.
    #[error(
        "a core WebAssembly module, not a component: build the strategy for wasm32-wasip2 with the wagg guest SDK"
    )]
    CoreModule,
    /// A wasmtime-precompiled artifact. Users' bytes never reach `deserialize`.
    #[error("precompiled artifacts are refused: upload the .wasm component, wagg compiles it")]
    Precompiled,
    /// The component imports something; modules must import nothing.
    #[error("the component imports `{0}`: aggregation modules must import nothing")]
    Import(String),
    /// The component does not export the aggregator interface wagg speaks.
    #[error(
        "the component does not export `{expected}` (world wagg:aggregator/module); it exports: {found}"
    )]
    WrongWorld {
        /// The export wagg looked for.
        expected: &'static str,
        /// What the component exports instead.
        found: String,
    },
    /// The exports are there but their types differ from the world's.
    #[error("the component's exports do not match world wagg:aggregator/module: {0}")]
    WrongTypes(String),
    /// Cranelift or the validator refused the component.
    #[error("invalid component: {0}")]
    Compile(String),
    /// The compile did not finish in time.
    #[error("compiling the component took longer than {0:?}")]
    CompileTimeout(Duration),
    /// The component loaded but misbehaved in a trial run in a scratch store.
    #[error("the component failed its trial run: {0}")]
    Trial(#[source] InstanceError),
    /// The compiled-artifact cache could not be used.
    #[error("compiled-module cache: {0}")]
    Cache(#[from] std::io::Error),
    /// wasmtime refused the engine configuration.
    #[error("engine: {0}")]
    Engine(String),
}

/// Why a call into one instance failed. The instance that returned it is
/// poisoned: it is never entered again, and its shard replaces it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceError {
    /// The module asked for more linear memory than its limit.
    #[error("`{call}` exceeded the memory limit of {limit} bytes (asked for {requested})")]
    MemoryLimit {
        /// The WIT function that was running.
        call: &'static str,
        /// The configured limit.
        limit: u64,
        /// The size the module tried to grow to.
        requested: u64,
    },
    /// The call used up its fuel: an endless loop, or far more work than
    /// its input justifies.
    #[error("`{call}` exceeded its CPU budget of {fuel} fuel")]
    CpuBudget {
        /// The WIT function that was running.
        call: &'static str,
        /// Fuel the call had.
        fuel: u64,
    },
    /// The module trapped (a panic, an `unreachable`, a stack overflow, ...).
    #[error("`{call}` trapped: {trap}")]
    Trap {
        /// The WIT function that was running.
        call: &'static str,
        /// The trap, as wasmtime describes it.
        trap: String,
    },
    /// The module returned something the host refuses to use.
    #[error("`{call}` returned invalid output: {reason}")]
    BadOutput {
        /// The WIT function that returned it.
        call: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The module refused a request with an error of its own (`configure`,
    /// `merge`).
    #[error("`{call}` was refused by the module: {message}")]
    Refused {
        /// The WIT function that refused.
        call: &'static str,
        /// The module's message.
        message: String,
    },
    /// An earlier call failed; the instance is not entered again.
    #[error("the instance failed earlier and is not entered again: {0}")]
    Poisoned(String),
    /// The state a new instance had to start from (the shard's last
    /// snapshot, kept on disk in the checkpoint) could not be read back. No
    /// module can help: the shard stops rather than run without it.
    #[error("cannot read the shard's last snapshot back from the checkpoint: {0}")]
    StateUnreadable(String),
}

impl InstanceError {
    /// A short, fixed label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            InstanceError::MemoryLimit { .. } => "memory_limit",
            InstanceError::CpuBudget { .. } => "cpu_budget",
            InstanceError::Trap { .. } => "trap",
            InstanceError::BadOutput { .. } => "bad_output",
            InstanceError::Refused { .. } => "refused",
            InstanceError::Poisoned(_) => "poisoned",
            InstanceError::StateUnreadable(_) => "state_unreadable",
        }
    }
}
