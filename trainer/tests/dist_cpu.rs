//! The collective layer end to end: real ranks started by the real launcher, CPU backend.
//! `dist-selftest` checks every op x dtype x size against a locally computed reference and fails
//! on any difference; these tests add the cross-rank and cross-run comparisons and failure cases.
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
    let mut cmd = Command::new(bin("launcher"));
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

fn selftest_env(world: usize, extra: &[&str], env: &[(&str, &str)]) -> (Output, PathBuf) {
    let out = scratch("shm", world, extra);
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let nproc = (world / 2).to_string();
    let run_id = format!("dist-tcp-{}-{port}", std::process::id());
    let node = |rank: &str| {
        launch(
            &[
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--nproc-per-node",
                &nproc,
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
                "--run-id",
                &run_id,
                "--rdzv-timeout",
                "60",
            ],
            &out,
            extra,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run launcher")
    };
    let node0 = node("0");
    let node1 = node("1");
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
fn ops_world_2_and_deterministic_across_runs() {
    let first = ops_at(2, &[]);
    let second = ops_at(2, &[]);
    assert_eq!(
        first, second,
        "two runs with the same inputs must agree bitwise"
    );
}

#[test]
fn ops_world_3_with_16_mib_chunked_rounds() {
    // 1 MiB slots: 16 rounds per 16 MiB op, alternating between the segment's two areas
    let (output, dir) = selftest_env(3, &["--large"], &[("LLAVA_SCO_CPU_SHM_SLOT", "1048576")]);
    check_ops(3, &[output], dir, "cpu");
}

#[test]
fn ops_world_4() {
    ops_at(4, &[]);
}

#[test]
fn dead_peer_is_an_error_naming_the_rank_on_every_survivor() {
    let (output, dir) = selftest(3, &["--mode", "death", "--die-rank", "1"]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "the launcher reports the dead rank's exit code"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rank       : 1"), "{stderr}");
    for r in [0, 2] {
        let err = read(&dir, &format!("error-{r}.txt"));
        assert!(
            err.contains("rank 1 stopped answering during all_reduce"),
            "rank {r}: {err}"
        );
    }
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
