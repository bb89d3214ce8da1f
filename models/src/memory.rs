//! Keeping freed memory for reuse. A training step allocates and frees many tensors of the
//! same large sizes. By default glibc serves each allocation over 128 KiB-32 MiB with a fresh
//! `mmap` and gives it back with `munmap` when freed (and trims the heap top), so every step
//! faults its pages in again and interrupts the other cores to flush their TLBs. On a
//! 2-core VM that doubled the step time of the benchmark MLP. [`keep_freed_memory`] raises the
//! thresholds so large blocks come from the heap and stay there for the next step; the
//! process then holds on to its peak usage instead of returning it.

/// Largest allocation still served from the heap (larger ones are mapped, as before).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 20;

/// Serves large allocations from the heap and stops trimming it (glibc only; elsewhere a
/// no-op). Call once, early; returns whether the settings took effect.
#[allow(unsafe_code)] // the only unsafe code in the workspace: one FFI call to glibc
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
