//! Transparent huge pages for the tensors that peers read and write with cross-memory attach
//! (`cma`). `process_vm_readv`/`writev` pin the peer's pages one by one: on 4 KiB pages pinning
//! is about a quarter of the kernel's time and the page walks of the reduction loops add more. A
//! tensor whose whole 2 MiB pages are huge pages pins 512x fewer pages; on the 2-core VM of
//! BENCHMARKS.md that made the 64 MiB reductions about 1.5-2x faster.
//!
//! libtorch allocates tensors on small pages (unless `THP_MEM_ALLOC_ENABLE=1`), so before peers
//! access a tensor this rank asks the kernel to back its whole 2 MiB pages with huge pages
//! (`madvise(MADV_COLLAPSE)`, Linux 6.1+): the contents stay, nothing else the process sees
//! changes. The first collapse of a range copies it (about 2.5 ms per MiB here, 160 ms for
//! 64 MiB), later ones find huge pages and cost ~20 us. So it pays only for buffers that stay
//! (FSDP's flat parameter and gradient buffers, the benchmark's), and `HugePages` collapses a
//! range only once it has been seen in `MIN_USES` collectives, and stops for a range whose
//! collapse was slow `MAX_SLOW` times (a buffer freed and allocated again at the same address
//! every step would otherwise pay the copy every step). Best effort: errors (older kernels, THP
//! set to never, no free huge page) leave the small pages. `LLAVA_SCO_CPU_SHM_HUGE=0` turns it off.
use std::time::{Duration, Instant};

/// `0`: leave tensors on the pages they have.
pub const HUGE_VAR: &str = "LLAVA_SCO_CPU_SHM_HUGE";
/// Bytes of a transparent huge page (x86-64, and arm64 with 4 KiB pages).
const HUGE: usize = 2 << 20;
/// Smaller tensors keep their pages (at most a few huge pages to gain).
const MIN_LEN: usize = 4 << 20;
/// Collectives a range must have been seen in before it is collapsed.
const MIN_USES: u32 = 3;
/// Slow collapses (ones that copied) after which a range is left alone.
const MAX_SLOW: u32 = 3;
/// Ranges remembered (least recently used ones are forgotten).
const MAX_RANGES: usize = 64;

#[derive(Clone, Debug)]
struct Range {
    addr: usize,
    len: usize,
    uses: u32,
    slow: u32,
    last_use: u64,
}

/// Which tensors to collapse (see the module doc).
pub struct HugePages {
    enabled: bool,
    ranges: Vec<Range>,
    clock: u64,
}

/// The whole huge pages inside `addr..addr + len`, as (start, bytes), if any.
fn whole_pages(addr: usize, len: usize) -> Option<(usize, usize)> {
    let lo = addr.checked_next_multiple_of(HUGE)?;
    let hi = addr.checked_add(len)? & !(HUGE - 1);
    (hi > lo).then(|| (lo, hi - lo))
}

