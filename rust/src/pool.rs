//! Process-local rayon thread pool that survives `fork`.
//!
//! rayon's global pool deadlocks in a child created by `fork` (its worker threads do not exist
//! there, but the registry still thinks they do). ka_rs therefore never touches the global pool:
//! it keeps one pool per process id, built lazily. When the pid changes (we are in a forked
//! child) a fresh pool is built and the parent's copy is leaked untouched — dropping it would
//! try to wake threads that do not exist and could block on a mutex copied in a locked state.
//!
//! The pool is published through an atomic pointer, so no lock is ever taken: a child forked
//! while another parent thread was inside this module cannot deadlock here.
//!
//! Thread count: `KA_RS_NUM_THREADS` if set to a positive integer, else
//! `std::thread::available_parallelism()`. With one thread everything runs sequentially on the
//! caller's thread.

use crate::alloc;
use crate::error::{KaError, KaResult};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Work (in rough "inner-loop iterations") below which parallelism does not pay off.
///
/// Measured on the 2-core dev box: dispatching a batch of jobs to the pool costs ~5–20 µs,
/// which is what ~100k cheap inner-loop iterations take.
pub const PARALLEL_MIN_WORK: usize = 100_000;

struct PidPool {
    pid: u32,
    pool: ThreadPool,
}

static POOL: AtomicPtr<PidPool> = AtomicPtr::new(std::ptr::null_mut());

/// Number of threads ka_rs uses for parallel work (≥ 1).
pub fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("KA_RS_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
    })
}

/// True when `work` is large enough to be worth spreading over threads.
pub fn worth_parallel(work: usize) -> bool {
    work >= PARALLEL_MIN_WORK && num_threads() > 1
}

/// True when the machine seems to have a core to spare for a parallel job right now: fewer
/// threads are runnable at this instant (Linux `/proc/loadavg`, 4th field, which counts the
/// calling thread itself) than there are CPUs. On a busy machine a second worker thread is
/// often descheduled mid-job and the whole call waits for it (measured on the 2-core dev box
/// at load ~4: matcher B=32 Q=300 median 4.3 ms with 2 threads vs 2.5 ms sequential, while
/// unloaded the 2 threads win). The instantaneous count rather than the 1-minute load
/// average, which also remembers the caller's own recent work (a training step's torch
/// threads) and would keep a now idle core unused. Always true when `KA_RS_NUM_THREADS` is
/// set (the user chose) or the count cannot be read. A plain file read: no lock, fork-safe;
/// callers use it only for large jobs.
pub fn spare_core() -> bool {
    static EXPLICIT: OnceLock<bool> = OnceLock::new();
    if *EXPLICIT.get_or_init(|| std::env::var_os("KA_RS_NUM_THREADS").is_some()) {
        return true;
    }
    // available_parallelism() reads the cgroup files on every call (tens of µs): once only
    static CPUS: OnceLock<usize> = OnceLock::new();
    let cpus = *CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    match runnable_threads() {
        Some(running) => running < cpus,
        None => true,
    }
}

/// Threads runnable at this instant, the caller included (Linux). The file stays open and
/// is read with one `pread` (one system call instead of open + read + close on every large
/// job); a descriptor inherited over `fork` reads the same global file.
#[cfg(unix)]
fn runnable_threads() -> Option<usize> {
    use std::os::unix::fs::FileExt;
    static LOADAVG: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let file = LOADAVG
        .get_or_init(|| std::fs::File::open("/proc/loadavg").ok())
        .as_ref()?;
    let mut buf = [0u8; 128];
    let n = file.read_at(&mut buf, 0).ok()?;
    parse_runnable(std::str::from_utf8(&buf[..n]).ok()?)
}

/// No `/proc/loadavg` to read: the caller assumes a core is spare.
#[cfg(not(unix))]
fn runnable_threads() -> Option<usize> {
    None
}

/// The `R` of `/proc/loadavg`'s "1m 5m 15m R/T last_pid".
fn parse_runnable(s: &str) -> Option<usize> {
    let field = s.split_whitespace().nth(3)?;
    field.split('/').next()?.parse::<usize>().ok()
}

