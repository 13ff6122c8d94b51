//! Splitting CPU work across threads: ONNX Runtime's intra-op pool inside a session, plain
//! sequential execution elsewhere (tests, references).

/// Runs `f(i)` for every `i < n`, possibly concurrently; returns when all calls have returned.
pub trait Parallel: Sync {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync));
}

/// One thread, in order.
pub struct Sequential;

impl Parallel for Sequential {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }
}

/// Scoped std threads (for benchmarks and tests of the kernels outside ORT).
pub struct Threads(pub usize);

impl Parallel for Threads {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..self.0.max(1).min(n) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    f(i);
                });
            }
        });
    }
}
