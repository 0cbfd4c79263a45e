//! The collective layer end to end: real ranks started by the real launcher, CPU backend.
//! `dist-selftest` checks every op x dtype x size against a locally computed reference and fails
//! on any difference; these tests add the cross-rank and cross-run comparisons and failure cases.
//! One host runs the shared memory transport with single-copy reads (`LLAVA_SCO_CPU_SHM_CMA=1`,
//! cross-memory attach) and with copies through the segment (`=0`, the fallback and reference):
//! both must give bitwise the same results, and the same as TCP.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A binary of this workspace next to the test executable (target/<profile>/).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

/// A fresh output folder for one run of the self-test.
fn scratch(tag: &str, world: usize, extra: &[&str]) -> PathBuf {
    let out = std::env::temp_dir().join(format!(
        "dist-test-{}-{tag}-{}-{}",
        std::process::id(),
        world,
        extra.join("_").replace(['-', '/'], "")
    ));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    out
}

/// `launcher LAUNCHER_ARGS -- dist-selftest --out OUT EXTRA`.
fn launch(launcher_args: &[&str], out: &Path, extra: &[&str]) -> Command {
    let mut cmd = common::launcher();
    // one libtorch thread per rank: the digests (sums) are then computed the same way every run
    cmd.env("OMP_NUM_THREADS", "1")
        .args(launcher_args)
        .args(["--grace-period", "10", "--"])
        .arg(bin("dist-selftest"))
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// One launcher, `world` ranks: the shared memory transport.
fn selftest(world: usize, extra: &[&str]) -> (Output, PathBuf) {
    selftest_env(world, extra, &[])
}

const CMA: &str = "LLAVA_SCO_CPU_SHM_CMA";

fn selftest_env(world: usize, extra: &[&str], env: &[(&str, &str)]) -> (Output, PathBuf) {
    // tests run in parallel: the env is part of the folder name
    let tag: String = std::iter::once("shm")
        .chain(env.iter().map(|(_, v)| *v))
        .collect::<Vec<_>>()
        .join("");
    let out = scratch(&tag, world, extra);
    let nproc = world.to_string();
    let output = launch(&["--standalone", "--nproc-per-node", &nproc], &out, extra)
        .envs(env.iter().copied())
        .output()
        .expect("run launcher");
    (output, out)
}

/// Two launchers on 127.0.0.1 as two nodes of `world / 2` ranks each: the TCP transport.
/// Returns node 0's and node 1's outputs.
fn selftest_two_nodes(world: usize, extra: &[&str]) -> ([Output; 2], PathBuf) {
    let out = scratch("tcp", world, extra);
    let port = common::free_port();
    let run_id = format!("dist-tcp-{}-{port}", std::process::id());
    let node = |rank: usize| {
        let mut args = common::two_node_args(rank, world / 2, port, &run_id);
        args.extend(["--rdzv-timeout".to_string(), "60".to_string()]);
        launch(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &out,
            extra,
        )
        .env(common::LOOPBACK_NODES_ENV.0, common::LOOPBACK_NODES_ENV.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run launcher")
    };
    let node0 = node(0);
    let node1 = node(1);
    let outputs = [node0, node1].map(|c| c.wait_with_output().expect("launcher output"));
    (outputs, out)
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

/// Checks a finished op-suite run: every rank got bitwise the same all_gather and all_reduce
/// outputs (reduce_scatter outputs differ per rank by design). Returns each rank's results.
fn check_ops(world: usize, outputs: &[Output], dir: PathBuf, backend: &str) -> Vec<String> {
    for output in outputs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "world {world}: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("on backend {backend} ")),
            "expected backend {backend}: {stdout}"
        );
    }
    let files: Vec<String> = (0..world)
        .map(|r| read(&dir, &format!("result-{r}.txt")))
        .collect();
    let shared = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("reduce_scatter"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for r in 1..world {
        assert_eq!(
            shared(&files[0]),
            shared(&files[r]),
            "rank {r} differs from rank 0"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    files
}

/// Runs the op suite at `world` on one host (shared memory) and checks it.
fn ops_at(world: usize, extra: &[&str]) -> Vec<String> {
    let (output, dir) = selftest(world, extra);
    check_ops(world, &[output], dir, "cpu")
}

/// Whether this host lets ranks read each other's memory (cross-memory attach): a container's
/// seccomp profile or Yama may refuse it, and then the group copies through the segment.
fn cma_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let (output, dir) = selftest_env(2, &["--mode", "transport"], &[(CMA, "auto")]);
        let _ = std::fs::remove_dir_all(dir);
        let works = String::from_utf8_lossy(&output.stdout)
            .matches("transport shm-cma\n")
            .count()
            == 2;
        if !works {
            eprintln!("SKIP (cross-memory attach refused on this host): the single-copy cases run the segment-copy path");
        }
        works
    })
}

/// `cma` as the tests ask for it, or "0" where single-copy reads are refused on this host.
fn cma_here(cma: &str) -> &str {
    if cma == "1" && !cma_works() {
        "0"
    } else {
        cma
    }
}

/// Runs the op suite at `world` on one host with `LLAVA_SCO_CPU_SHM_CMA=cma` (1: single-copy
/// reads, 0: copies through the segment) and `env`, checks it and that it took that path.
fn ops_shm(world: usize, extra: &[&str], cma: &str, env: &[(&str, &str)]) -> Vec<String> {
    let cma = cma_here(cma);
    let mut env = env.to_vec();
    env.push((CMA, cma));
    let (output, dir) = selftest_env(world, extra, &env);
    let transport = if cma == "0" { "shm-copy" } else { "shm-cma" };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.matches(&format!("transport {transport}\n")).count(),
        world,
        "every rank on {transport}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    check_ops(world, &[output], dir, "cpu")
}

/// Runs the op suite at `world` over two nodes (TCP) and checks it.
fn ops_two_nodes(world: usize, extra: &[&str]) -> Vec<String> {
    let (outputs, dir) = selftest_two_nodes(world, extra);
    check_ops(world, &outputs, dir, "tcp")
}

#[test]
fn ops_world_1() {
    ops_at(1, &[]);
}

#[test]
fn ops_world_2_deterministic_and_single_copy_matches_segment_copy() {
    let first = ops_shm(2, &[], "1", &[]);
    let second = ops_shm(2, &[], "1", &[]);
    assert_eq!(
        first, second,
        "two runs with the same inputs must agree bitwise"
    );
    let copy = ops_shm(2, &[], "0", &[]);
    assert_eq!(first, copy, "single-copy reads and segment copies differ");
}

#[test]
fn ops_world_3_with_16_mib_in_many_blocks_and_chunked_rounds() {
    // single-copy: reduction blocks of 4104 bytes (not a divisor of any size here: short last
    // blocks); segment copy: 1 MiB slots, 16 rounds per 16 MiB op alternating between two areas
    let blocks = ops_shm(
        3,
        &["--large"],
        "1",
        &[("LLAVA_SCO_CPU_SHM_CMA_BLOCK", "4104")],
    );
    let rounds = ops_shm(
        3,
        &["--large"],
        "0",
        &[("LLAVA_SCO_CPU_SHM_SLOT", "1048576")],
    );
    assert_eq!(
        blocks, rounds,
        "single-copy reads and segment copies differ"
    );
}

#[test]
fn ops_world_4_single_copy_matches_segment_copy() {
    // all_reduce pieces of unequal length (7 elements: 2, 2, 2, 1) and empty ones (1 element)
    let cma = ops_shm(4, &[], "1", &[]);
    let copy = ops_shm(4, &[], "0", &[]);
    assert_eq!(cma, copy, "single-copy reads and segment copies differ");
}

/// Rank 1 of 3 exits (`mode` death: between collectives; death-mid: during an all_reduce); the
/// launcher reports it and every survivor's error names it.
fn dead_peer(mode: &str, cma: &str) {
    // the asked-for path stays in the env (so in the folder name) where the host forces "0", so
    // the single-copy and segment-copy cases never share a folder
    let asked = ("LLAVA_SCO_TEST_ASKED_CMA", cma);
    let cma = cma_here(cma);
    let (output, dir) = selftest_env(
        3,
        &["--mode", mode, "--die-rank", "1"],
        &[(CMA, cma), asked],
    );
    assert_eq!(
        output.status.code(),
        Some(3),
        "the launcher reports the dead rank's exit code: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rank       : 1"), "{stderr}");
    for r in [0, 2] {
        // death-mid: a failed read of its memory (process gone) or the op's barriers notice it
        let err = read(&dir, &format!("error-{r}.txt"));
        assert!(
            err.contains("rank 1 stopped answering during all_reduce"),
            "rank {r}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dead_peer_is_an_error_naming_the_rank_on_every_survivor() {
    dead_peer("death", "1");
}

#[test]
fn dead_peer_segment_copy() {
    dead_peer("death", "0");
}

#[test]
fn peer_dying_mid_all_reduce_single_copy() {
    dead_peer("death-mid", "1");
}

#[test]
fn single_copy_refused_by_one_rank_falls_back_or_is_an_error_when_forced() {
    // every rank must take the same path, whichever rank refuses
    let deny = ("LLAVA_SCO_CPU_SHM_CMA_DENY_RANK", "1");
    let (output, dir) = selftest_env(3, &["--mode", "transport"], &[deny]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(
        stdout.matches("transport shm-copy\n").count(),
        3,
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let (output, dir) = selftest_env(3, &["--mode", "transport"], &[deny, (CMA, "1")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cross-memory attach (LLAVA_SCO_CPU_SHM_CMA=1) does not work here: rank 1"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let (output, dir) = selftest_env(2, &["--mode", "transport"], &[(CMA, "maybe")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("expected 0, 1 or auto"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn nccl_without_a_gpu_is_a_clear_error() {
    if tch::Cuda::is_available() {
        return; // covered by make gpu-check
    }
    let out = Command::new(bin("dist-selftest"))
        .args(["--backend", "nccl", "--out", "/tmp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backend nccl requested but"), "{stderr}");
}

#[test]
fn tcp_two_nodes_of_one_rank_match_shared_memory_bitwise() {
    // same seeded inputs, same rank-order reduction: the transports agree to the bit (and so TCP
    // is as deterministic across runs as the shm path, checked above)
    let tcp = ops_two_nodes(2, &["--large"]);
    let shm = ops_at(2, &["--large"]);
    assert_eq!(tcp, shm, "tcp and shm results differ");
}

#[test]
fn tcp_two_nodes_of_two_ranks() {
    ops_two_nodes(4, &[]);
}

#[test]
fn tcp_forced_on_one_host_world_3() {
    // an odd world: all_reduce pieces of unequal length
    let out = scratch("tcpforced", 3, &[]);
    let output = launch(&["--standalone", "--nproc-per-node", "3"], &out, &[])
        .env("LLAVA_SCO_CPU_TRANSPORT", "tcp")
        .output()
        .expect("run launcher");
    check_ops(3, &[output], out, "tcp");
}

#[test]
fn tcp_dead_peer_is_an_error_naming_the_rank_on_every_survivor() {
    let ([node0, node1], dir) = selftest_two_nodes(4, &["--mode", "death", "--die-rank", "1"]);
    assert_eq!(
        node0.status.code(),
        Some(3),
        "node 0 (rank 1's) reports the dead rank's exit code: {}",
        String::from_utf8_lossy(&node0.stderr)
    );
    assert!(
        !node1.status.success(),
        "node 1 must be stopped with the group"
    );
    for r in [0, 2, 3] {
        let err = read(&dir, &format!("error-{r}.txt"));
        assert!(
            err.contains("rank 1 stopped answering during all_reduce"),
            "rank {r}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Ranks that disagree on a collective's size (4097 against 4096 f32, or an empty tensor against
/// one element), its root, or on the collective itself (a barrier against an all_reduce) all get
/// an error, on every transport: none returns with wrong data or passes a barrier alone.
fn mismatch(mode: &str, transport: &str) {
    let out_err = |dir: &Path, world: usize| -> Vec<String> {
        (0..world)
            .map(|r| read(dir, &format!("error-{r}.txt")))
            .collect()
    };
    let errors = match transport {
        "tcp" => {
            let (_, dir) = selftest_two_nodes(2, &["--mode", mode]);
            out_err(&dir, 2)
        }
        cma => {
            let asked = ("LLAVA_SCO_TEST_ASKED_CMA", cma);
            let (_, dir) = selftest_env(2, &["--mode", mode], &[(CMA, cma_here(cma)), asked]);
            out_err(&dir, 2)
        }
    };
    for (r, e) in errors.iter().enumerate() {
        assert!(
            e != "no error" && !e.is_empty(),
            "{mode} over {transport}: rank {r} got no error"
        );
    }
}

#[test]
fn mismatched_sizes_are_errors_on_every_rank_segment_copy() {
    mismatch("mismatch", "0");
    mismatch("mismatch-empty", "0");
    mismatch("mismatch-root", "0");
    mismatch("mismatch-barrier", "0");
}

#[test]
fn mismatched_sizes_are_errors_on_every_rank_single_copy() {
    mismatch("mismatch", "1");
    mismatch("mismatch-empty", "1");
    mismatch("mismatch-root", "1");
    mismatch("mismatch-barrier", "1");
}

#[test]
fn mismatched_sizes_are_errors_on_every_rank_tcp() {
    mismatch("mismatch", "tcp");
    mismatch("mismatch-empty", "tcp");
    // the same bytes in another dtype (2048 f64 against 4096 f32): the message header says so
    mismatch("mismatch-dtype", "tcp");
    // every rank broadcasting from itself: each would only send (the header carries the root)
    mismatch("mismatch-root", "tcp");
    mismatch("mismatch-barrier", "tcp");
}

/// An all_gather whose input is the rank's own slot of the output (torch allows it) and a
/// reduce_scatter whose input and output shapes differ with the right counts, on every
/// transport and at world 1 (whose copy used to panic on the shapes).
#[test]
fn in_place_gather_and_reshaped_buffers_on_every_transport() {
    let ok = |what: &str, o: &Output, ranks: usize| {
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{what}: {stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            stdout.matches("in-place all_gather ok").count(),
            ranks,
            "{what}: {stdout}"
        );
    };
    let (single, _) = selftest(1, &["--mode", "inplace-gather"]);
    ok("world 1", &single, 1);
    for cma in ["0", "1"] {
        let asked = ("LLAVA_SCO_TEST_ASKED_CMA", cma);
        let (o, _) = selftest_env(
            2,
            &["--mode", "inplace-gather"],
            &[(CMA, cma_here(cma)), asked],
        );
        ok(&format!("cma={cma}"), &o, 2);
    }
    let ([node0, node1], _) = selftest_two_nodes(2, &["--mode", "inplace-gather"]);
    ok("tcp node 0", &node0, 1);
    ok("tcp node 1", &node1, 1);
}

/// A collective's Work dropped without wait() (an error unwinding past a prefetch) waits for
/// the collective: its tensor holds the result right after, on every transport.
#[test]
fn a_dropped_work_completes_on_every_transport() {
    for cma in ["0", "1"] {
        let asked = ("LLAVA_SCO_TEST_ASKED_CMA", cma);
        let (output, dir) = selftest_env(
            2,
            &["--mode", "drop-unwaited"],
            &[(CMA, cma_here(cma)), asked],
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "cma={cma}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            stdout.matches("dropped work completed").count(),
            2,
            "{stdout}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    let ([node0, node1], _) = selftest_two_nodes(2, &["--mode", "drop-unwaited"]);
    for (n, o) in [node0, node1].iter().enumerate() {
        assert!(
            o.status.success(),
            "tcp node {n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Ranks in time zones 26 hours apart (POSIX TZ strings: no tzdata needed; always on different
/// dates) render rank 0's date in the chat template once they agreed on it: a text-only record
/// tokenizes the same on every rank, and so does the epoch plan sorted by its lengths.
#[test]
fn ranks_in_other_time_zones_render_rank_0s_date() {
    let out = scratch("tz", 2, &["template-clock"]);
    let output = common::launcher()
        .env("OMP_NUM_THREADS", "1")
        .args(["--standalone", "--nproc-per-node", "2", "--", "sh", "-c"])
        .arg(r#"if [ "$RANK" = 0 ]; then export TZ=AAA-14; else export TZ=BBB+12; fi; exec "$0" "$@""#)
        .arg(bin("dist-selftest"))
        .args(["--mode", "template-clock", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read = |r: usize| std::fs::read_to_string(out.join(format!("clock-{r}.txt"))).unwrap();
    let (zero, one) = (read(0), read(1));
    let (own0, agreed0) = zero.split_once('|').unwrap();
    let (own1, agreed1) = one.split_once('|').unwrap();
    assert_ne!(own0, own1, "the zones render other dates on their own");
    assert_eq!(agreed0, own0);
    assert_eq!(agreed1, own0, "rank 1 renders rank 0's date");
}

/// The lines of the ranks' `group ops correct` reports in launcher outputs.
fn group_reports(outputs: &[&Output]) -> Vec<String> {
    let mut lines: Vec<String> = outputs
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("group ops correct"))
                .map(|l| l.split("dist-selftest: ").last().unwrap_or(l).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn sub_groups_on_one_host_run_every_op_over_their_members_only() {
    let (output, dir) = selftest(4, &["--mode", "groups"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let reports = group_reports(&[&output]);
    assert_eq!(reports.len(), 4, "{reports:?}\n{stderr}");
    for (rank, line) in reports.iter().enumerate() {
        // group ranks: halves [0, 1] [2, 3], strides [0, 2] [1, 3]
        assert!(line.starts_with(&format!("rank {rank}:")), "{line}");
        assert!(
            line.contains(&format!("({}), strides shm-", rank % 2)),
            "{line}"
        );
        assert!(line.contains(&format!("({})", rank / 2)), "{line}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sub_groups_across_two_nodes_take_tcp_and_within_one_shared_memory() {
    let ([node0, node1], dir) = selftest_two_nodes(4, &["--mode", "groups"]);
    for o in [&node0, &node1] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let reports = group_reports(&[&node0, &node1]);
    assert_eq!(reports.len(), 4, "{reports:?}");
    for line in &reports {
        // a half is one node's ranks, a stride spans both nodes
        assert!(
            line.contains("halves shm-") && line.contains("strides tcp"),
            "{line}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_dead_peer_in_a_sub_group_is_named_by_its_global_rank() {
    let (output, dir) = selftest(4, &["--mode", "group-death", "--die-rank", "2"]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // rank 0 shares the stride group [0, 2] with the dead rank (its group rank 1)
    let err = read(&dir, "error-0.txt");
    assert!(
        err.contains(
            "rank 2 stopped answering during all_reduce in group stride-0 of global ranks [0, 2]"
        ),
        "{err}"
    );
    // [1, 3] lost no one
    for r in [1, 3] {
        assert_eq!(
            read(&dir, &format!("error-{r}.txt")),
            "no error",
            "rank {r}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn new_group_refuses_ranks_outside_the_group_and_odd_names() {
    use trainer::dist::{Backend, ProcessGroup, ReduceOp};
    // world 1 (no launcher): the one rank is rank 0
    let pg = ProcessGroup::from_env(Backend::Cpu, std::time::Duration::from_secs(5)).unwrap();
    let solo = pg.new_group(&[0], "solo").unwrap();
    assert_eq!((solo.rank(), solo.world_size()), (0, 1));
    let t = tch::Tensor::from_slice(&[2.0f32]);
    solo.all_reduce(&t, ReduceOp::Sum).unwrap();
    assert_eq!(t.double_value(&[0]), 2.0);
    for (ranks, name, says) in [
        (
            &[][..],
            "none",
            "must be ascending ranks of this group ([0])",
        ),
        (
            &[0, 1][..],
            "two",
            "must be ascending ranks of this group ([0])",
        ),
        (&[0, 0][..], "twice", "must be ascending"),
        (&[0][..], "a b", "letters, digits and '-'"),
        (&[0][..], "", "letters, digits and '-'"),
    ] {
        let err = pg.new_group(ranks, name).err().expect(name).to_string();
        assert!(err.contains(says), "{name}: {err}");
    }
}
