//! [`SharedKey`]: a series key's bytes, reference counted, one pointer wide,
//! with a 12-byte header.
//!
//! A shard keeps one key per live series for as long as the series lives,
//! and the dictionary keeps a pointer to it in a hash table slot. What the
//! key costs beyond its bytes is therefore most of what a live series costs
//! the host beyond the module's own memory (issue 8's target: ≤ 100 B).
//! `Arc<[u8]>` is two words in the slot and 16 bytes of counts in the
//! allocation; `triomphe::ThinArc` (session 12) is one word, but still 16
//! bytes of header, and the dictionary's last-bucket note took 8 bytes more
//! of each slot. Here the count and the length are 4 bytes each, and the
//! note lives in the key's header, on the cache line an intern reads anyway
//! to compare the key: the slot is 16 bytes (id and pointer) and the header
//! 12 (BENCHMARKS.md, session 13).

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};

/// Counts above this abort the process, as `std::sync::Arc` does above
/// `isize::MAX`: it takes 2^31 live clones (16 GiB of them) to get there,
/// and a count that wrapped would free a key still in use.
const MAX_COUNT: u32 = i32::MAX as u32;

/// The allocation's start; the key's bytes follow it.
#[repr(C)]
struct Header {
    count: AtomicU32,
    len: u32,
    note: AtomicU32,
}

/// A series key's bytes, shared: a shard's dictionary, its snapshot rows,
/// the checkpoint being written and the points waiting for the sink hold
/// one allocation per live series.
pub struct SharedKey(NonNull<Header>);

// SAFETY: the bytes are never written after `new`, and the header's
// mutable fields are atomics; an allocation is freed only by the last
// handle's drop, after an acquire fence (as `std::sync::Arc`).
unsafe impl Send for SharedKey {}
// SAFETY: as for `Send`: `&SharedKey` gives only reads and atomic updates.
unsafe impl Sync for SharedKey {}

impl SharedKey {
    fn layout(len: usize) -> Layout {
        // A key is bounded by the message it came in, far below isize::MAX.
        Layout::from_size_align(size_of::<Header>() + len, align_of::<Header>())
            .unwrap_or_else(|_| panic!("a series key of {len} bytes has no layout"))
    }

    /// A new key holding a copy of `bytes`, its note 0.
    ///
    /// # Panics
    /// If `bytes` is 4 GiB or longer. A key is made from one message's tag
    /// values, and the broker refuses messages far smaller than that.
    pub fn new(bytes: &[u8]) -> Self {
        Self::try_new(bytes).unwrap_or_else(|| panic!("a series key of {} bytes", bytes.len()))
    }

    /// [`new`](Self::new), or `None` if `bytes` is 4 GiB or longer: for
    /// keys read from a file, which may be corrupted.
    pub fn try_new(bytes: &[u8]) -> Option<Self> {
        let len = u32::try_from(bytes.len()).ok()?;
        let layout = Self::layout(bytes.len());
        // SAFETY: the layout's size is at least the header's 12 bytes.
        let Some(ptr) = NonNull::new(unsafe { alloc(layout) }.cast::<Header>()) else {
            handle_alloc_error(layout)
        };
        // SAFETY: the block is `layout`, aligned for `Header` and large
        // enough for it and `bytes` after it; nothing else refers to it yet.
        unsafe {
            ptr.write(Header {
                count: AtomicU32::new(1),
                len,
                note: AtomicU32::new(0),
            });
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                ptr.add(1).cast::<u8>().as_ptr(),
                bytes.len(),
            );
        }
        Some(SharedKey(ptr))
    }

    fn header(&self) -> &Header {
        // SAFETY: the header was written by `new`, and this handle keeps the
        // allocation alive.
        unsafe { self.0.as_ref() }
    }

    /// A 32-bit note kept with the key for whoever allocated it (a shard's
    /// dictionary notes the last bucket its series had a sample in). Every
    /// handle sees the same note: only one owner may write it.
    #[inline]
    pub(crate) fn note(&self) -> u32 {
        self.header().note.load(Ordering::Relaxed)
    }

    /// Sets [`note`](Self::note).
    #[inline]
    pub(crate) fn set_note(&self, note: u32) {
        self.header().note.store(note, Ordering::Relaxed);
    }

    /// Whether `self` and `other` are one allocation.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl std::ops::Deref for SharedKey {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        let len = self.header().len as usize;
        // SAFETY: `new` wrote `len` bytes right after the header, and they
        // are never written again while a handle lives.
        unsafe { std::slice::from_raw_parts(self.0.add(1).cast::<u8>().as_ptr(), len) }
    }
}

impl Clone for SharedKey {
    #[inline]
    fn clone(&self) -> Self {
        // Relaxed, as `std::sync::Arc`: a new handle is made from a live one,
        // so the allocation cannot be freed meanwhile.
        if self.header().count.fetch_add(1, Ordering::Relaxed) > MAX_COUNT {
            std::process::abort();
        }
        SharedKey(self.0)
    }
}

impl Drop for SharedKey {
    fn drop(&mut self) {
        if self.header().count.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other handle's uses happen before the free.
        fence(Ordering::Acquire);
        let layout = Self::layout(self.header().len as usize);
        // SAFETY: this was the last handle; the block was allocated by `new`
        // with this layout.
        unsafe { dealloc(self.0.as_ptr().cast(), layout) }
    }
}

impl From<&[u8]> for SharedKey {
    fn from(bytes: &[u8]) -> Self {
        SharedKey::new(bytes)
    }
}

impl From<Vec<u8>> for SharedKey {
    fn from(bytes: Vec<u8>) -> Self {
        SharedKey::new(&bytes)
    }
}

impl<const N: usize> From<&[u8; N]> for SharedKey {
    fn from(bytes: &[u8; N]) -> Self {
        SharedKey::new(bytes)
    }
}

/// Equal when the bytes are.
impl PartialEq for SharedKey {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedKey {}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_one_word_and_its_header_twelve_bytes() {
        assert_eq!(size_of::<SharedKey>(), size_of::<usize>());
        assert_eq!(size_of::<Option<SharedKey>>(), size_of::<usize>());
        assert_eq!(size_of::<Header>(), 12);
    }

    #[test]
    fn clones_share_bytes_and_note_and_the_last_drop_frees() {
        for bytes in [&b""[..], b"\x00a\x00", &[7u8; 1000]] {
            let a = SharedKey::new(bytes);
            assert_eq!(&*a, bytes);
            assert_eq!(a.note(), 0);
            let b = a.clone();
            assert!(a.ptr_eq(&b));
            assert_eq!(a.header().count.load(Ordering::Relaxed), 2);
            b.set_note(42);
            assert_eq!(a.note(), 42, "one note per allocation");
            drop(a);
            assert_eq!(b.header().count.load(Ordering::Relaxed), 1);
            assert_eq!(&*b, bytes, "the bytes outlive the first handle");
            let c = SharedKey::new(bytes);
            assert_eq!(b, c, "equal by bytes");
            assert!(!b.ptr_eq(&c));
        }
    }

    #[test]
    fn handles_dropped_on_other_threads_free_once() {
        let key = SharedKey::new(b"\x01zone\x00");
        let handles: Vec<_> = (0..64).map(|_| key.clone()).collect();
        std::thread::scope(|s| {
            for chunk in handles.chunks(16) {
                let chunk = chunk.to_vec();
                s.spawn(move || {
                    for k in &chunk {
                        assert_eq!(&**k, b"\x01zone\x00");
                    }
                });
            }
        });
        drop(handles);
        assert_eq!(key.header().count.load(Ordering::Relaxed), 1);
    }
}
