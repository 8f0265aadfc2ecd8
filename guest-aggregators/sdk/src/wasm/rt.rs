//! The runtime a `no_std` component needs, which std and wasi-libc would
//! otherwise provide: a global allocator, a panic handler and
//! `cabi_realloc`.
//!
//! It lives in the SDK (behind the default `runtime` feature) because every
//! guest links the SDK exactly once, so exactly one of each exists. A guest
//! that uses std on wasm32 disables the feature: std and wasi-libc bring
//! their own, and two `#[panic_handler]`s do not link. `not(test)` keeps
//! the SDK's own test harness (which has std) building for wasm32.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

/// dlmalloc, counting the bytes currently allocated so `stats` can report
/// live heap rather than the linear memory size (which never shrinks).
struct CountingAlloc;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// SAFETY: every method forwards to dlmalloc with the caller's arguments;
// the counter is bookkeeping only.
unsafe impl GlobalAlloc for CountingAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { dlmalloc::GlobalDlmalloc.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { dlmalloc::GlobalDlmalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { dlmalloc::GlobalDlmalloc.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { dlmalloc::GlobalDlmalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// Bytes currently allocated (requested sizes, not dlmalloc's overhead).
pub fn allocated_bytes() -> u64 {
    ALLOCATED.load(Ordering::Relaxed) as u64
}

/// A panic becomes a trap: the host sees `unreachable` and discards the
/// instance. Formatting the message would pull in `core::fmt` machinery
/// and there is nowhere to print it (the module imports nothing).
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator for arguments the host passes in (lists,
/// strings). wit-bindgen provides it only on wasip1, expecting wasi-libc
/// to export it on wasip2; a `no_std` guest has no wasi-libc.
///
/// # Safety
/// Called by the host per the canonical ABI: `old_ptr`/`old_len`/`align`
/// describe a block this allocator returned (or `old_len == 0`), and
/// `align` is a power of two.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    let ptr = if old_len == 0 {
        if new_len == 0 {
            // A dangling, aligned pointer: nothing is read through it.
            return align as *mut u8;
        }
        // SAFETY: the canonical ABI passes a power-of-two `align`, and
        // `new_len` is non-zero.
        unsafe { GLOBAL.alloc(Layout::from_size_align_unchecked(new_len, align)) }
    } else {
        // SAFETY: per the contract above, the block came from this allocator
        // with this layout.
        unsafe {
            GLOBAL.realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}
