//! Giving freed heap back to the system.
//!
//! glibc's malloc keeps what the process frees: chunks go back to the
//! arena's free lists, and only the very top of each arena is ever returned
//! on its own. After a crowd of agents connects and leaves (their HTTP/2
//! buffers, streams and sessions freed), the controller's live heap is back
//! to a few MiB while its resident memory stays at the peak (docs/chaos.md,
//! scenario 4: 2 MiB in use, 60+ MiB resident). `malloc_trim(0)` releases the
//! free pages in the middle of every arena as well.
//!
//! A thread looks every [`INTERVAL`] at what the arenas hold free
//! (`mallinfo2`) and trims when that exceeds both [`FLOOR`] and the heap in
//! use: a steady controller whose free lists are in proportion to its live
//! heap is left alone, one that shed most of its heap gives it back within
//! one interval. Other allocators and C libraries (musl returns memory
//! itself) need nothing here.

use std::time::Duration;

/// How often the arenas are looked at.
const INTERVAL: Duration = Duration::from_secs(10);
/// Free memory below this is not worth a trim.
const FLOOR: usize = 16 << 20;

/// Whether free memory held by the allocator calls for a trim.
fn worth_trimming(free: usize, in_use: usize) -> bool {
    free > FLOOR && free > in_use
}

/// Starts the trimming thread (glibc only; elsewhere nothing to do).
pub fn spawn_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(INTERVAL);
                    let _ = glibc::trim_if_worth_it();
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no heap-trim thread: freed memory stays with the allocator");
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::time::Instant;

    /// (free, in use) bytes of the malloc arenas, mmapped chunks aside
    /// (those go back to the system when freed).
    fn arenas() -> (usize, usize) {
        // SAFETY: mallinfo2 only reads the allocator's statistics (taking
        // each arena's lock); it has no preconditions.
        let info = unsafe { libc::mallinfo2() };
        (info.fordblks, info.uordblks)
    }

    /// Whether a trim ran.
    pub(super) fn trim_if_worth_it() -> bool {
        let (free, in_use) = arenas();
        if !super::worth_trimming(free, in_use) {
            return false;
        }
        let started = Instant::now();
        // SAFETY: malloc_trim takes the arenas' locks itself and may be
        // called from any thread at any time.
        let released = unsafe { libc::malloc_trim(0) } == 1;
        tracing::debug!(
            free_bytes = free,
            in_use_bytes = in_use,
            released,
            took_us = started.elapsed().as_micros(),
            "trimmed the heap"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_when_free_memory_is_large_and_exceeds_what_is_in_use() {
        assert!(!worth_trimming(FLOOR, 0));
        assert!(worth_trimming(FLOOR + 1, 0));
        assert!(!worth_trimming(64 << 20, 64 << 20));
        assert!(worth_trimming(64 << 20, 2 << 20));
    }

    /// Resident memory of this process, KiB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The case the controller meets after a churn: most of a large heap
    /// freed, with live chunks scattered through it so glibc cannot return
    /// it from the top. The trim gives the free pages back.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_heap_freed_between_live_chunks_is_given_back() {
        const CHUNKS: usize = 160_000;
        const SIZE: usize = 512; // small: from the arena, not mmapped
        let mut chunks: Vec<Option<Box<[u8]>>> = (0..CHUNKS)
            .map(|i| Some(vec![u8::try_from(i % 251).unwrap_or(0); SIZE].into_boxed_slice()))
            .collect();
        // Keep one chunk in 64 (one per 32 KiB), free the rest.
        for (i, chunk) in chunks.iter_mut().enumerate() {
            if i % 64 != 0 {
                *chunk = None;
            }
        }
        let before = rss_kib();
        assert!(glibc::trim_if_worth_it(), "78 MiB freed, yet no trim");
        let after = rss_kib();
        assert!(
            after + 40 * 1024 < before,
            "RSS {before} KiB before the trim, {after} KiB after"
        );
        // The live chunks are untouched.
        assert!(
            chunks
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                .all(|(i, c)| c.iter().all(|&b| usize::from(b) == i % 251))
        );
    }
}
