//! Memory a large message leaves behind goes back to the system.
//!
//! Every buffer that holds a message's bytes is freed once they have
//! passed (outboxes, echo mode's text messages), but glibc's `malloc`
//! keeps what is freed in its arenas, and after a large buffer is freed it
//! raises its mmap threshold, so the next large buffers come from the
//! arenas too. A gateway whose connections once carried large messages
//! thus kept their peak resident, kilobytes per connection long after the
//! messages had passed. Sessions report the large buffers they free;
//! once a second, if any was, the gateway returns free pages with
//! `malloc_trim` ([`trim`]). A gateway carrying only small messages never trims.

use std::sync::atomic::{AtomicBool, Ordering};

/// A freed buffer at least this large asks for a trim.
pub const LARGE: usize = 16 * 1024;

static GATEWAY: Released = Released::new();

/// Notes that a buffer of `capacity` bytes is being freed.
pub fn released(capacity: usize) {
    GATEWAY.note(capacity);
}

/// Whether a large buffer was freed since the last call.
pub fn trim_due() -> bool {
    GATEWAY.due()
}

/// Whether a large buffer was freed since the last trim.
struct Released(AtomicBool);

impl Released {
    const fn new() -> Released {
        Released(AtomicBool::new(false))
    }

    fn note(&self, capacity: usize) {
        // Load first: the common case writes nothing to the shared line.
        if capacity >= LARGE && !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    fn due(&self) -> bool {
        self.0.load(Ordering::Relaxed) && self.0.swap(false, Ordering::Relaxed)
    }
}

/// Returns the allocator's free pages to the system. It walks every arena
/// under its locks (about N ms at 10,000 connections): call it off the
/// runtime's workers.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim takes no pointer and touches only the
    // allocator's own state, under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl, and the BSDs') return freed memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_large_buffer_asks_for_a_trim_and_once() {
        let r = Released::new();
        assert!(!r.due());
        r.note(LARGE - 1);
        assert!(!r.due());
        r.note(LARGE);
        r.note(4 * LARGE);
        assert!(r.due());
        assert!(!r.due());
    }
}
