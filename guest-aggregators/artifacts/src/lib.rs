//! The guest components, built from `guest-aggregators/` by this crate's
//! build script (a nested `cargo build --profile guest --target
//! wasm32-wasip2`) and embedded here, so the host, its tests and benches
//! always run guests built from the current sources.
//!
//! Strategies: [`HASHMAP`], [`BTREE`], [`SORTED`], [`LEAKY`] (all in
//! [`BUILTINS`]). Test fixtures: [`MISBEHAVE`], [`IMPORTS`],
//! [`OTHERWORLD`].

/// One built component.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Short name: the crate name without the `wagg-` prefix.
    pub name: &'static str,
    /// Absolute path of the `.wasm` file (in this crate's `OUT_DIR`), for
    /// code that loads components from files.
    pub path: &'static str,
    /// The component's bytes.
    pub bytes: &'static [u8],
}

macro_rules! guest {
    ($name:literal, $stem:literal) => {
        Guest {
            name: $name,
            path: concat!(env!("OUT_DIR"), "/", $stem, ".wasm"),
            bytes: include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".wasm")),
        }
    };
}

/// Baseline strategy: a hash map keyed by (series, bucket).
pub const HASHMAP: Guest = guest!("hashmap", "wagg_hashmap");
/// `BTreeMap` ordered by (bucket, series); flushes by `split_off`.
pub const BTREE: Guest = guest!("btree", "wagg_btree");
/// Map of series beside an array of open buckets sorted by time.
pub const SORTED: Guest = guest!("sorted", "wagg_sorted");
/// Correct output, but keeps every flushed bucket forever: memory grows.
pub const LEAKY: Guest = guest!("leaky", "wagg_leaky");
/// Fixture: misbehaves as its `mode` option says (loop, trap, grow, …).
pub const MISBEHAVE: Guest = guest!("misbehave", "wagg_misbehave");
/// Fixture: a correct aggregator that also imports `wagg:evil/env@0.1.0`.
pub const IMPORTS: Guest = guest!("imports", "wagg_imports");
/// Fixture: a component of another world (`greet`), importing nothing.
pub const OTHERWORLD: Guest = guest!("otherworld", "wagg_otherworld");

/// The strategies a host may embed as built-ins.
pub const BUILTINS: &[Guest] = &[HASHMAP, BTREE, SORTED, LEAKY];

/// Every component this crate holds, fixtures included.
pub const ALL: &[Guest] = &[
    HASHMAP, BTREE, SORTED, LEAKY, MISBEHAVE, IMPORTS, OTHERWORLD,
];

#[cfg(test)]
mod tests {
    //! A minimal reader of a component's top-level sections: enough to see
    //! what it imports and exports without wasmtime or wasm-tools.

    use super::*;

    const IMPORT_SECTION: u8 = 10;
    const EXPORT_SECTION: u8 = 11;
    const AGGREGATOR: &[u8] = b"wagg:aggregator/aggregator@0.1.0";

    fn leb128(bytes: &[u8], pos: &mut usize) -> usize {
        let (mut value, mut shift) = (0usize, 0);
        loop {
            let b = bytes[*pos];
            *pos += 1;
            value |= usize::from(b & 0x7f) << shift;
            if b < 0x80 {
                return value;
            }
            shift += 7;
        }
    }

    /// (section id, payload) of every top-level section.
    fn sections(bytes: &[u8]) -> Vec<(u8, &[u8])> {
        assert_eq!(&bytes[..4], b"\0asm", "not wasm");
        // Version 0x0d, layer 1: a component, not a core module.
        assert_eq!(&bytes[4..8], &[0x0d, 0x00, 0x01, 0x00], "not a component");
        let mut pos = 8;
        let mut out = Vec::new();
        while pos < bytes.len() {
            let id = bytes[pos];
            pos += 1;
            let len = leb128(bytes, &mut pos);
            out.push((id, &bytes[pos..pos + len]));
            pos += len;
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn section(g: &Guest, id: u8) -> Vec<u8> {
        sections(g.bytes)
            .into_iter()
            .filter(|(i, _)| *i == id)
            .flat_map(|(_, p)| p.to_vec())
            .collect()
    }

    #[test]
    fn aggregators_import_nothing_and_export_the_interface() {
        for g in BUILTINS.iter().chain([&MISBEHAVE]) {
            assert!(
                section(g, IMPORT_SECTION).is_empty(),
                "{} imports something",
                g.name
            );
            assert!(
                contains(&section(g, EXPORT_SECTION), AGGREGATOR),
                "{} lacks the export",
                g.name
            );
        }
    }

    #[test]
    fn imports_fixture_imports_env() {
        assert!(contains(
            &section(&IMPORTS, IMPORT_SECTION),
            b"wagg:evil/env@0.1.0"
        ));
        assert!(contains(&section(&IMPORTS, EXPORT_SECTION), AGGREGATOR));
    }

    #[test]
    fn otherworld_exports_greet_only() {
        assert!(section(&OTHERWORLD, IMPORT_SECTION).is_empty());
        let exports = section(&OTHERWORLD, EXPORT_SECTION);
        assert!(contains(&exports, b"greet"));
        assert!(!contains(&exports, AGGREGATOR));
    }

    #[test]
    fn paths_hold_the_same_bytes() {
        for g in ALL {
            let on_disk = std::fs::read(g.path).expect(g.path);
            assert_eq!(on_disk, g.bytes, "{}", g.name);
        }
    }
}
