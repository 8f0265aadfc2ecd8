//! Component glue, compiled for wasm32 only. Hidden from the docs: strategy
//! authors use [`export_aggregator!`](crate::export_aggregator), which
//! expands to the items below.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use crate::{Aggregator, Driver};

#[cfg(all(feature = "runtime", not(test)))]
pub mod rt;

/// The wit-bindgen bindings of world `module`, generated once here so a
/// strategy crate needs no wit-bindgen dependency or WIT path of its own.
///
/// `pub_export_macro` makes the generated `export!` usable from strategy
/// crates. It also moves the custom section that describes the world's
/// exports into `export!`'s expansion, so that section lands in the
/// strategy's cdylib (and wit-component finds the exports there), while
/// this crate only carries an exports-free copy.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "module",
        path: "../../wit",
        pub_export_macro: true,
    });
}

use bindings::exports::wagg::aggregator::aggregator as wit;

/// Where an exported module keeps its one driver.
///
/// A component instance runs on one thread and exports are never
/// re-entered (the module imports nothing that could call back), so
/// handing out `&mut` from a shared static is sound here.
pub struct DriverCell<A>(UnsafeCell<Option<Driver<A>>>);

// SAFETY: wasm32 components are single-threaded; see the type's docs.
unsafe impl<A> Sync for DriverCell<A> {}

impl<A> core::fmt::Debug for DriverCell<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DriverCell")
    }
}

impl<A> DriverCell<A> {
    /// An empty cell; the driver is created on first use because
    /// `A::default()` is not `const`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(UnsafeCell::new(None))
    }
}

impl<A: Aggregator> DriverCell<A> {
    /// Runs `f` on the driver, creating it first if needed.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&mut Driver<A>) -> R) -> R {
        // SAFETY: single-threaded and not re-entered (see the type's docs),
        // so this is the only live reference for the duration of `f`.
        let slot = unsafe { &mut *self.0.get() };
        f(slot.get_or_insert_with(Driver::new))
    }
}

/// Implemented by the unit type `export_aggregator!` declares: ties the
/// strategy type to its static driver.
pub trait Slot {
    /// The strategy.
    type A: Aggregator + 'static;
    /// The module's one driver.
    fn cell() -> &'static DriverCell<Self::A>;
}

impl<T: Slot> wit::Guest for T {
    fn configure(bucket_seconds: u32, options: Vec<(String, String)>) -> Result<(), String> {
        T::cell().with(|d| d.configure(bucket_seconds, &options))
    }

    fn put(series: Vec<u64>, timestamps: Vec<u64>, values: Vec<f64>) -> u32 {
        T::cell().with(|d| d.put(&series, &timestamps, &values))
    }

    fn flush(watermark: u64) -> wit::Aggregates {
        to_wit(T::cell().with(|d| d.flush(watermark)))
    }

    fn export_state() -> wit::Aggregates {
        to_wit(T::cell().with(|d| d.export_state()))
    }

    fn merge(state: wit::Aggregates) -> Result<(), String> {
        let state = from_wit(state);
        T::cell().with(|d| d.merge(&state))
    }

    fn stats() -> wit::ModuleStats {
        let s = T::cell().with(|d| d.stats());
        wit::ModuleStats {
            live_series: s.live_series,
            live_buckets: s.live_buckets,
            heap_bytes: s.heap_bytes,
        }
    }
}

// The conversions move the column vectors: no copy.
fn to_wit(a: crate::Aggregates) -> wit::Aggregates {
    wit::Aggregates {
        series: a.series,
        bucket_start: a.bucket_start,
        count: a.count,
        sum: a.sum,
        min: a.min,
        max: a.max,
        extra: a
            .extra
            .into_iter()
            .map(|c| wit::ExtraColumn {
                name: c.name,
                values: c.values,
            })
            .collect(),
    }
}

fn from_wit(a: wit::Aggregates) -> crate::Aggregates {
    crate::Aggregates {
        series: a.series,
        bucket_start: a.bucket_start,
        count: a.count,
        sum: a.sum,
        min: a.min,
        max: a.max,
        extra: a
            .extra
            .into_iter()
            .map(|c| crate::ExtraColumn {
                name: c.name,
                values: c.values,
            })
            .collect(),
    }
}
