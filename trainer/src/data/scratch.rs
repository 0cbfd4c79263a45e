//! Recycled byte buffers for the image path of a loader thread. A 2000x1500 JPEG decodes into
//! 9 MB, its first resize pass into ~5 MB more, the resized image is ~3 MB: fresh allocations of
//! that size are mmap'd by malloc, so every sample paid ~4,000 page faults and the kernel's
//! zeroing of 17 MB, more than the resize itself. Buffers handed back with `give` are reused by
//! the same thread's next `take`: already-mapped pages, nothing to zero.
use std::cell::RefCell;

/// Smaller buffers are left to malloc (they come from its heap, not fresh mappings).
const MIN_CAPACITY: usize = 1 << 20;
/// Larger ones too (a 3600x3000 photo decodes into 32 MB): rare, and not worth holding per
/// worker thread; at most `MAX_KEPT` x 32 MB stay per thread.
const MAX_CAPACITY: usize = 32 << 20;
/// Buffers kept per thread (decode output, resize intermediate, resized image, and one spare).
const MAX_KEPT: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `len` bytes: the smallest kept one that fits, else new.
pub fn take(len: usize) -> Vec<u8> {
    let kept = POOL.with_borrow_mut(|pool| {
        let best = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len)
            .min_by_key(|&i| pool[i].capacity())?;
        Some(pool.swap_remove(best))
    });
    match kept {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(len),
    }
}

/// `take(len)` filled with `len` zeros.
pub fn zeroed(len: usize) -> Vec<u8> {
    let mut v = take(len);
    v.resize(len, 0);
    v
}

/// Hand a buffer back for this thread's later `take`s (dropped if small, huge or the pool is full;
/// then the smallest kept buffer makes room for a larger one).
pub fn give(v: Vec<u8>) {
    if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&v.capacity()) {
        return;
    }
    POOL.with_borrow_mut(|pool| {
        if pool.len() < MAX_KEPT {
            pool.push(v);
        } else if let Some(i) = (0..pool.len()).min_by_key(|&i| pool[i].capacity()) {
            if pool[i].capacity() < v.capacity() {
                pool[i] = v;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_without_a_new_allocation() {
        let v = zeroed(3 << 20);
        let ptr = v.as_ptr();
        give(v);
        let w = take(2 << 20);
        assert_eq!((w.as_ptr(), w.len()), (ptr, 0));
        assert!(w.capacity() >= 3 << 20);
        // too large for anything kept: a fresh one
        give(w);
        assert!(take(8 << 20).capacity() >= 8 << 20);
        // small and huge buffers are not kept
        give(Vec::with_capacity(1000));
        give(Vec::with_capacity(MAX_CAPACITY + 1));
        let kept = |c: usize| (MIN_CAPACITY..=MAX_CAPACITY).contains(&c);
        assert!(POOL.with_borrow(|p| p.iter().all(|v| kept(v.capacity()))));
    }

    #[test]
    fn at_most_max_kept_buffers_stay() {
        for k in 0..MAX_KEPT + 3 {
            give(Vec::with_capacity(MIN_CAPACITY + k));
        }
        POOL.with_borrow(|p| {
            assert_eq!(p.len(), MAX_KEPT);
            // the largest ones were kept
            assert!(p.iter().all(|v| v.capacity() >= MIN_CAPACITY + 3));
        });
    }
}