/// Ask for huge pages on the whole 2 MiB pages of a fresh allocation that nothing has touched
/// yet (`madvise(MADV_HUGEPAGE)`), so its first writes fault in 2 MiB pages instead of 512x as
/// many 4 KiB ones: used for the data loader's pixel tensors (tens of MB, allocated per batch,
/// and whose page faults cost more than writing them). No copy, unlike MADV_COLLAPSE. Best
/// effort: ignored where THP is off or the range holds no whole huge page.
pub fn advise_fresh(addr: *const u8, len: usize) {
    if len < MIN_LEN {
        return;
    }
    if let Some((at, bytes)) = whole_pages(addr as usize, len) {
        // SAFETY: advice on whole pages inside the caller's own allocation; MADV_HUGEPAGE
        // changes how later faults are served, never the contents.
        unsafe { libc::madvise(at as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
    }
}

/// Whether collapsing `len` bytes in `took` copied them (a range of huge pages takes microseconds;
/// copying runs at a few GB/s): 2 ms plus 1 ms per 16 MiB, which a preempted walk rarely exceeds.
fn was_slow(len: usize, took: Duration) -> bool {
    took > Duration::from_millis(2 + (len >> 24) as u64)
}

impl HugePages {
    pub fn new(enabled: bool) -> HugePages {
        HugePages {
            enabled,
            ranges: Vec::new(),
            clock: 0,
        }
    }

    /// From `LLAVA_SCO_CPU_SHM_HUGE` (on unless `0`).
    pub fn from_env() -> HugePages {
        HugePages::new(std::env::var(HUGE_VAR).as_deref() != Ok("0"))
    }

    /// Called before peers access this rank's `addr..addr + len`: collapses its whole 2 MiB pages
    /// into huge pages when the policy says so.
    pub fn prepare(&mut self, addr: *const u8, len: usize) {
        if let Some((at, bytes)) = self.plan(addr as usize, len) {
            let t = Instant::now();
            // SAFETY: advice on whole pages of this rank's own tensor, which MADV_COLLAPSE keeps
            // byte for byte; the result is ignored (best effort).
            unsafe { libc::madvise(at as *mut libc::c_void, bytes, libc::MADV_COLLAPSE) };
            self.collapsed(addr as usize, len, t.elapsed());
        }
    }

    /// Counts a use of the range and returns the pages to collapse now, if any.
    fn plan(&mut self, addr: usize, len: usize) -> Option<(usize, usize)> {
        if !self.enabled || len < MIN_LEN {
            return None;
        }
        let pages = whole_pages(addr, len)?;
        self.clock += 1;
        let clock = self.clock;
        let i = match self
            .ranges
            .iter()
            .position(|r| r.addr == addr && r.len == len)
        {
            Some(i) => i,
            None => {
                if self.ranges.len() >= MAX_RANGES {
                    let oldest = (0..self.ranges.len())
                        .min_by_key(|&i| self.ranges[i].last_use)
                        .expect("MAX_RANGES > 0");
                    self.ranges.swap_remove(oldest);
                }
                self.ranges.push(Range {
                    addr,
                    len,
                    uses: 0,
                    slow: 0,
                    last_use: clock,
                });
                self.ranges.len() - 1
            }
        };
        let r = &mut self.ranges[i];
        r.uses = r.uses.saturating_add(1);
        r.last_use = clock;
        (r.uses >= MIN_USES && r.slow < MAX_SLOW).then_some(pages)
    }

    /// Records how long collapsing the range took.
    fn collapsed(&mut self, addr: usize, len: usize, took: Duration) {
        if let Some(r) = self
            .ranges
            .iter_mut()
            .find(|r| r.addr == addr && r.len == len)
        {
            if was_slow(len, took) {
                r.slow += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn only_whole_huge_pages_of_large_tensors() {
        // 3..7 MiB holds one whole huge page, 4..6 MiB
        assert_eq!(whole_pages(3 * MIB, 4 * MIB), Some((4 * MIB, 2 * MIB)));
        assert_eq!(whole_pages(4 * MIB, 4 * MIB), Some((4 * MIB, 4 * MIB)));
        assert_eq!(whole_pages(3 * MIB, 2 * MIB), None);
        assert_eq!(whole_pages(usize::MAX - MIB, 8 * MIB), None);
        let mut h = HugePages::new(true);
        for _ in 0..5 {
            assert_eq!(h.plan(4 * MIB, 2 * MIB), None, "below MIN_LEN");
        }
        let mut off = HugePages::new(false);
        for _ in 0..5 {
            assert_eq!(off.plan(4 * MIB, 64 * MIB), None, "disabled");
        }
    }

    #[test]
    fn persistent_buffers_are_collapsed_from_the_third_use_and_reallocated_ones_given_up() {
        let mut h = HugePages::new(true);
        let (a, len) = (64 * MIB, 64 * MIB);
        assert_eq!(h.plan(a, len), None);
        assert_eq!(h.plan(a, len), None);
        // a persistent buffer: one slow collapse, then cheap ones, forever
        for i in 0..20 {
            assert_eq!(h.plan(a, len), Some((a, len)), "use {}", i + 3);
            let took = if i == 0 { 160 } else { 0 };
            h.collapsed(a, len, Duration::from_millis(took));
        }
        // a buffer that is new (small pages) at the same address on every use: MAX_SLOW copies
        let b = 256 * MIB;
        h.plan(b, len);
        h.plan(b, len);
        for _ in 0..MAX_SLOW {
            assert!(h.plan(b, len).is_some());
            h.collapsed(b, len, Duration::from_millis(160));
        }
        for _ in 0..5 {
            assert_eq!(h.plan(b, len), None);
        }
        // the same address with another length is another buffer
        assert_eq!(h.plan(b, len + 8), None);
    }

    #[test]
    fn forgets_the_least_recently_used_range() {
        let mut h = HugePages::new(true);
        let len = 8 * MIB;
        let keep = 1 << 40;
        h.plan(keep, len);
        h.plan(keep, len);
        for i in 0..MAX_RANGES - 1 {
            h.plan((i + 1) << 30, len); // fills the table; `keep` is the oldest...
            if i == 10 {
                h.plan(keep, len); // ...until used again (its third use: collapse)
            }
        }
        assert_eq!(h.ranges.len(), MAX_RANGES);
        h.plan(1 << 45, len); // evicts the least recently used, not `keep`
        assert!(h.ranges.iter().any(|r| r.addr == keep));
        assert!(!h.ranges.iter().any(|r| r.addr == 1 << 30));
    }

    #[test]
    fn collapsing_keeps_the_contents() {
        // 8 MiB + 1 KiB of f32 at an arbitrary (Vec) alignment: at least 3 whole huge pages
        let n = (8 * MIB + 1024) / 4;
        let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let expected = v.clone();
        let mut h = HugePages::new(true);
        for _ in 0..MIN_USES + 1 {
            h.prepare(v.as_ptr() as *const u8, n * 4);
        }
        assert_eq!(v, expected);
    }
}
