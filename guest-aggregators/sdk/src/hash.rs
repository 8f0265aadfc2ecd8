//! A fast hasher for the integer keys strategies hash (series ids, bucket
//! starts). Series ids are already 64-bit hashes chosen by the host, so the
//! hasher only has to spread bits, not resist attacks; a keyed SipHash
//! would cost several times more per sample for nothing.

use core::hash::{BuildHasher, Hasher};

/// An odd constant with well-mixed bits (from the fractional part of pi),
/// the multiplier of each folded multiply.
const K: u64 = 0x243f_6a88_85a3_08d3;

/// Multiplies to 128 bits and folds the halves: every input bit reaches
/// both the low bits (hashbrown's bucket index) and the high bits (its
/// control byte), which a plain multiply would not give the low bits.
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

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
        self.state = folded_multiply(self.state ^ n, K);
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
        // One more round so that a key of a single word is mixed twice.
        folded_multiply(self.state, K ^ 0x9e37_79b9_7f4a_7c15)
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
