//! The one `bindgen!` site: host-side types and calls of the WIT world.

wasmtime::component::bindgen!({
    world: "module",
    path: "../wit",
    additional_derives: [PartialEq],
});

pub use exports::wagg::aggregator::aggregator::{Aggregates, ExtraColumn};

/// The export a module must have, as named in a component's type.
pub const AGGREGATOR_EXPORT: &str = "wagg:aggregator/aggregator@0.1.0";

impl Aggregates {
    /// Number of rows (the length of `series`; [`check`](super::output)
    /// makes sure the other columns agree).
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// An empty set of aggregates.
    pub fn empty() -> Self {
        Aggregates {
            series: Vec::new(),
            bucket_start: Vec::new(),
            count: Vec::new(),
            sum: Vec::new(),
            min: Vec::new(),
            max: Vec::new(),
            extra: Vec::new(),
        }
    }
}