/// The pool of the current process, built on first use (or first use after a `fork`).
/// `None` when only one thread is configured or the threads cannot be spawned.
fn pool() -> Option<&'static ThreadPool> {
    if num_threads() <= 1 {
        return None;
    }
    let pid = std::process::id();
    let cur = POOL.load(Ordering::Acquire);
    // SAFETY: every non-null pointer stored in POOL comes from `Box::into_raw` below and is
    // never freed (pools are leaked for the life of the process), so it is valid for 'static.
    if let Some(p) = unsafe { cur.as_ref() } {
        if p.pid == pid {
            return Some(&p.pool);
        }
    }
    // the caller works alongside the pool (see `map_indices`), so it needs one thread fewer
    let pool = ThreadPoolBuilder::new()
        .num_threads(num_threads() - 1)
        .thread_name(|i| format!("ka_rs-{i}"))
        .build()
        .ok()?;
    let fresh = Box::into_raw(Box::new(PidPool { pid, pool }));
    match POOL.compare_exchange(cur, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // The previous pointer (a parent's pool, if any) is deliberately leaked: see module docs.
        // SAFETY: `fresh` was just created by Box::into_raw and is now owned by POOL forever.
        Ok(_) => Some(unsafe { &(*fresh).pool }),
        Err(winner) => {
            // Another thread of this process installed a pool first; use it and drop ours
            // (a pool built in this very process can be dropped safely).
            // SAFETY: `fresh` came from Box::into_raw above and was never published.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: as above, published pointers are never freed.
            match unsafe { winner.as_ref() } {
                Some(p) if p.pid == pid => Some(&p.pool),
                _ => None,
            }
        }
    }
}

/// Run `op` inside the process-local pool (so rayon calls in it use that pool).
/// Falls back to running `op` on the caller's thread when no pool is available.
/// Do not use rayon parallel iterators inside `op` directly: use [`map_indices`] /
/// [`for_each_chunk_mut`], which never fall back to rayon's global pool.
pub fn install<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) => p.install(op),
        None => op(),
    }
}

/// `(0..n).map(f)` collected in order, in parallel with a per-thread workspace from `init`
/// when `parallel` is true and a pool is available, else sequentially with one workspace.
///
/// The calling thread works too: it starts on the items at once and the pool's helpers join
/// when they wake, all taking the next index from one atomic counter. A helper that wakes
/// late (an idle core on a VM can take hundreds of µs) finds less or nothing left, so a
/// parallel call is never much slower than the sequential loop. (rayon's `install` would
/// instead park the caller and wait for a pool thread to pick the whole job up.)
///
/// For an `n` that comes from user input use [`try_map_indices`]: this one panics where that
/// one returns an error.
pub fn map_indices<W, T, I, F>(n: usize, parallel: bool, init: I, f: F) -> Vec<T>
where
    T: Send,
    I: Fn() -> W + Sync + Send,
    F: Fn(&mut W, usize) -> T + Sync + Send,
{
    match try_map_indices(n, parallel, init, f, "n", "the results") {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`map_indices`] with its buffers (the `n` results, and the parallel path's bookkeeping)
/// allocated fallibly: an `n` too large for memory is an error naming `arg` / `what`, before
/// any item runs, instead of an abort.
pub fn try_map_indices<W, T, I, F>(
    n: usize,
    parallel: bool,
    init: I,
    f: F,
    arg: &str,
    what: &str,
) -> KaResult<Vec<T>>
where
    T: Send,
    I: Fn() -> W + Sync + Send,
    F: Fn(&mut W, usize) -> T + Sync + Send,
{
    let mut out = alloc::try_with_capacity(n, arg, what)?;
    if parallel && n > 1 {
        if let Some(p) = pool() {
            let done = alloc::try_with_capacity(n, arg, what)?;
            return shared_counter_map(p, n, &init, &f, done, out, arg, what);
        }
    }
    let mut w = init();
    out.extend((0..n).map(|i| f(&mut w, i)));
    Ok(out)
}

/// The parallel path of [`try_map_indices`]: caller + helpers pull indices from one counter.
/// `done` and `out` come with room for `n` items.
#[allow(clippy::too_many_arguments)]
fn shared_counter_map<W, T, I, F>(
    p: &ThreadPool,
    n: usize,
    init: &I,
    f: &F,
    done: Vec<(usize, T)>,
    mut out: Vec<T>,
    arg: &str,
    what: &str,
) -> KaResult<Vec<T>>
where
    T: Send,
    I: Fn() -> W + Sync + Send,
    F: Fn(&mut W, usize) -> T + Sync + Send,
{
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, T)>> = Mutex::new(done);
    let failed = AtomicBool::new(false);
    let work = || {
        let mut local = Vec::new();
        let mut w: Option<W> = None; // built only if this thread gets an item
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            if local.try_reserve(1).is_err() {
                failed.store(true, Ordering::Relaxed);
                next.store(n, Ordering::Relaxed); // the others stop too
                break;
            }
            let ws = w.get_or_insert_with(init);
            local.push((i, f(ws, i)));
        }
        if !local.is_empty() {
            // a panic in `f` poisons nothing we rely on: take the data either way.
            // `done` has room for all n items: appending never reallocates.
            done.lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut local);
        }
    };
    run_with_helpers(p, &work);
    if failed.load(Ordering::Relaxed) {
        return Err(KaError::OutOfMemory {
            what: format!("{arg}: {what}"),
            bytes: n.saturating_mul(std::mem::size_of::<(usize, T)>()),
        });
    }
    let mut pairs = done.into_inner().unwrap_or_else(|e| e.into_inner());
    pairs.sort_unstable_by_key(|&(i, _)| i);
    debug_assert_eq!(pairs.len(), n);
    out.extend(pairs.into_iter().map(|(_, t)| t));
    Ok(out)
}

