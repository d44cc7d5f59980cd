//! keygate's global allocator: mimalloc v3, called through its plain
//! `mi_malloc`/`mi_zalloc`/`mi_realloc` whenever they already return the
//! alignment a layout asks for, and through the `_aligned` entry points
//! otherwise.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it sends every allocation to
//! `mi_malloc_aligned`. Under callgrind that entry point takes its fast path
//! only for a block of at most 1 KiB whose page has a free block ready;
//! otherwise (larger buffers, or a page whose free list must first be
//! refilled from the blocks freed into it) it goes through
//! `mi_heap_malloc_zero_aligned_at_generic` and usually over-allocates
//! (`..._overalloc`): about 6 of the ~26 allocations of an HTTP/1.1 request
//! on the fast path, ~120 instructions each on top of the allocation itself
//! (bench/README.md, "The allocator's aligned entry points").
//!
//! # The rule
//!
//! mimalloc's blocks are multiples of 16 bytes from 16 bytes up (8-byte
//! blocks exist for the smallest requests), and a page's first block is
//! 16-aligned, so every block of at least 16 bytes is 16-aligned and every
//! block is 8-aligned (mimalloc asserts the first in `alloc.c`; the size
//! classes are `mi_bin` in `page-queue.c`). A layout whose alignment is at
//! most 16 and at most its size is therefore served by the plain entry
//! points; the same rule the standard library's `System` allocator uses
//! with `malloc`.
//!
//! # Safety
//!
//! This crate exists to hold the `unsafe` a global allocator needs (the
//! rest of the workspace forbids it): `GlobalAlloc` is an unsafe trait, and
//! the mimalloc functions are foreign. Each call passes mimalloc exactly
//! what the caller's layout says, and `mi_free` takes blocks from either
//! family of entry points.
#![deny(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment mimalloc's plain entry points give a block at least this
/// large (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// Whether a block of `size` bytes from the plain entry points is aligned
/// to `align`.
#[inline]
fn plain_fits(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

/// mimalloc as the global allocator (see the crate docs).
pub struct KeygateAlloc;

// SAFETY: every method hands mimalloc a size and alignment taken from the
// caller's layout; a block is returned only from mimalloc, which returns
// null on failure as `GlobalAlloc` requires. Alignment: the aligned entry
// points honour any power-of-two alignment, and the plain ones are used
// only where `plain_fits` holds (crate docs). `dealloc` may use `mi_free`
// for every block, whichever entry point made it.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for KeygateAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: foreign calls with arguments from a valid layout.
        unsafe {
            if plain_fits(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain_fits(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`, and the
        // block stays at that alignment: moved by the plain entry point
        // only where a new block of `new_size` has it (a block kept in
        // place keeps its address, already aligned).
        unsafe {
            if plain_fits(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates many blocks of every size up to 4 KiB (and some larger) at
    /// every alignment up to 4 KiB, through each entry point, and checks
    /// each block's alignment and contents. Many blocks per size class so
    /// that blocks from anywhere in a page are checked, not only its first.
    #[test]
    #[allow(unsafe_code)]
    fn every_block_has_the_alignment_its_layout_asks_for() {
        let a = KeygateAlloc;
        let sizes = (1..=512).chain((513..=4096).step_by(7)).chain([
            16 << 10,
            64 << 10,
            1 << 20,
            (1 << 20) + 3,
        ]);
        for size in sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).expect("layout");
                let count = if size <= 512 { 24 } else { 3 };
                let mut blocks = Vec::with_capacity(count);
                for i in 0..count {
                    // SAFETY: non-zero size; each block is freed below with
                    // the layout it was made with (or its reallocated one).
                    let p = unsafe {
                        match i % 3 {
                            0 => a.alloc(layout),
                            1 => a.alloc_zeroed(layout),
                            _ => {
                                let small = Layout::from_size_align(size.div_ceil(2), align)
                                    .expect("layout");
                                let p = a.alloc(small);
                                assert!(!p.is_null());
                                p.write(0x5a);
                                let q = a.realloc(p, small, size);
                                assert!(!q.is_null());
                                assert_eq!(q.read(), 0x5a, "realloc kept the contents");
                                q
                            }
                        }
                    };
                    assert!(!p.is_null(), "size {size} align {align}: out of memory");
                    assert_eq!(
                        p as usize % align,
                        0,
                        "size {size} align {align}: block at {p:p}"
                    );
                    if i % 3 == 1 {
                        // SAFETY: `p` points to `size` zeroed bytes.
                        let zeroed = unsafe { std::slice::from_raw_parts(p, size) };
                        assert!(zeroed.iter().all(|&b| b == 0));
                    }
                    // SAFETY: the block is `size` bytes long.
                    unsafe { p.add(size - 1).write(0xa5) };
                    blocks.push(p);
                }
                for p in blocks {
                    // SAFETY: allocated above with `layout` (a reallocated
                    // block has `layout`'s size and alignment now).
                    unsafe { a.dealloc(p, layout) };
                }
            }
        }
    }

    #[test]
    fn the_plain_entry_points_serve_what_std_would_send_to_malloc() {
        assert!(plain_fits(1, 1));
        assert!(plain_fits(8, 8));
        assert!(plain_fits(16, 16));
        assert!(plain_fits(4096, 8));
        assert!(!plain_fits(8, 16), "an 8-byte block is only 8-aligned");
        assert!(!plain_fits(64, 32));
        assert!(!plain_fits(4096, 4096));
    }
}
