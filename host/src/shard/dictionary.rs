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
use std::sync::Arc;

use crate::router::hash_bytes;

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

#[derive(Debug)]
struct Entry {
    /// Shared with the shard's snapshot rows and the checkpoint being
    /// written, which would otherwise each hold a copy of every live key.
    key: Arc<[u8]>,
    last_bucket: u64,
}

/// Series key ⇄ id, with forgetting.
#[derive(Debug, Default)]
pub struct Dictionary {
    by_id: IdMap<Entry>,
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
        if !self.overflow.is_empty()
            && let Some(&id) = self.overflow.get(key)
        {
            if let Some(e) = self.by_id.get_mut(&id) {
                e.last_bucket = e.last_bucket.max(bucket);
            }
            return id;
        }
        let id = hash_bytes(key);
        match self.by_id.get_mut(&id) {
            Some(e) if *e.key == *key => {
                e.last_bucket = e.last_bucket.max(bucket);
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
        self.by_id.insert(
            id,
            Entry {
                key: key.into(),
                last_bucket: bucket,
            },
        );
    }

    /// The key of `id`, if it is live.
    pub fn key(&self, id: u64) -> Option<&Arc<[u8]>> {
        self.by_id.get(&id).map(|e| &e.key)
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
        // Per entry: the map slot (id + key pointer + last bucket, ~40 B
        // with control bytes) and the key's allocation (its two reference
        // counts and the bytes).
        self.key_bytes + self.by_id.len() * 16 + self.by_id.capacity() * 41
    }

    /// Forgets every series whose last sample was in a bucket starting
    /// before `before`. Returns how many were forgotten.
    pub fn forget_before(&mut self, before: u64) -> usize {
        let n = self.by_id.len();
        let mut freed = 0;
        self.by_id.retain(|_, e| {
            let keep = e.last_bucket >= before;
            if !keep {
                freed += e.key.len();
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
