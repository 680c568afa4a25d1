//! Keeping the daemon's resident memory to what it holds.
//!
//! A full pass over thousands of leases allocates transient structures of
//! the cluster's size (kernel dumps, the desired and actual state, the
//! diff) and frees them again; glibc keeps freed memory in its arenas, one
//! per thread by default, so without help the resident set stays at the
//! peak of every thread. flanneld caps the arenas, keeps big blocks out
//! of them (a fixed mmap threshold) and hands freed memory back to the
//! kernel after each full pass (`malloc_trim`). Both are glibc
//! specifics; on other C libraries these are no-ops.

/// Caps malloc's arenas at two (the main one and one shared by every
/// other thread): flanneld's threads allocate little and rarely at the
/// same time. Also fixes the mmap threshold at 128 KiB: glibc raises it to
/// the size of the largest block freed, so after the first big kernel dump
/// every later one would come from the heap, where a freed buffer cannot
/// go back to the kernel while a small live block sits above it. Call
/// first thing in `main`.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns the memory freed since the last call to the kernel
/// (`malloc_trim(0)`).
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and trims the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
