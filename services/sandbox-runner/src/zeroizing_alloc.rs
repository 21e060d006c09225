//! The sandbox-runner binary's global allocator: the system allocator, except
//! that every block is zeroed before it is freed, and that a block is never
//! grown or shrunk in place (a reallocation allocates a new block, copies,
//! then zeroes and frees the old one).
//!
//! Why: credentials pass through buffers the runner does not own and cannot
//! wipe — rustls's record buffers, hyper/h2's frame buffers, tonic's decode
//! buffer that prost slices `bytes` fields out of, a vector that outgrew its
//! allocation. Freed memory is otherwise left as it was, so a value scrubbed
//! from every buffer the runner holds would still be readable in the
//! process's heap after release (guarantee 1 of the design). With this
//! allocator, once the last owner of such a buffer lets go, its bytes are
//! gone. Buffers that stay alive (a pooled connection's) are the other half:
//! the runner's connection to sealed-vault for Resolve lives only for one
//! start (see `Runner::dial_sealed_per_start`).
//!
//! Declared only by `main.rs`: users of the library keep their own allocator.

use std::alloc::{GlobalAlloc, Layout, System};

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroizingAlloc;

/// Zeroes `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    // The block is freed right after: without this the optimizer may treat
    // the stores as dead and drop them. `black_box` makes the pointer (and
    // so the memory behind it) observable.
    std::hint::black_box(ptr);
}

// SAFETY: every method forwards to `System`, which upholds `GlobalAlloc`'s
// contract, with the layouts the caller passed (or, in `realloc`, the layout
// `GlobalAlloc::realloc` documents for the new block). The only additions
// are writes of zeroes into a block the caller still owns (it is being
// deallocated, so the caller gave up any other use of it) and a copy between
// two live, distinct blocks of at least the copied size. No method unwinds
// or allocates through the global allocator itself.
unsafe impl GlobalAlloc for ZeroizingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (non-zero size).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator with `layout`, so it
        // is valid for `layout.size()` bytes until freed just below.
        unsafe {
            wipe(ptr, layout.size());
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `GlobalAlloc::realloc` requires `new_size`, rounded up to
        // `layout.align()`, not to overflow `isize`, and non-zero: exactly
        // what `from_size_align_unchecked` needs.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as `alloc`.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: `ptr` is live for `layout.size()` bytes and `new` for
            // `new_size`; they are distinct allocations, so they do not
            // overlap. The old block is then ours to zero and free. On
            // failure (null) the old block is left untouched, as
            // `GlobalAlloc::realloc` requires.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn growing_and_shrinking_keep_the_contents_in_a_new_block() {
        // The binary's tests run under the binary's global allocator.
        let mut v: Vec<u8> = (0..=255).collect();
        let before = v.as_ptr() as usize;
        v.reserve_exact(1 << 16);
        assert_ne!(v.as_ptr() as usize, before, "moved, not grown in place");
        assert!(v.iter().copied().eq(0..=255));
        let grown = v.as_ptr() as usize;
        v.shrink_to_fit();
        assert_ne!(v.as_ptr() as usize, grown, "moved, not shrunk in place");
        assert!(v.iter().copied().eq(0..=255));
        let zeroed = vec![0u8; 1 << 12];
        assert!(zeroed.iter().all(|b| *b == 0));
    }
}
