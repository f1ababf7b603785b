//! The allocator of herd's binaries: mimalloc, entered the way the standard library enters
//! `malloc`.
//!
//! The `mimalloc` crate's `MiMalloc` hands every allocation to `mi_malloc_aligned`, whatever its
//! alignment. mimalloc 3 serves an aligned request from its inlined fast path only when the block
//! is at most 1 KiB and the next free block of its size class happens to be aligned; otherwise it
//! goes through its out-of-line fallback, which over-allocates `size + alignment - 1` bytes (often
//! a size class up: 48 bytes asked with alignment 8 can take a 64-byte block), even when the
//! alignment asked is 8, which every block has anyway. A proxy's futures and buffers are such
//! blocks: on an HTTP/2 request through the gateway that was 474 instructions for its one stream
//! future alone (docs/performance.md, section 56). [`Mimalloc`] asks for alignment only when a
//! plain block would not have it, as `std::alloc::System` does with glibc (mimalloc_rust's pull
//! request 170 proposes the same, unmerged as of this writing).

#![allow(unsafe_code)]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every mimalloc block of at least this size has (`MI_MAX_ALIGN_SIZE`): its size
/// classes from 16 bytes up are multiples of 16 and a page's first block starts 16-aligned
/// (mimalloc asserts both); the one smaller class, 8 bytes, is 8-aligned.
const MIN_ALIGN: usize = 16;

/// mimalloc as the global allocator: `#[global_allocator] static A: Mimalloc = Mimalloc;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mimalloc;

/// Whether a plain block of `size` bytes is aligned for `align` already.
fn plain_block_fits(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it; a pointer is returned only with the
// alignment asked (plain blocks when `plain_block_fits`, the aligned entry points otherwise), and
// `mi_free` / `mi_realloc*` accept blocks from either entry point.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; mimalloc returns null on failure, as GlobalAlloc expects.
        unsafe {
            if plain_block_fits(layout.align(), layout.size()) {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if plain_block_fits(layout.align(), layout.size()) {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (GlobalAlloc's contract); the
        // block that comes back is aligned for `layout.align()` as in `alloc`.
        unsafe {
            if plain_block_fits(layout.align(), new_size) {
                ffi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIGNS: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 4096, 65536];
    const SIZES: [usize; 12] = [1, 3, 8, 24, 40, 48, 1000, 1025, 1032, 5000, 70_000, 3 << 20];

    /// Several blocks of each size and alignment at once, so that they come from different
    /// places in their pages (a lone block would often be at a page's aligned start).
    #[test]
    fn every_block_has_the_alignment_asked_and_is_usable() {
        for align in ALIGNS {
            for size in SIZES.into_iter().chain([align, 3 * align]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                let blocks: Vec<*mut u8> = (0..16)
                    .map(|i| {
                        // SAFETY: the layout's size is not zero.
                        let block = unsafe { Mimalloc.alloc(layout) };
                        assert!(!block.is_null(), "{size} bytes aligned to {align}");
                        assert_eq!(block as usize % align, 0, "{size} bytes aligned to {align}");
                        // SAFETY: the block is `size` bytes long.
                        unsafe { block.write_bytes(i as u8, size) };
                        block
                    })
                    .collect();
                for (i, block) in blocks.into_iter().enumerate() {
                    // SAFETY: written above; freed once with its layout.
                    unsafe {
                        assert_eq!(*block.add(size - 1), i as u8);
                        Mimalloc.dealloc(block, layout);
                    }
                }
            }
        }
    }

    /// Zeroed blocks are zero also where they reuse dirty ones: many blocks are dirtied and
    /// freed first, then as many zeroed blocks asked for, and the test requires some of them
    /// to be the dirty blocks again (a fresh page is zero anyway and would prove nothing).
    #[test]
    fn zeroed_blocks_are_zero_and_aligned() {
        for align in ALIGNS {
            for size in [24, 1025, 5000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                let count = 512;
                // SAFETY: the layout's size is not zero; every block is used within its size and
                // freed once.
                unsafe {
                    let dirty: Vec<usize> = (0..count)
                        .map(|_| {
                            let block = Mimalloc.alloc(layout);
                            assert!(!block.is_null());
                            block.write_bytes(0xAB, size);
                            block as usize
                        })
                        .collect();
                    for &block in &dirty {
                        Mimalloc.dealloc(block as *mut u8, layout);
                    }
                    let zeroed: Vec<*mut u8> = (0..2 * count)
                        .map(|_| Mimalloc.alloc_zeroed(layout))
                        .collect();
                    let reused = zeroed
                        .iter()
                        .filter(|block| dirty.contains(&(**block as usize)))
                        .count();
                    assert!(
                        reused > 0,
                        "{size} bytes aligned to {align}: no dirty block reused"
                    );
                    for block in zeroed {
                        assert!(!block.is_null());
                        assert_eq!(block as usize % align, 0, "{size} bytes aligned to {align}");
                        assert!(
                            (0..size).all(|at| *block.add(at) == 0),
                            "{size} bytes zeroed"
                        );
                        Mimalloc.dealloc(block, layout);
                    }
                }
            }
        }
    }

    /// From blocks of both entry points to both: small starts (4, 8 bytes: below or at the
    /// alignment, so aligned calls) grown past 1 KiB (plain calls when the alignment is at most
    /// 16) and shrunk below the alignment again.
    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        for align in ALIGNS {
            for first in [4, 8, 24] {
                // SAFETY: sizes are not zero; each block is used within its size and freed once,
                // with the layout it has after the last realloc.
                unsafe {
                    let mut block = Mimalloc.alloc(Layout::from_size_align(first, align).unwrap());
                    assert!(!block.is_null());
                    block.write_bytes(7, first);
                    let mut size = first;
                    for new_size in [40, 1025, 70_000, 16, 5000, 2] {
                        let layout = Layout::from_size_align(size, align).unwrap();
                        block = Mimalloc.realloc(block, layout, new_size);
                        assert!(!block.is_null());
                        assert_eq!(
                            block as usize % align,
                            0,
                            "{new_size} bytes aligned to {align}"
                        );
                        let kept = size.min(new_size).min(first);
                        assert!(
                            (0..kept).all(|at| *block.add(at) == 7),
                            "contents kept from {size} to {new_size} bytes aligned to {align}"
                        );
                        size = new_size;
                    }
                    Mimalloc.dealloc(block, Layout::from_size_align(size, align).unwrap());
                }
            }
        }
    }

    #[test]
    fn plain_blocks_only_where_mimalloc_guarantees_the_alignment() {
        assert!(plain_block_fits(8, 5000));
        assert!(plain_block_fits(16, 16));
        assert!(plain_block_fits(1, 1));
        assert!(
            !plain_block_fits(16, 8),
            "an 8-byte block is only 8-aligned"
        );
        assert!(!plain_block_fits(32, 4096));
        assert!(!plain_block_fits(128, 4096));
    }
}
