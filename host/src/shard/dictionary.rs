//! A shard's series dictionary: series key ⇄ the 64-bit id its module sees.
//!
//! The id of a key is its XXH3 hash, so interning costs one hash and one
//! lookup and allocates only for a new series. Two keys with the same hash
//! (about one chance in 10^8 with a million live series) are kept apart: the
//! later one gets the next free id and is remembered in a small overflow map
//! that is consulted only while it is non-empty.
//!
//! A series is forgotten once it had no sample for `forget_after` buckets
//! past the last flush, so host memory follows live series, not every series
//! ever seen. Forgetting happens only after a flush, when the module holds no
//! open bucket of the series: an id is never reused while a module could
//! still return it. The shard forgets at the checkpoint after a flush, when
//! its replay log (samples by id) is cleared.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::router::{KeyBatch, KeyedSample, SharedKey, hash_bytes};
use crate::sink::{TOUCH_RUN, touch_key};

/// Hasher for keys that are already hashes.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed with this hasher; fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The start of the bucket `bucket` as a key's note: seconds fit in 32
/// bits until 2106; a later bucket is noted as the last one that fits, so
/// its series is forgotten only once `forget_before` passes that.
#[inline]
fn note_of(bucket: u64) -> u32 {
    u32::try_from(bucket).unwrap_or(u32::MAX)
}

/// Notes that `key`'s series had a sample in `bucket`.
#[inline]
fn note_bucket(key: &SharedKey, bucket: u64) {
    let note = note_of(bucket);
    // A load and a store, not `fetch_max`: only this dictionary writes its
    // keys' notes, and a locked instruction per sample would cost more.
    if note > key.note() {
        key.set_note(note);
    }
}

/// Series key ⇄ id, with forgetting.
#[derive(Debug, Default)]
pub struct Dictionary {
    /// Each key's note is the start of the last bucket its series had a
    /// sample in (see [`note_bucket`]): a 16-byte slot, where the bucket
    /// beside the key made it 24 (BENCHMARKS.md, session 13). The keys are
    /// shared with the shard's snapshot rows and the checkpoint being
    /// written, which would otherwise each hold a copy of every live key,
    /// and with points waiting for the sink. Each is allocated here, so no
    /// other dictionary writes its note.
    by_id: IdMap<SharedKey>,
    overflow: HashMap<Box<[u8]>, u64>,
    key_bytes: usize,
}

impl Dictionary {
    /// An empty dictionary.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of `key`, interning it if new, and notes that the series had a
    /// sample in the bucket starting at `bucket`.
    #[inline]
    pub fn intern(&mut self, key: &[u8], bucket: u64) -> u64 {
        self.intern_hashed(key, hash_bytes(key), bucket)
    }

    /// [`intern`](Self::intern) of `samples` (of `keys`) in order, each
    /// noted in the bucket of `bucket_seconds` its timestamp falls in;
    /// `each` gets the sample's id.
    ///
    /// With many live series, interning one key waits for two cache misses
    /// in turn: its table slot, then its stored key, which it compares. Here
    /// each run of [`TOUCH_RUN`] samples is hashed and looked up first, and
    /// the stored keys found are touched, so that the run's misses are under
    /// way at once before any key is compared (BENCHMARKS.md, session 9).
    pub fn intern_batch(
        &mut self,
        keys: &KeyBatch,
        samples: &[KeyedSample],
        bucket_seconds: u64,
        mut each: impl FnMut(u64, &KeyedSample),
    ) {
        let mut ids = [0u64; TOUCH_RUN];
        for run in samples.chunks(TOUCH_RUN) {
            for (id, s) in ids.iter_mut().zip(run) {
                *id = hash_bytes(keys.key(s));
                if let Some(key) = self.by_id.get(id) {
                    touch_key(key);
                }
            }
            for (&hash, s) in ids.iter().zip(run) {
                let bucket = s.timestamp - s.timestamp % bucket_seconds;
                each(self.intern_hashed(keys.key(s), hash, bucket), s);
            }
        }
    }

    /// [`intern`](Self::intern), given the key's hash.
    #[inline]
    fn intern_hashed(&mut self, key: &[u8], id: u64, bucket: u64) -> u64 {
        if !self.overflow.is_empty()
            && let Some(&id) = self.overflow.get(key)
        {
            if let Some(stored) = self.by_id.get(&id) {
                note_bucket(stored, bucket);
            }
            return id;
        }
        match self.by_id.get(&id) {
            Some(stored) if **stored == *key => {
                note_bucket(stored, bucket);
                id
            }
            Some(_) => self.insert_collided(key, id, bucket),
            None => {
                self.insert(id, key, bucket);
                id
            }
        }
    }

    #[cold]
    fn insert_collided(&mut self, key: &[u8], mut id: u64, bucket: u64) -> u64 {
        while self.by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.overflow.insert(key.into(), id);
        self.insert(id, key, bucket);
        id
    }

    fn insert(&mut self, id: u64, key: &[u8], bucket: u64) {
        self.key_bytes += key.len();
        let key = SharedKey::new(key);
        key.set_note(note_of(bucket));
        self.by_id.insert(id, key);
    }

