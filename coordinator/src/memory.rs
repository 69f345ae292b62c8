//! Handing freed memory back to the system.
//!
//! glibc keeps memory freed by a thread in that thread's allocator arena,
//! and raises its threshold for serving large blocks from `mmap` after each
//! large free, so model-sized temporaries (evaluation activations, update
//! chunks) stay resident long after they are dropped. The coordinator calls
//! [`release_free_memory`] after the phases that make them (an evaluation,
//! a round's close), so its resident size follows what it holds.

/// Returns free memory of every allocator arena to the system. A no-op
/// where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only walks the allocator's own free lists
        // (under its locks) and releases whole free pages; it touches no
        // memory the program holds.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
