//! The collective layer end to end: real ranks started by the real launcher, CPU backend.
//! `dist-selftest` checks every op x dtype x size against a locally computed reference and fails
//! on any difference; these tests add the cross-rank and cross-run comparisons and failure cases.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

fn selftest(world: usize, extra: &[&str]) -> (Output, PathBuf) {
    let out = std::env::temp_dir().join(format!(
        "dist-test-{}-{}-{}",
        std::process::id(),
        world,
        extra.join("_").replace(['-', '/'], "")
    ));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let output = Command::new(bin("launcher"))
        .args([
            "--standalone",
            "--nproc-per-node",
            &world.to_string(),
            "--grace-period",
            "10",
            "--",
        ])
        .arg(bin("dist-selftest"))
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .expect("run launcher");
    (output, out)
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

/// Runs the op suite at `world` and checks that every rank got bitwise the same all_gather and
/// all_reduce outputs (reduce_scatter outputs differ per rank by design).
fn ops_at(world: usize, extra: &[&str]) -> Vec<String> {
    let (output, dir) = selftest(world, extra);
    assert!(
        output.status.success(),
        "world {world}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
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
    ops_at(3, &["--large"]);
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
