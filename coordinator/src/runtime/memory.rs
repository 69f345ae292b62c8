//! Keeping the coordinator's resident memory close to what it holds.
//!
//! glibc gives each thread that allocates its own arena (up to eight per
//! core), keeps memory a thread freed in that arena, and raises its
//! threshold for serving large blocks from `mmap` after each large free
//! (up to 32 MiB), so temporaries (evaluation activations, update chunks,
//! decode buffers) stay resident, scattered over arenas, long after they are
//! dropped. [`tune_allocator`], called before any thread starts, caps the
//! arenas at two and fixes the thresholds; [`release_free_memory`], called
//! after the phases that make temporaries (an evaluation, a round's close),
//! hands what is free back to the system. Together they took the S3
//! coordinator's peak from 358 to 310–330 MiB (`BENCHMARKS.md`).

/// Allocator arenas: the coordinator's work is one round at a time, not
/// many threads allocating at once.
const ARENA_MAX: i32 = 2;
/// Blocks from this size up are mapped and unmapped on their own.
const MMAP_THRESHOLD: i32 = 16 << 20;
/// Free memory at the top of an arena beyond this goes back at once (what
/// is below it goes back in [`release_free_memory`]).
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Caps glibc's allocator arenas and fixes its `mmap` and trim thresholds,
/// unless the environment sets them (`MALLOC_ARENA_MAX`,
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`). Call it first
/// thing in `main`, before any other thread exists. A no-op where the C
/// library is not glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (var, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, ARENA_MAX),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: `mallopt` only sets the allocator's own parameters
            // (under its lock); it touches no memory the program holds.
            #[allow(unsafe_code)]
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

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

/// [`release_free_memory`] from async code: on a blocking thread, since
/// walking the arenas of a large heap takes milliseconds.
pub async fn release_free_memory_off_runtime() {
    let _ = tokio::task::spawn_blocking(release_free_memory).await;
}