/// Run `work` on the calling thread and on every helper of the pool, returning when all are
/// done. `work` must pull its items from shared state (a counter, a locked iterator), so the
/// caller starts at once and a helper that wakes late just finds less to do.
fn run_with_helpers(p: &ThreadPool, work: &(dyn Fn() + Sync)) {
    p.in_place_scope(|s| {
        for _ in 0..p.current_num_threads() {
            s.spawn(|_| work());
        }
        work();
    });
}

/// `(0..n).map(f)` collected in order; parallel when `work` (a rough count of inner-loop
/// iterations for the whole job) reaches [`PARALLEL_MIN_WORK`], sequential otherwise.
pub fn run_parallel<T, F>(n: usize, work: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync + Send,
{
    map_indices(n, worth_parallel(work), || (), |_, i| f(i))
}

/// Call `f(chunk_index, chunk)` for each `chunk_len`-sized chunk of `data`, in parallel when
/// `parallel` is true and a pool is available. `chunk_len == 0` does nothing.
pub fn for_each_chunk_mut<T, F>(data: &mut [T], chunk_len: usize, parallel: bool, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if chunk_len == 0 || data.is_empty() {
        return;
    }
    if parallel && data.len() > chunk_len {
        if let Some(p) = pool() {
            // caller + helpers take the next chunk from one shared iterator (see map_indices)
            let chunks = Mutex::new(data.chunks_mut(chunk_len).enumerate());
            let work = || loop {
                let item = chunks.lock().unwrap_or_else(|e| e.into_inner()).next();
                match item {
                    Some((i, c)) => f(i, c),
                    None => break,
                }
            };
            run_with_helpers(p, &work);
            return;
        }
    }
    data.chunks_mut(chunk_len)
        .enumerate()
        .for_each(|(i, c)| f(i, c));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_parsing() {
        assert_eq!(parse_runnable("3.94 3.84 4.82 3/712 12345\n"), Some(3));
        assert_eq!(parse_runnable("0.10 0.20 0.30 1/77 999"), Some(1));
        assert_eq!(parse_runnable(""), None);
        assert_eq!(parse_runnable("1 2 3 x/7 5"), None);
        assert_eq!(parse_runnable("x 1 2"), None);
        // never panics, whatever the machine
        let _ = spare_core();
        // this test thread is running, so the count is at least 1 where it can be read
        assert!(runnable_threads().is_none_or(|n| n >= 1));
    }

    #[test]
    fn map_indices_keeps_order_both_ways() {
        let seq = map_indices(1000, false, || 0usize, |_, i| i * 2);
        let par = map_indices(1000, true, || 0usize, |_, i| i * 2);
        assert_eq!(seq, par);
        assert_eq!(run_parallel(1000, usize::MAX, |i| i * 2), seq);
        assert_eq!(run_parallel(1000, 0, |i| i * 2), seq);
        assert_eq!(par[999], 1998);
    }

    #[test]
    fn try_map_indices_refuses_what_cannot_fit() {
        for parallel in [false, true] {
            let e = try_map_indices(1 << 56, parallel, || (), |_, i| i, "n", "x").unwrap_err();
            assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
            let v = try_map_indices(100, parallel, || (), |_, i| i * 3, "n", "x").unwrap();
            assert_eq!(v, (0..100).map(|i| i * 3).collect::<Vec<_>>());
        }
    }

    #[test]
    fn chunks_cover_everything() {
        let mut v = vec![0usize; 1003];
        for_each_chunk_mut(&mut v, 10, true, |ci, c| {
            for (k, x) in c.iter_mut().enumerate() {
                *x = ci * 10 + k;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
        for_each_chunk_mut(&mut v, 0, true, |_, _| panic!("never called"));
    }

    #[test]
    fn pool_is_reused_within_a_process() {
        if num_threads() > 1 {
            let a = pool().map(|p| p as *const ThreadPool);
            let b = pool().map(|p| p as *const ThreadPool);
            assert_eq!(a, b);
            // the caller is the other worker
            assert_eq!(install(rayon::current_num_threads), num_threads() - 1);
        }
        assert_eq!(install(|| 7), 7);
    }
}