    /// The key of `id`, if it is live.
    pub fn key(&self, id: u64) -> Option<&SharedKey> {
        self.by_id.get(&id)
    }

    /// Whether `id` is a live series.
    pub fn contains(&self, id: u64) -> bool {
        self.by_id.contains_key(&id)
    }

    /// Live series.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no series is live.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Approximate bytes held: keys plus table overhead.
    pub fn bytes(&self) -> usize {
        // Per entry: the map slot (id and key pointer, 16 B, and a control
        // byte, in a table at most 7/8 full) and the key's allocation (its
        // 12-byte header and the bytes).
        self.key_bytes + self.by_id.len() * 12 + self.by_id.capacity() * 20
    }

    /// Forgets every series whose last sample was in a bucket starting
    /// before `before`. Returns how many were forgotten.
    pub fn forget_before(&mut self, before: u64) -> usize {
        let n = self.by_id.len();
        let mut freed = 0;
        self.by_id.retain(|_, key| {
            let keep = u64::from(key.note()) >= before;
            if !keep {
                freed += key.len();
            }
            keep
        });
        self.key_bytes -= freed;
        if !self.overflow.is_empty() {
            let by_id = &self.by_id;
            self.overflow.retain(|_, id| by_id.contains_key(id));
        }
        n - self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_forgetting_follows_last_bucket() {
        let mut d = Dictionary::new();
        let a = d.intern(b"\x00a\x00", 60);
        let b = d.intern(b"\x00b\x00", 120);
        assert_ne!(a, b);
        assert_eq!(d.intern(b"\x00a\x00", 180), a);
        assert_eq!(d.key(a).map(|k| &k[..]), Some(&b"\x00a\x00"[..]));
        assert_eq!(d.forget_before(150), 1);
        assert!(!d.contains(b));
        assert!(d.contains(a));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_bucket_past_2106_is_kept_until_forgetting_passes_the_last_note() {
        let mut d = Dictionary::new();
        let late = d.intern(b"\x00late\x00", u64::from(u32::MAX) + 60);
        let now = d.intern(b"\x00now\x00", 1_800_000_000);
        assert_eq!(d.forget_before(u64::from(u32::MAX)), 1);
        assert!(d.contains(late) && !d.contains(now));
        assert_eq!(d.forget_before(u64::from(u32::MAX) + 1), 1);
        assert!(d.is_empty());
    }

    #[test]
    fn a_later_sample_moves_the_note_and_an_earlier_one_does_not() {
        let mut d = Dictionary::new();
        let id = d.intern(b"\x00a\x00", 600);
        d.intern(b"\x00a\x00", 60);
        assert_eq!(d.forget_before(600), 0, "600 is still the last bucket");
        d.intern(b"\x00a\x00", 1_200);
        assert_eq!(d.forget_before(1_200), 0);
        assert_eq!(d.forget_before(1_201), 1);
        assert!(!d.contains(id));
    }

    #[test]
    fn interning_a_batch_equals_interning_each_sample() {
        // Runs of TOUCH_RUN and a short last one; new, repeated and collided
        // keys; samples in several buckets.
        let key = |i: u64| format!("\x00k{}\x00", i % 45).into_bytes();
        let mut keys = KeyBatch::default();
        for i in 0..(3 * TOUCH_RUN as u64 + 7) {
            keys.push_raw(&key(i * 7), 1_000 + i * 13, i as f64);
        }
        let collided = key(3);
        let (mut one, mut batch) = (Dictionary::new(), Dictionary::new());
        for d in [&mut one, &mut batch] {
            d.insert(hash_bytes(&collided), b"\x00other\x00", 0);
        }

        let want: Vec<(u64, f64)> = keys
            .samples()
            .iter()
            .map(|s| {
                (
                    one.intern(keys.key(s), s.timestamp - s.timestamp % 60),
                    s.value,
                )
            })
            .collect();
        let mut got = Vec::new();
        batch.intern_batch(&keys, keys.samples(), 60, |id, s| got.push((id, s.value)));
        assert_eq!(got, want);
        assert!(!one.overflow.is_empty(), "the collided key was interned");

        // The same last bucket per series: forgetting agrees at every step.
        for before in (1_000..2_400).step_by(60) {
            assert_eq!(
                batch.forget_before(before),
                one.forget_before(before),
                "{before}"
            );
            assert_eq!(batch.len(), one.len());
        }
    }

    #[test]
    fn colliding_ids_are_kept_apart() {
        let mut d = Dictionary::new();
        // Force a collision: occupy the id another key hashes to.
        let key = b"\x01x\x00";
        let id = hash_bytes(key);
        d.insert(id, b"\x01other\x00", 0);
        let got = d.intern(key, 0);
        assert_ne!(got, id);
        assert_eq!(d.key(got).map(|k| &k[..]), Some(&key[..]));
        assert_eq!(d.intern(key, 60), got, "a collided key keeps its id");
        assert_eq!(
            d.forget_before(1),
            1,
            "the colliding entry was last seen at 0"
        );
        assert_eq!(d.intern(key, 120), got);
    }
}
