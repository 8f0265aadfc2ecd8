//! A fast hasher for the integer keys strategies hash (series ids, bucket
//! starts). Series ids are already 64-bit hashes chosen by the host, so the
//! hasher only has to spread bits, not resist attacks; a keyed SipHash
//! would cost several times more per sample for nothing.

use core::hash::{BuildHasher, Hasher};

/// An odd constant with well-mixed bits (from the fractional part of pi),
/// the multiplier of each word folded in.
const K: u64 = 0x243f_6a88_85a3_08d3;
/// The finishing multiplier (2^64 / the golden ratio, odd).
const K_FINISH: u64 = 0x9e37_79b9_7f4a_7c15;

// Only 64-bit multiplies, never a 64×64→128 one: wasm32 has no wide
// multiply, so `u128` products compile to a call to `__multi3` through the
// shadow stack, three per key. Without them hashmap's `put` in Wasm takes
// about half the time (BENCHMARKS.md, session 4); natively both are cheap.

/// Hasher state; see the module docs for why it is unkeyed.
#[derive(Clone, Copy, Debug, Default)]
pub struct FastHasher {
    state: u64,
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Not on the hot path (keys are integers); correct for any input.
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        // The rotation carries the previous word's well-mixed high bits
        // into the low bits the next multiply spreads upwards.
        self.state = (self.state.rotate_left(23) ^ n).wrapping_mul(K);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // hashbrown takes its bucket index from the low bits and its
        // control byte from the top 7 bits of the hash's low `usize`: bits
        // 25..32 on wasm32, 57..64 natively. A product's low bits depend
        // only on the multiplicand's low bits, so fold the high half down
        // first, and fold the product's high bits down after.
        let h = self.state ^ (self.state >> 32);
        let h = h.wrapping_mul(K_FINISH);
        h ^ (h >> 29)
    }
}

/// Builds [`FastHasher`]s: use as the `S` of a `hashbrown::HashMap`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FastState;

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    #[inline]
    fn build_hasher(&self) -> FastHasher {
        FastHasher::default()
    }
}
