//! A shared memory segment for the ranks of one host, with a barrier that notices dead peers.
//!
//! Layout: a header page (magic, then one 64-byte line per rank: word 0 the barrier epoch, word 1
//! the pid, words 2..8 free for the transports' own use, see `publish`), then the data area.
//! Rank 0 creates the file under /dev/shm (removing a stale one left by a crashed run with the
//! same run id), the others open it once the store says it is ready, and after every rank has mapped
//! it rank 0 unlinks it: the mapping lives on. Rank 0 also unlinks it when opening fails; a rank
//! killed before the unlink leaves the file to the launcher, which removes an attempt's leftovers
//! (`launcher::shm`).
use std::fs::OpenOptions;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use launcher::env::RankEnv;
use launcher::store::StoreClient;
use memmap2::MmapMut;

use super::{DistError, Result};

const MAGIC: u64 = 0x4c4c_4156_4153_434f; // "LLAVASCO"
const LINE: usize = 64;

pub struct Segment {
    map: MmapMut,
    header: usize,
    pub rank: usize,
    pub world: usize,
    timeout: Duration,
    pids: Vec<i32>,
    epoch: u64,
}

fn shm_err(path: &std::path::Path, detail: impl std::fmt::Display) -> DistError {
    DistError::Shm {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl Segment {
    /// Creates (rank 0) or opens (others) the segment `name`. Rank 0 takes the first of
    /// `data_sizes` (largest first) that /dev/shm can hold, reserving its pages up front so a full
    /// /dev/shm is an error here and never a SIGBUS later; the others map whatever rank 0 made
    /// (`data_len()`).
    pub fn open(
        env: &RankEnv,
        store: &mut StoreClient,
        name: &str,
        data_sizes: &[usize],
        timeout: Duration,
    ) -> Result<Segment> {
        let (rank, world) = (env.rank, env.world_size);
        let header = (LINE * (1 + world)).div_ceil(4096) * 4096;
        let path = launcher::shm::path(&env.run_id, env.master_port, env.restart_count, name);
        let key = format!("dist/shm/{name}/a{}", env.restart_count);
        let file = if rank == 0 {
            let _ = std::fs::remove_file(&path); // stale segment of a crashed run with this run id
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| shm_err(&path, e))?;
            let mut last = String::new();
            let fits = data_sizes.iter().any(|&bytes| {
                let len = (header + bytes) as libc::off_t;
                // SAFETY: fallocate on our own open file descriptor.
                let r =
                    unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, len) };
                last = std::io::Error::from_raw_os_error(r).to_string();
                r == 0 && f.set_len(len as u64).is_ok()
            });
            if !fits {
                let _ = std::fs::remove_file(&path);
                return Err(shm_err(&path, format!("cannot reserve even {} bytes: {last} (is /dev/shm large enough? `df -h /dev/shm`; in docker pass --shm-size)", header + data_sizes.last().copied().unwrap_or(0))));
            }
            f
        } else {
            store.get_timeout(&format!("{key}/ready"), timeout)?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| {
                    shm_err(
                        &path,
                        format!("{e} (are all ranks of this group on one host?)"),
                    )
                })?
        };
        let opened = Self::map_and_meet(file, &path, &key, header, env, store, timeout);
        if rank == 0 {
            // every rank has mapped it (or opening failed): the name is not needed any more
            let _ = std::fs::remove_file(&path);
        }
        opened
    }

    /// Maps the segment file, checks or writes its magic, publishes this rank's pid and waits
    /// for every rank to have mapped it.
    fn map_and_meet(
        file: std::fs::File,
        path: &std::path::Path,
        key: &str,
        header: usize,
        env: &RankEnv,
        store: &mut StoreClient,
        timeout: Duration,
    ) -> Result<Segment> {
        let (rank, world) = (env.rank, env.world_size);
        // SAFETY: the file is private to this run; every rank maps the length rank 0 gave it.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| shm_err(path, e))?;
        if map.len() <= header {
            return Err(shm_err(path, format!("size {} is too small", map.len())));
        }
        if rank == 0 {
            map[..8].copy_from_slice(&MAGIC.to_le_bytes());
            store.set(&format!("{key}/ready"), path.to_string_lossy().as_bytes())?;
        } else if map[..8] != MAGIC.to_le_bytes() {
            return Err(shm_err(path, "not a segment of this run (bad magic)"));
        }
        let mut seg = Segment {
            map,
            header,
            rank,
            world,
            timeout,
            pids: vec![0; world],
            epoch: 0,
        };
        seg.line(rank, 1)
            .store(std::process::id() as u64, Ordering::Release);
        store.barrier(&format!("{key}/mapped"), world, timeout)?;
        for r in 0..world {
            seg.pids[r] = seg.line(r, 1).load(Ordering::Acquire) as i32;
        }
        Ok(seg)
    }

    /// First word of a rank's line that `publish` / `peer_word` may use (0 and 1 are the barrier's).
    pub const FREE_WORD: usize = 2;
    /// Words per line.
    pub const WORDS: usize = LINE / 8;

    /// Stores `value` in word `word` (FREE_WORD..WORDS) of this rank's line. Peers see it after the
    /// next barrier (the barrier's epoch store is a release, its loads acquire).
    pub fn publish(&self, word: usize, value: u64) {
        assert!(
            (Self::FREE_WORD..Self::WORDS).contains(&word),
            "word {word}"
        );
        self.line(self.rank, word).store(value, Ordering::Relaxed);
    }

    /// Word `word` of rank `r`'s line, as published before the last barrier.
    pub fn peer_word(&self, r: usize, word: usize) -> u64 {
        assert!(
            (Self::FREE_WORD..Self::WORDS).contains(&word),
            "word {word}"
        );
        self.line(r, word).load(Ordering::Relaxed)
    }

    /// Rank `r`'s process id (as it published it when the segment was opened).
    pub fn pid(&self, r: usize) -> i32 {
        self.pids[r]
    }

    /// Word `word` of rank `r`'s header line (0: barrier epoch, 1: pid).
    fn line(&self, r: usize, word: usize) -> &AtomicU64 {
        let off = LINE * (1 + r) + 8 * word;
        // SAFETY: in bounds of the header, 8-aligned (the map is page-aligned); shared with peers.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    /// Bytes in the data area.
    pub fn data_len(&self) -> usize {
        self.map.len() - self.header
    }

    /// Pointer to `offset` in the data area.
    pub fn data(&self, offset: usize) -> *mut u8 {
        // SAFETY: callers stay within the data area they sized the segment for.
        unsafe { self.map.as_ptr().add(self.header + offset) as *mut u8 }
    }

    /// Waits until every rank has reached this barrier. Checks peers' pids while waiting, so a
    /// dead rank is reported within about 100 ms, and gives up after the timeout.
    ///
    /// Waiting spins briefly, then sleeps in the kernel on the slow rank's epoch word (a futex on
    /// the shared mapping; arriving ranks wake it): on a busy machine a spinning rank would burn
    /// the CPU time its peer needs to arrive.
    pub fn barrier(&mut self, op: &str) -> Result<()> {
        self.epoch += 1;
        let target = self.epoch;
        self.line(self.rank, 0).store(target, Ordering::Release);
        futex_wake(self.line(self.rank, 0));
        let started = Instant::now();
        let mut last_check = started;
        let mut spins = 0u32;
        loop {
            let behind: Vec<usize> = (0..self.world)
                .filter(|&r| self.line(r, 0).load(Ordering::Acquire) < target)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                let word = self.line(behind[0], 0);
                let seen = word.load(Ordering::Acquire);
                if seen < target {
                    futex_wait(word, seen, Duration::from_millis(10));
                }
            }
            if last_check.elapsed() > Duration::from_millis(100) {
                last_check = Instant::now();
                for &r in &behind {
                    // (a zombie is gone too: the launcher reaps an exited rank only at the end
                    // of the attempt, so kill(pid, 0) would still find it)
                    if !super::cma::alive(self.pids[r]) {
                        return Err(DistError::PeerLost {
                            rank: r,
                            op: op.to_string(),
                            detail: format!("process {} exited", self.pids[r]),
                        });
                    }
                }
                if started.elapsed() > self.timeout {
                    return Err(DistError::Timeout {
                        op: op.to_string(),
                        secs: self.timeout.as_secs(),
                        ranks: behind,
                    });
                }
            }
        }
    }
}

/// The low 32 bits of a shared epoch word (little-endian: the first 4 bytes), as a futex.
fn futex_word(word: &AtomicU64) -> *const u32 {
    word as *const AtomicU64 as *const u32
}

/// Sleeps until `word` may have changed from `seen` (or `timeout`; spurious wakeups are fine).
fn futex_wait(word: &AtomicU64, seen: u64, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a shared (non-private) futex on an aligned word of the mapping; returns at once when
    // the word no longer holds `seen`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            futex_word(word),
            libc::FUTEX_WAIT,
            seen as u32,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every rank sleeping on `word`.
fn futex_wake(word: &AtomicU64) {
    // SAFETY: as in futex_wait.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            futex_word(word),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
