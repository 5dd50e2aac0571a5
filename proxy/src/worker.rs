//! Which worker thread the caller runs on. Per-worker state (idle upstream connections, metric
//! shards) is indexed by it, so the request path of one worker does not write cache lines that
//! another worker writes too. Threads that are not workers (admin, tests) count as worker 0.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// Sets the number of workers; call before per-worker state is made.
pub fn set_count(n: usize) {
    COUNT.store(n.max(1), Ordering::Relaxed);
}

/// The number of workers (at least 1).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the calling thread as worker `index`.
pub fn enter(index: usize) {
    INDEX.with(|w| w.set(index));
}

/// The calling thread's worker index.
pub fn index() -> usize {
    INDEX.with(|w| w.get())
}
