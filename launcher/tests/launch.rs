//! End-to-end tests of the `launcher` binary with real processes (`launcher-testrank` ranks).
//! Each test uses its own scratch folder and free ports, so they run in parallel.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn every_rank_gets_torchruns_environment_for_world_1_to_4() {
    let cores = std::thread::available_parallelism().unwrap().get();
    for n in 1..=4usize {
        let dir = Scratch::new("env");
        let port = free_port();
        let nproc = n.to_string();
        // World 3 uses a fixed --master-port, the others --standalone (a free port); world 3
        // also torchrun's --role, --rdzv-conf and --start-method
        let args: Vec<&str> = if n == 3 {
            vec![
                "--nproc-per-node",
                &nproc,
                "--run-id",
                "envtest",
                "--master-port",
                "PORT",
                "--role",
                "trainer",
                "--rdzv-conf",
                "join_timeout=60,read_timeout=5",
                "--start-method",
                "spawn",
            ]
        } else {
            vec![
                "--standalone",
                "--nproc-per-node",
                &nproc,
                "--run-id",
                "envtest",
            ]
        };
        let port_s = port.to_string();
        let args: Vec<&str> = args
            .into_iter()
            .map(|a| if a == "PORT" { port_s.as_str() } else { a })
            .collect();
        let run = run(launch_testrank(&args, dir.path(), &[]), LIMIT);
        assert_eq!(run.code(), 0, "world {n}: {}", run.stderr);
        let first = read_env(dir.path(), 0, 0);
        let token = first["LLAVA_SCO_STORE_TOKEN"].clone();
        assert_eq!(token.len(), 32, "token should be 16 random bytes in hex");
        let master_port: u16 = first["MASTER_PORT"].parse().unwrap();
        assert_ne!(master_port, 0);
        if n == 3 {
            assert_eq!(master_port, port);
        }
        let mut groups = vec![run.pgid];
        for rank in 0..n {
            let env = read_env(dir.path(), rank, 0);
            let r = rank.to_string();
            let expect = [
                ("RANK", r.as_str()),
                ("LOCAL_RANK", &r),
                ("WORLD_SIZE", &nproc),
                ("LOCAL_WORLD_SIZE", &nproc),
                ("GROUP_RANK", "0"),
                ("GROUP_WORLD_SIZE", "1"),
                ("ROLE_RANK", &r),
                ("ROLE_WORLD_SIZE", &nproc),
                ("ROLE_NAME", if n == 3 { "trainer" } else { "default" }),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &master_port.to_string()),
                ("TORCHELASTIC_RESTART_COUNT", "0"),
                ("TORCHELASTIC_MAX_RESTARTS", "0"),
                ("TORCHELASTIC_RUN_ID", "envtest"),
                ("LLAVA_SCO_STORE_TOKEN", &token),
                ("OMP_NUM_THREADS", &(cores / n).max(1).to_string()),
                ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
                ("PYTHONUNBUFFERED", "1"),
            ];
            for (var, value) in expect {
                assert_eq!(env[var], value, "world {n} rank {rank}: {var}");
            }
            groups.push(env["PGID"].parse().unwrap());
        }
        assert!(
            run.stderr.contains("OMP_NUM_THREADS is not set"),
            "{}",
            run.stderr
        );
        assert_no_survivors(&groups);
    }
}

#[test]
fn ranks_meet_through_the_store() {
    let dir = Scratch::new("store");
    let run = run(
        launch_testrank(
            &["--standalone", "--nproc-per-node", "4"],
            dir.path(),
            &["--store"],
        ),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    for rank in 0..4 {
        let total = std::fs::read_to_string(dir.path().join(format!("store-{rank}-0"))).unwrap();
        assert_eq!(total, "4", "rank {rank} saw the counter after the barrier");
    }
}

/// Port 0 on one node (torchrun's `--rdzv-backend c10d --rdzv-endpoint localhost:0`, what its
/// --standalone passes): a free port, which the ranks meet at; on several nodes: refused.
#[test]
fn port_0_on_one_node_is_a_free_port() {
    let dir = Scratch::new("port-0");
    let flags = [
        "--nnodes=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--nproc-per-node",
        "2",
    ];
    let one = run(launch_testrank(&flags, dir.path(), &["--store"]), LIMIT);
    assert_eq!(one.code(), 0, "{}", one.stderr);
    for rank in 0..2 {
        let total = std::fs::read_to_string(dir.path().join(format!("store-{rank}-0"))).unwrap();
        assert_eq!(total, "2", "rank {rank} saw the counter after the barrier");
    }
    let args = [
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--master-port",
        "0",
        "--",
        "true",
    ];
    let two = run(launcher(&args), LIMIT);
    assert_eq!(two.code(), 1, "{}", two.stderr);
    assert!(
        two.stderr
            .contains("port 0 (--master-port or --rdzv-endpoint) is picked freely by node 0"),
        "{}",
        two.stderr
    );
}

/// --rdzv-endpoint beside --master-addr/--master-port is used, the master flags ignored with a
/// warning (torchrun's rule); under --standalone all three are ignored with its warning.
#[test]
fn rdzv_endpoint_wins_over_the_master_flags() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let run_with = |extra: &[&str]| {
        let mut args = vec!["--nproc-per-node", "1", "--master-port", "1"];
        args.extend(extra);
        args.extend(["--", "true"]);
        run(launcher(&args), LIMIT)
    };
    let both = run_with(&["--rdzv-endpoint", &endpoint]);
    assert_eq!(both.code(), 0, "{}", both.stderr);
    let want =
        format!("--rdzv-endpoint {endpoint} is used; --master-addr/--master-port are ignored");
    assert!(both.stderr.contains(&want), "{}", both.stderr);
    let standalone = run_with(&["--standalone", "--rdzv-endpoint", "nowhere:1"]);
    assert_eq!(standalone.code(), 0, "{}", standalone.stderr);
    assert!(
        standalone
            .stderr
            .contains("--master-addr, --master-port and --rdzv-endpoint are ignored"),
        "{}",
        standalone.stderr
    );
}

#[test]
fn two_launchers_form_one_world_of_four() {
    let dir = Scratch::new("twonodes");
    let (run0, run1, port) = two_nodes(dir.path(), "two-nodes", &[], &["--store"], true);
    assert_eq!(run0.code(), 0, "node 0: {}", run0.stderr);
    assert_eq!(run1.code(), 0, "node 1: {}", run1.stderr);
    let mut groups = vec![run0.pgid, run1.pgid];
    for rank in 0..4usize {
        let env = read_env(dir.path(), rank, 0);
        let (node, local) = (rank / 2, rank % 2);
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["LOCAL_RANK"], local.to_string());
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["GROUP_RANK"], node.to_string());
        assert_eq!(env["GROUP_WORLD_SIZE"], "2");
        assert_eq!(env["ROLE_RANK"], rank.to_string());
        assert_eq!(env["ROLE_WORLD_SIZE"], "4");
        assert_eq!(env["MASTER_PORT"], port);
        assert_eq!(env["TORCHELASTIC_RUN_ID"], "two-nodes");
        let total = std::fs::read_to_string(dir.path().join(format!("store-{rank}-0"))).unwrap();
        assert_eq!(total, "4", "rank {rank}: all four ranks used one store");
        groups.push(env["PGID"].parse().unwrap());
    }
    assert_no_survivors(&groups);
}

/// Two nodes of one rank each (sleeping 120 s); once both run, node `killed`'s launcher is
/// SIGKILLed (no word to the other): the other node's run.
fn one_of_two_nodes_killed(name: &str, killed: usize) -> Run {
    let dir = Scratch::new(name);
    let port = free_port().to_string();
    let node = |rank| {
        let (extra, rank_args) = (["--grace-period", "2"], ["--sleep", "120"]);
        spawn_node(dir.path(), &port, name, ("2", rank), &extra, &rank_args)
    };
    let started = Instant::now();
    let mut nodes = [node("0"), node("1")];
    wait_for_file(&dir.path().join("env-1-0"), LIMIT);
    nodes[killed].kill().unwrap();
    nodes[killed].wait().unwrap();
    let [node0, node1] = nodes;
    let survivor = if killed == 0 { node1 } else { node0 };
    wait(survivor, started, Duration::from_secs(90))
}

/// A node whose launcher dies (SIGKILL: no word to the others) is found by node 0 after the
/// heartbeat timeout (30 s); the summary names that node, and node 0 does not then wait for it to
/// acknowledge the end (it waited 10 s more for the lost node).
#[test]
fn a_lost_node_is_named_and_not_waited_for() {
    let run0 = one_of_two_nodes_killed("lost-node", 1);
    assert_ne!(run0.code(), 0, "{}", run0.stderr);
    assert!(
        run0.stderr
            .contains(") it stopped sending heartbeats for 30 s"),
        "{}",
        run0.stderr
    );
    assert!(run0.stderr.contains("node       : 1\n"), "{}", run0.stderr);
    assert!(
        !run0.stderr.contains("not every node acknowledged the end"),
        "{}",
        run0.stderr
    );
}

/// A node whose launcher dies in a rendezvous still open (node 2 not there yet) is started
/// again with the same flags: the new launcher takes the node rank its dead predecessor
/// registered (it was refused as "already taken", and that ended the run for the other nodes).
#[test]
fn a_node_started_again_takes_its_place_in_an_open_rendezvous() {
    let dir = Scratch::new("rejoin-rdzv");
    let port = free_port().to_string();
    let node = |rank| spawn_node(dir.path(), &port, "rejoin-rdzv", ("3", rank), &[], &[]);
    let started = Instant::now();
    let (node0, mut node1) = (node("0"), node("1"));
    // (registered in a few ms; nothing of node 1 runs until node 2 joins)
    std::thread::sleep(Duration::from_millis(1500));
    node1.kill().unwrap();
    node1.wait().unwrap();
    let node1 = node("1");
    std::thread::sleep(Duration::from_millis(500));
    let node2 = node("2");
    let runs = [node0, node1, node2].map(|n| wait(n, started, LIMIT));
    for (rank, run) in runs.iter().enumerate() {
        assert_eq!(run.code(), 0, "node {rank}: {}", run.stderr);
        assert_eq!(read_env(dir.path(), rank, 0)["WORLD_SIZE"], "3");
    }
    assert!(
        runs[1]
            .stderr
            .contains("node rank 1's earlier launcher (pid ")
            && runs[1]
                .stderr
                .contains("is gone: this launcher takes its place in the rendezvous of attempt 0"),
        "{}",
        runs[1].stderr
    );
}

/// A node whose launcher dies while its attempt runs, started again at once: node 0 finds the
/// node lost (heartbeat timeout, 30 s), the nodes restart (--max-restarts), and the new launcher
/// joins the restarted attempt, which succeeds. (A lost node ended the run whatever the
/// restarts left, and the launcher started again was refused.)
#[test]
fn a_lost_node_started_again_joins_the_restarted_run() {
    let dir = Scratch::new("rejoin-run");
    let port = free_port().to_string();
    let node = |rank| {
        let (extra, rank_args) = (
            ["--grace-period", "2", "--max-restarts", "1"],
            ["--sleep", "120", "--sleep-attempt", "0"],
        );
        spawn_node(
            dir.path(),
            &port,
            "rejoin-run",
            ("2", rank),
            &extra,
            &rank_args,
        )
    };
    let started = Instant::now();
    let (node0, mut node1) = (node("0"), node("1"));
    wait_for_file(&dir.path().join("env-1-0"), LIMIT);
    node1.kill().unwrap();
    node1.wait().unwrap();
    let node1 = node("1");
    let (run0, run1) = (
        wait(node0, started, Duration::from_secs(120)),
        wait(node1, started, Duration::from_secs(120)),
    );
    assert_eq!(run0.code(), 0, "node 0: {}", run0.stderr);
    assert_eq!(run1.code(), 0, "node 1: {}", run1.stderr);
    assert!(
        run0.stderr.contains(
            "attempt 1 waits up to --rdzv-timeout (60 s) for node 1: start its launcher again"
        ),
        "{}",
        run0.stderr
    );
    for rank in 0..2 {
        assert_eq!(
            read_env(dir.path(), rank, 1)["TORCHELASTIC_RESTART_COUNT"],
            "1"
        );
    }
}

/// Node 0's launcher dying while node 1, its ranks done, waits for node 0's: node 1 names node
/// 0 as the root cause and does not restart, restarts left or not (it named itself, a lost node
/// to wait for, and restarted into a store that was gone).
#[test]
fn node_0_lost_while_waiting_for_it_is_named_and_not_restarted() {
    let dir = Scratch::new("lost-node-0-done");
    let port = free_port().to_string();
    let node = |rank| {
        let extra = ["--grace-period", "2", "--max-restarts", "1"];
        let rank_args = ["--sleep", "120", "--sleep-rank", "0"];
        spawn_node(
            dir.path(),
            &port,
            "lost-node-0-done",
            ("2", rank),
            &extra,
            &rank_args,
        )
    };
    let started = Instant::now();
    let (mut node0, node1) = (node("0"), node("1"));
    wait_for_file(&dir.path().join("env-1-0"), LIMIT);
    std::thread::sleep(Duration::from_millis(500));
    node0.kill().unwrap();
    node0.wait().unwrap();
    let run1 = wait(node1, started, Duration::from_secs(90));
    assert_ne!(run1.code(), 0, "{}", run1.stderr);
    for says in [
        "lost contact with node 0",
        "node       : 0\n",
        "host       : 127.0.0.1",
    ] {
        assert!(run1.stderr.contains(says), "{says}: {}", run1.stderr);
    }
    assert!(
        !run1.stderr.contains("restarting every rank"),
        "{}",
        run1.stderr
    );
}

/// When node 0's launcher dies, the node that notices names node 0 (whose store it lost) as the
/// root cause, not itself.
#[test]
fn a_lost_node_0_is_named_by_the_node_that_notices() {
    let run1 = one_of_two_nodes_killed("lost-node-0", 0);
    assert_ne!(run1.code(), 0, "{}", run1.stderr);
    for says in [
        "lost contact with the other nodes",
        "node       : 0\n",
        "host       : 127.0.0.1",
    ] {
        assert!(run1.stderr.contains(says), "{says}: {}", run1.stderr);
    }
}

/// Rank output still in the pipes when the ranks exit reaches a console that reads slowly (`|
/// less`, a slow ssh) whole: the relays drain it however long the console takes (a 2 s limit
/// dropped what a console had not read by then).
#[test]
fn output_reaches_a_slow_console_whole() {
    let child = launcher(&["--standalone", "--", "sh", "-c", "seq 1 20000"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    // the console reads nothing for 4 s (the pipes hold ~130 KiB, seq writes 109 KiB and exits)
    std::thread::sleep(Duration::from_secs(4));
    let run = wait(child, started, LIMIT);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 20000, "{}", run.stderr);
}

/// A launcher whose stderr cannot be written (a full disk, `2>&1 | head` once head has gone)
/// still exits with the code it decided (eprint! panicked: 101).
#[test]
fn a_broken_stderr_keeps_the_exit_code() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    // (--standalone: a free port; the default 29500 clashed with other tests running at once)
    let mut cmd = launcher(&["--standalone", "--", "sh", "-c", "exit 3"]);
    cmd.stderr(full());
    assert_eq!(run(cmd, LIMIT).code(), 3);
    let mut cmd = launcher(&["--nproc-per-node", "x", "--", "true"]);
    cmd.stderr(full());
    assert_eq!(run(cmd, LIMIT).code(), 1);
    let mut cmd = launcher(&["--no-such-flag", "--", "true"]);
    cmd.stderr(full());
    assert_eq!(run(cmd, LIMIT).code(), 2);
}

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let dir = Scratch::new("exit7");
    let run = standalone(
        dir.path(),
        3,
        &["--grace-period", "2"],
        &[
            "--rank",
            "1",
            "--exit-code",
            "7",
            "--stderr",
            "boom: bad batch",
            "--sleep",
            "30",
            "--trap",
            "--child",
        ],
    );
    assert_eq!(run.code(), 7, "{}", run.stderr);
    assert!(
        run.elapsed < Duration::from_secs(8),
        "took {:?}",
        run.elapsed
    );
    assert!(
        run.stderr
            .contains("rank       : 1 (local rank 1 on node 0)"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("exit code 7"), "{}", run.stderr);
    assert!(run.stderr.contains("| boom: bad batch"), "{}", run.stderr);
    for rank in [0, 2] {
        let sig = std::fs::read_to_string(dir.path().join(format!("signal-{rank}-0"))).unwrap();
        assert_eq!(
            sig,
            libc::SIGTERM.to_string(),
            "rank {rank} was asked to stop with SIGTERM"
        );
    }
    assert_no_survivors_in(dir.path(), &[run.pgid]);
}

/// torchrun's error files: every rank gets TORCHELASTIC_ERROR_FILE; what the failing rank records
/// there is the summary's message and traceback. Without --log-dir the files live in a folder of
/// the launcher's own under TMPDIR, kept only when the summary names one.
#[test]
fn a_failing_ranks_error_file_is_in_the_summary() {
    let dir = Scratch::new("errfile");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let rank_args = [
        "--rank",
        "1",
        "--exit-code",
        "3",
        "--record-error",
        "ValueError: bad lr",
        "--stderr",
        "some log line",
    ];
    let mut cmd = launch_testrank(
        &["--standalone", "--nproc-per-node", "2", "--run-id", "ef"],
        dir.path(),
        &rank_args,
    );
    cmd.env("TMPDIR", &tmp);
    let failed = run(cmd, LIMIT);
    assert_eq!(failed.code(), 3, "{}", failed.stderr);
    let file = read_env(dir.path(), 1, 0)["TORCHELASTIC_ERROR_FILE"].clone();
    let name = Path::new(&file)
        .strip_prefix(&tmp)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("launcher-errors-") && name.ends_with("/ef/attempt_0/1/error.json"),
        "{name}"
    );
    assert!(Path::new(&file).is_file(), "kept: the summary names it");
    for expected in [
        "message    : ValueError: bad lr".to_string(),
        format!("error file : {file}"),
        "traceback (from the error file):\n      | Traceback (most recent call last):\n      | ValueError: bad lr".to_string(),
    ] {
        assert!(failed.stderr.contains(&expected), "{expected}\n{}", failed.stderr);
    }
    assert!(
        !failed.stderr.contains("| some log line"),
        "{}",
        failed.stderr
    );

    // a successful run leaves nothing under TMPDIR; --log-dir puts the files beside the logs
    let mut cmd = launch_testrank(
        &["--standalone", "--nproc-per-node", "2", "--run-id", "ok"],
        dir.path(),
        &[],
    );
    cmd.env("TMPDIR", &tmp);
    let ok = run(cmd, LIMIT);
    assert_eq!(ok.code(), 0, "{}", ok.stderr);
    let file = read_env(dir.path(), 0, 0)["TORCHELASTIC_ERROR_FILE"].clone();
    // (TMPDIR/launcher-errors-ID/ok/attempt_0/0/error.json)
    let root: std::path::PathBuf = Path::new(&file).ancestors().nth(4).unwrap().into();
    assert!(root.starts_with(&tmp) && root != tmp, "{file}");
    assert!(
        !root.exists(),
        "removed after a successful run: {}",
        root.display()
    );
    // a failed attempt's file is kept although the restart succeeded (its cause was only logged)
    let mut cmd = launch_testrank(
        &[
            "--standalone",
            "--nproc-per-node",
            "2",
            "--run-id",
            "rs",
            "--max-restarts",
            "1",
        ],
        dir.path(),
        &[
            "--rank",
            "1",
            "--attempt",
            "0",
            "--exit-code",
            "3",
            "--record-error",
            "flaky",
        ],
    );
    cmd.env("TMPDIR", &tmp);
    let restarted = run(cmd, LIMIT);
    assert_eq!(restarted.code(), 0, "{}", restarted.stderr);
    let first = read_env(dir.path(), 1, 0)["TORCHELASTIC_ERROR_FILE"].clone();
    assert!(first.ends_with("/rs/attempt_0/1/error.json"), "{first}");
    assert!(
        Path::new(&first).is_file(),
        "kept after the restart: {first}"
    );
    assert!(
        restarted
            .stderr
            .contains(&format!(": flaky (error file {first}); restarting")),
        "the restart names it: {}",
        restarted.stderr
    );
    let logs = dir.path().join("logs");
    let logs_s = logs.to_str().unwrap();
    let logged = run(
        launch_testrank(
            &[
                "--standalone",
                "--nproc-per-node",
                "2",
                "--run-id",
                "lg",
                "--log-dir",
                logs_s,
            ],
            dir.path(),
            &rank_args,
        ),
        LIMIT,
    );
    assert_eq!(logged.code(), 3, "{}", logged.stderr);
    let file = logs.join("lg/attempt_0/1/error.json");
    assert!(file.is_file());
    assert!(
        logged
            .stderr
            .contains(&format!("error file : {}", file.display())),
        "{}",
        logged.stderr
    );
}

/// The rank with the real error is the root cause, not a peer that only reported it and exited
/// first (the trainer's ranks agree on a check: rank 1's data file is missing, rank 0 says "the
/// data file is missing on another rank"). The messenger is listed under the other failures.
#[test]
fn the_rank_with_the_real_error_is_the_root_cause_not_its_messenger() {
    let dir = Scratch::new("messenger");
    let rank_args = messengers_of("1");
    let failed = run(
        launch_testrank(
            &["--standalone", "--nproc-per-node", "2", "--run-id", "ms"],
            dir.path(),
            &rank_args,
        ),
        LIMIT,
    );
    assert_eq!(failed.code(), 3, "{}", failed.stderr);
    for expected in [
        "rank       : 1 (local rank 1 on node 0)",
        "message    : data.train: cannot read the data file",
        "other failures:\n    rank 0 (local rank 0): exited with code 1: the data file is missing on another rank (rank 1's error says why)",
    ] {
        assert!(failed.stderr.contains(expected), "{expected}\n{}", failed.stderr);
    }
}

/// Test-rank arguments: `rank` fails 1.5 s late with a recorded error (exit 3), every other rank
/// exits 1 at once, saying in its error file that `rank` failed (a messenger).
fn messengers_of(rank: &str) -> [&str; 9] {
    [
        "--rank",
        rank,
        "--exit-code",
        "3",
        "--record-error",
        "data.train: cannot read the data file",
        "--messengers",
        "--fail-delay",
        "1.5",
    ]
}

/// Across nodes too: rank 3 on node 1 has the real error, the messengers on both nodes (ranks
/// 0-2) exit first, so node 0's report reaches the store first; both nodes name rank 3.
#[test]
fn across_nodes_the_rank_with_the_real_error_is_the_root_cause() {
    let dir = Scratch::new("messenger-nodes");
    let rank_args = messengers_of("3");
    let (run0, run1, _) = two_nodes(dir.path(), "msn", &[], &rank_args, false);
    for (node, run) in [(0, &run0), (1, &run1)] {
        for expected in [
            "rank       : 3 (local rank 1 on node 1)",
            "message    : data.train: cannot read the data file",
        ] {
            assert!(
                run.stderr.contains(expected),
                "node {node}: {expected}\n{}",
                run.stderr
            );
        }
    }
}

#[test]
fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = Scratch::new("grace");
    let mut cmd = launcher(&[
        "--standalone",
        "--nproc-per-node",
        "2",
        "--grace-period",
        "1",
        "--",
        "sh",
        "-c",
        // Rank 1 fails once rank 0 ignores SIGTERM (its pid file is written after the trap: a
        // SIGTERM before it would end rank 0 at once); rank 0 would sleep for a minute.
        r#"if [ "$RANK" = 1 ]; then echo $$ > "$0/pid-1"; while [ ! -e "$0/pid-0" ]; do sleep 0.05; done; exit 5; fi; trap '' TERM; echo $$ > "$0/pid-0"; sleep 60"#,
        dir.path().to_str().unwrap(),
    ]);
    cmd.env("PATH", std::env::var("PATH").unwrap());
    let run = run(cmd, LIMIT);
    assert_eq!(run.code(), 5, "{}", run.stderr);
    assert!(
        run.elapsed >= Duration::from_secs(1),
        "grace period honoured: {:?}",
        run.elapsed
    );
    assert!(
        run.elapsed < Duration::from_secs(6),
        "took {:?}",
        run.elapsed
    );
    assert!(run.stderr.contains("sending SIGKILL"), "{}", run.stderr);
    let groups: Vec<i32> = (0..2)
        .map(|r| {
            std::fs::read_to_string(dir.path().join(format!("pid-{r}")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert_no_survivors(&groups);
}

#[test]
fn a_killed_rank_restarts_the_group_when_restarts_are_left() {
    let dir = Scratch::new("restart");
    let run = standalone(
        dir.path(),
        3,
        &["--max-restarts", "1", "--grace-period", "2"],
        &[
            "--rank",
            "1",
            "--kill-self",
            "--attempt",
            "0",
            "--sleep",
            "1",
            "--trap",
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("restarting every rank (restart 1 of 1)"),
        "{}",
        run.stderr
    );
    // one launch id for the invocation: every rank, both attempts
    let launch_id = read_env(dir.path(), 0, 0)["LLAVA_SCO_LAUNCH_ID"].clone();
    assert_eq!(launch_id.len(), 16, "{launch_id:?}");
    for rank in 0..3 {
        let env = read_env(dir.path(), rank, 1);
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "1");
        assert_eq!(env["TORCHELASTIC_MAX_RESTARTS"], "1");
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["LLAVA_SCO_LAUNCH_ID"], launch_id);
    }
    assert_no_survivors_in(dir.path(), &[run.pgid]);
}

#[test]
fn a_killed_rank_fails_the_run_without_restarts() {
    let dir = Scratch::new("norestart");
    let run = standalone(
        dir.path(),
        2,
        &["--grace-period", "2"],
        &["--rank", "0", "--kill-self", "--sleep", "30", "--trap"],
    );
    assert_eq!(run.code(), 128 + libc::SIGKILL, "{}", run.stderr);
    assert!(run.stderr.contains("signal 9 (SIGKILL)"), "{}", run.stderr);
    assert!(!dir.path().join("env-0-1").exists(), "no second attempt");
    assert_no_survivors_in(dir.path(), &[run.pgid]);
}

/// Starts 3 sleeping ranks, waits until all run, sends `sig` to the launcher.
fn signal_launcher(sig: i32, name: &str) {
    let dir = Scratch::new(name);
    let started = Instant::now();
    let child = launch_testrank(
        &[
            "--standalone",
            "--nproc-per-node",
            "3",
            "--grace-period",
            "2",
        ],
        dir.path(),
        &["--sleep", "30", "--trap", "--child"],
    )
    .spawn()
    .unwrap();
    for rank in 0..3 {
        wait_for_file(&dir.path().join(format!("ready-{rank}-0")), LIMIT);
    }
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let run = wait(child, started, LIMIT);
    assert_eq!(run.code(), 128 + sig, "{}", run.stderr);
    for rank in 0..3 {
        let got = std::fs::read_to_string(dir.path().join(format!("signal-{rank}-0"))).unwrap();
        assert_eq!(
            got,
            sig.to_string(),
            "rank {rank} observed the launcher's signal"
        );
    }
    assert_no_survivors_in(dir.path(), &[run.pgid]);
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank_and_exits_143() {
    signal_launcher(libc::SIGTERM, "sigterm");
}

#[test]
fn sigint_sighup_and_sigquit_are_forwarded_too() {
    signal_launcher(libc::SIGINT, "sigint");
    signal_launcher(libc::SIGHUP, "sighup");
    signal_launcher(libc::SIGQUIT, "sigquit");
}

/// `nohup launcher ... &`: a SIGHUP the launcher was started ignoring stays ignored (a logout
/// must not stop the job); the ranks run to the end and the launcher exits 0.
#[test]
fn a_signal_ignored_at_start_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let dir = Scratch::new("nohup");
    let started = Instant::now();
    let mut cmd = launch_testrank(
        &["--standalone", "--nproc-per-node", "2"],
        dir.path(),
        &["--sleep", "2"],
    );
    // SAFETY: only async-signal-safe calls between fork and exec
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    for rank in 0..2 {
        wait_for_file(&dir.path().join(format!("ready-{rank}-0")), LIMIT);
    }
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let run = wait(child, started, LIMIT);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_no_survivors_in(dir.path(), &[run.pgid]);
}

#[test]
fn ranks_and_their_children_die_with_a_sigkilled_launcher() {
    let dir = Scratch::new("pdeathsig");
    let started = Instant::now();
    let child = launch_testrank(
        &["--standalone", "--nproc-per-node", "2"],
        dir.path(),
        &["--sleep", "30", "--child"],
    )
    .spawn()
    .unwrap();
    for rank in 0..2 {
        wait_for_file(&dir.path().join(format!("ready-{rank}-0")), LIMIT);
    }
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let run = wait(child, started, LIMIT);
    assert_eq!(run.signal, Some(libc::SIGKILL));
    assert_no_survivors_in(dir.path(), &[run.pgid]);
}

#[test]
fn a_rank_still_running_after_the_others_finished_times_out() {
    let dir = Scratch::new("finish");
    let run = standalone(
        dir.path(),
        2,
        &["--finish-timeout", "1", "--grace-period", "2"],
        &["--sleep", "30", "--sleep-rank", "0", "--trap"],
    );
    assert_eq!(run.code(), 124, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("still running 1 s after other ranks finished"),
        "{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(6),
        "took {:?}",
        run.elapsed
    );
}

#[test]
fn a_failure_on_one_node_stops_the_other_node() {
    let dir = Scratch::new("nodefail");
    let (run0, run1, _) = two_nodes(
        dir.path(),
        "nodefail",
        &["--grace-period", "2"],
        &[
            "--rank",
            "3",
            "--exit-code",
            "7",
            "--stderr",
            "rank three broke",
            "--sleep",
            "30",
            "--trap",
        ],
        false,
    );
    assert_eq!(run1.code(), 7, "node 1: {}", run1.stderr);
    assert_eq!(
        run0.code(),
        7,
        "node 0 reports the root cause's code: {}",
        run0.stderr
    );
    assert!(
        run0.stderr
            .contains("rank       : 3 (local rank 1 on node 1)"),
        "{}",
        run0.stderr
    );
    assert!(
        run0.stderr.contains("| rank three broke"),
        "{}",
        run0.stderr
    );
    for rank in [0, 1, 2] {
        let sig = std::fs::read_to_string(dir.path().join(format!("signal-{rank}-0"))).unwrap();
        assert_eq!(sig, libc::SIGTERM.to_string(), "rank {rank}");
    }
    assert_no_survivors_in(dir.path(), &[run0.pgid, run1.pgid]);
}

#[test]
fn log_dir_keeps_per_attempt_per_rank_files_and_tee_prefixes() {
    let dir = Scratch::new("logs");
    let logs = dir.path().join("logs");
    // (rank 1 fails only once rank 0 has written its lines: else the launcher's SIGTERM may end
    // rank 0 before it writes; the marker is per launcher, $PPID)
    let script = r#"echo "out of $RANK"; echo "err of $RANK" >&2; if [ "$RANK" = 1 ]; then while [ ! -e "$0/r0-$PPID" ]; do sleep 0.02; done; exit 3; fi; touch "$0/r0-$PPID"; exit 0"#;
    let marker_dir = dir.path().to_str().unwrap().to_string();
    // the script on 2 ranks with the log folder given as `log_flag` and the `options`
    let run_with = |log_flag: &str, options: &[&str]| {
        let mut args = vec!["--standalone", "--nproc-per-node", "2", log_flag];
        args.push(logs.to_str().unwrap());
        args.extend_from_slice(options);
        args.extend_from_slice(&["--", "sh", "-c", script, &marker_dir]);
        run(launcher(&args), LIMIT)
    };
    let run_logged = || run_with("--log-dir", &["--run-id", "logged"]);
    let run1 = run_logged();
    assert_eq!(run1.code(), 3, "{}", run1.stderr);
    let attempt = logs.join("logged").join("attempt_0");
    for rank in 0..2 {
        let out =
            std::fs::read_to_string(attempt.join(rank.to_string()).join("stdout.log")).unwrap();
        let err =
            std::fs::read_to_string(attempt.join(rank.to_string()).join("stderr.log")).unwrap();
        assert_eq!(out, format!("out of {rank}\n"));
        assert_eq!(err, format!("err of {rank}\n"));
    }
    assert!(
        !run1.stdout.contains("out of"),
        "without --tee the console stays quiet: {}",
        run1.stdout
    );
    let log_line = format!(
        "stderr log : {}",
        attempt.join("1").join("stderr.log").display()
    );
    assert!(run1.stderr.contains(&log_line), "{}", run1.stderr);

    let run2 = run_with("--log_dir", &["--tee", "--local-ranks-filter", "1"]);
    assert_eq!(run2.code(), 3);
    assert!(run2.stdout.contains("[rank 1] out of 1"), "{}", run2.stdout);
    assert!(
        !run2.stdout.contains("out of 0"),
        "filtered: {}",
        run2.stdout
    );
    assert!(run2.stderr.contains("[rank 1] err of 1"), "{}", run2.stderr);
    // torchrun's spellings: `--tee 1` (a separate value) and `-t2` (attached)
    for (tee, shown, not_shown) in [
        (&["--tee", "1"][..], "[rank 0] out of 0", "] err of"),
        (&["-t2"][..], "[rank 0] err of 0", "] out of"),
    ] {
        let r = run_with("--log-dir", tee);
        assert_eq!(r.code(), 3, "{tee:?}: {}", r.stderr);
        let console = format!("{}{}", r.stdout, r.stderr);
        assert!(console.contains(shown), "{tee:?}: {console}");
        assert!(!console.contains(not_shown), "{tee:?}: {console}");
    }

    // torchrun's -r 2: stderr to the files only, stdout to the console too (and to its file)
    let run_r = run_with("--log-dir", &["-r", "2"]);
    assert_eq!(run_r.code(), 3, "{}", run_r.stderr);
    assert!(
        run_r.stdout.contains("[rank 0] out of 0"),
        "{}",
        run_r.stdout
    );
    // (the failure report still quotes the failed rank's last stderr lines)
    assert!(!run_r.stderr.contains("] err of"), "{}", run_r.stderr);
    let bad = run(
        launcher(&["--standalone", "--redirects", "0:1,1:2", "--", "true"]),
        LIMIT,
    );
    assert_eq!(bad.code(), 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("per-rank maps"), "{}", bad.stderr);

    // the same run id again (a requeued job): the logs grow, the first run's lines stay
    let run3 = run_logged();
    assert_eq!(run3.code(), 3, "{}", run3.stderr);
    let out = std::fs::read_to_string(attempt.join("0").join("stdout.log")).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!((lines[0], lines[2]), ("out of 0", "out of 0"), "{out}");
    assert!(
        lines[1].starts_with("==== launcher: rank 0 started again"),
        "{out}"
    );
}

#[test]
fn config_mode_runs_trainer_train_with_overrides() {
    let dir = Scratch::new("config");
    let config = dir.path().join("run.yaml");
    std::fs::write(&config, "train: {}\n").unwrap();
    let trainer = dir.path().join("fake-trainer");
    std::fs::write(
        &trainer,
        "#!/bin/sh\necho \"$RANK $*\" > \"$(dirname \"$0\")/args-$RANK\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &trainer,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let run = run(
        launcher(&[
            "--standalone",
            "--nproc_per_node",
            "2",
            "--trainer",
            trainer.to_str().unwrap(),
            config.to_str().unwrap(),
            "--set",
            "train.lr=2e-5",
            "--set",
            "train.max_steps=3",
        ]),
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    for rank in 0..2 {
        let args = std::fs::read_to_string(dir.path().join(format!("args-{rank}"))).unwrap();
        assert_eq!(
            args.trim(),
            format!(
                "{rank} train {} --set train.lr=2e-5 --set train.max_steps=3",
                config.display()
            )
        );
    }
}

/// A launcher stopped while `trainer config check` runs (a job cancelled right after it started)
/// takes the check with it: nothing of the job is left running.
#[test]
fn a_launcher_stopped_during_the_config_check_leaves_nothing_running() {
    let dir = Scratch::new("config-check-stopped");
    let config = dir.path().join("run.yaml");
    std::fs::write(&config, "train: {}\n").unwrap();
    let trainer = dir.path().join("slow-trainer");
    let pid_file = dir.path().join("check.pid");
    std::fs::write(
        &trainer,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 30\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &trainer,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut child = launcher(&[
        "--standalone",
        "--nproc-per-node",
        "1",
        "--trainer",
        trainer.to_str().unwrap(),
        config.to_str().unwrap(),
    ])
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let started = std::time::Instant::now();
    let pid = loop {
        match std::fs::read_to_string(&pid_file).map(|t| t.trim().parse::<i32>()) {
            Ok(Ok(pid)) => break pid,
            _ if started.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(20)),
            _ => panic!("the config check never started"),
        }
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let gone = |pid: i32| unsafe { libc::kill(pid, 0) } != 0;
    let waited = std::time::Instant::now();
    while !gone(pid) && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gone(pid),
        "the config check (pid {pid}) outlived the launcher"
    );
}

#[test]
fn setup_errors_are_one_clear_line() {
    let dir = Scratch::new("errors");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let missing_cfg = dir.path().join("missing.yaml");
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let a_file_arg = a_file.to_str().unwrap();
    let free = free_port().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--master-port", &busy_port, "--", "true"],
            "already in use",
        ),
        // (node 1 of a store port where something else listens and never answers)
        (
            vec![
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &busy_port,
                "--run-id",
                "x",
                "--rdzv-timeout",
                "3",
                "--",
                "true",
            ],
            "is another program listening on that port, not a launcher's store?",
        ),
        (
            vec!["--nproc-per-node", "-1", "--", "true"],
            "--nproc-per-node \"-1\": give a number",
        ),
        (
            vec!["--log-dir", a_file_arg, "--", "true"],
            "is a file, not a folder",
        ),
        (
            vec![
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--run-id",
                "x",
                "--",
                "true",
            ],
            "node rank 2 is out of range",
        ),
        (
            vec!["--standalone", "--", "/no/such/program"],
            "program /no/such/program not found",
        ),
        (
            vec!["--standalone", "--", "no-such-program-xyz"],
            "not found in PATH",
        ),
        (
            vec!["--standalone", missing_cfg.to_str().unwrap()],
            "not found",
        ),
        (
            vec!["--standalone", "train.py"],
            "is not a YAML config (the trainer's, e.g. configs/llava-sco.yaml); to run a program \
             on every rank use `launcher [OPTIONS] -- python train.py ARGS` (for programs that \
             read the rank variables: one that calls torch.distributed's \
             init_process_group(\"env://\") needs torchrun",
        ),
        (
            vec!["--nnodes", "2", "--node-rank", "0", "--", "true"],
            "pass the same --run-id",
        ),
        (
            vec!["--nnodes", "2", "--run-id", "x", "--", "true"],
            "this node's rank is unknown: give each node's launcher its own --node-rank",
        ),
        (
            vec!["--nnodes", "1:4", "--", "true"],
            "elastic node ranges are not supported",
        ),
        (vec!["--standalone"], "nothing to run"),
        (
            vec![
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--master-port",
                &free,
                "--run-id",
                "x",
                "--rdzv-timeout",
                "1",
                "--",
                "true",
            ],
            "cannot reach rendezvous store at 127.0.0.1:",
        ),
        // node 0 given another host's address (TEST-NET-1: no host answers): said at the
        // start, not only after --rdzv-timeout as "is node 0 running?"
        (
            vec![
                "--nnodes",
                "2",
                "--node-rank",
                "0",
                "--master-addr",
                "192.0.2.1",
                "--master-port",
                &free,
                "--run-id",
                "x",
                "--rdzv-timeout",
                "2",
                "--",
                "true",
            ],
            "--master-addr 192.0.2.1 is not an address of this host (",
        ),
    ];
    for (args, expected) in cases {
        let run = run(launcher(&args), LIMIT);
        assert_eq!(run.code(), 1, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{}",
            run.stderr
        );
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("launcher: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error line:\n{}", run.stderr);
    }
    // a bad flag is the only line (no notice about OMP_NUM_THREADS before it)
    let run = run(launcher(&["--grace-period", "nan", "--", "true"]), LIMIT);
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert_eq!(
        run.stderr.trim(),
        "launcher: error: --grace-period NaN is not a number of seconds from 0 to 1e9"
    );
    drop(busy);
}

#[test]
fn unreachable_store_message_names_the_endpoint_and_the_fix() {
    let port = free_port();
    let run = run(
        launcher(&[
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-port",
            &port.to_string(),
            "--run-id",
            "x",
            "--rdzv-timeout",
            "1",
            "--",
            "true",
        ]),
        LIMIT,
    );
    assert_eq!(run.code(), 1);
    let expected = format!("cannot reach rendezvous store at 127.0.0.1:{port} after 1 s (is node 0 running? firewall?)");
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
}

#[test]
fn nodes_with_different_run_ids_are_refused() {
    let port = free_port().to_string();
    let node = |rank: &str, id: &str| {
        launcher(&[
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--master-port",
            &port,
            "--run-id",
            id,
            "--rdzv-timeout",
            "2",
            "--",
            "true",
        ])
    };
    let started = Instant::now();
    let node0 = node("0", "alpha").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let node1 = node("1", "beta").spawn().unwrap();
    let run1 = wait(node1, started, LIMIT);
    let run0 = wait(node0, started, LIMIT);
    assert_eq!(run1.code(), 1);
    assert!(run1.stderr.contains("wrong token"), "{}", run1.stderr);
    assert_eq!(run0.code(), 1);
    assert!(
        run0.stderr.contains("only 1 of 2 nodes joined"),
        "{}",
        run0.stderr
    );
    assert!(
        run0.stderr.contains("missing node ranks [1]"),
        "{}",
        run0.stderr
    );
    // (node 0 says whom its store turned away)
    assert!(
        run0.stderr.contains("; meanwhile the store rejected 1 connection(s) (the warnings above say why: a node started with another --run-id or LLAVA_SCO_STORE_TOKEN?)"),
        "{}",
        run0.stderr
    );
}

/// With the store token exported (as docs/launcher.md and slurm.sbatch advise), the token no
/// longer tells runs apart: a node whose --run-id differs from node 0's is still refused.
#[test]
fn nodes_with_different_run_ids_are_refused_with_an_exported_token() {
    let port = free_port().to_string();
    let node = |rank: &str, id: &str| {
        let mut c = launcher(&[
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--master-port",
            &port,
            "--run-id",
            id,
            "--rdzv-timeout",
            "3",
            "--",
            "true",
        ]);
        c.env("LLAVA_SCO_STORE_TOKEN", "one-secret-for-both");
        c
    };
    let started = Instant::now();
    let node0 = node("0", "alpha").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let node1 = node("1", "beta").spawn().unwrap();
    let run1 = wait(node1, started, LIMIT);
    let run0 = wait(node0, started, LIMIT);
    assert_eq!(run1.code(), 1, "{}", run1.stderr);
    assert!(
        run1.stderr.contains("differs from node 0's \"alpha\""),
        "{}",
        run1.stderr
    );
    assert_ne!(run0.code(), 0, "{}", run0.stderr);
}

/// torchrun takes each option from `PET_<NAME>` when its flag is absent (Kubeflow's PyTorchJob
/// sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR ... and runs torchrun with no flags); a flag
/// wins over its variable and over variables that contradict it. A relative --log-dir reaches the ranks as absolute paths (a rank that
/// changes directory still finds its error file).
#[test]
fn pet_variables_are_options_and_log_dir_paths_are_absolute() {
    let dir = Scratch::new("pet");
    let mut cmd = launch_testrank(&["--standalone", "--log-dir", "logs"], dir.path(), &[]);
    cmd.env("PET_NPROC_PER_NODE", "3")
        .env("PET_RDZV_ID", "petrun")
        .current_dir(dir.path());
    let r = run(cmd, LIMIT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let env = read_env(dir.path(), 2, 0);
    assert_eq!(env["WORLD_SIZE"], "3");
    assert_eq!(env["TORCHELASTIC_RUN_ID"], "petrun");
    let file = Path::new(&env["TORCHELASTIC_ERROR_FILE"]);
    assert!(file.is_absolute(), "{}", file.display());
    assert!(
        file.starts_with(dir.path().join("logs/petrun")),
        "{}",
        file.display()
    );

    let flag = Scratch::new("pet-flag");
    let mut cmd = launch_testrank(&["--standalone", "--nproc-per-node", "2"], flag.path(), &[]);
    cmd.env("PET_NPROC_PER_NODE", "3");
    let r = run(cmd, LIMIT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(read_env(flag.path(), 1, 0)["WORLD_SIZE"], "2");
    // a second node's variables without its rank: refused as the flags are
    let mut cmd = launcher(&["--", "true"]);
    cmd.env("PET_NNODES", "2");
    let r = run(cmd, LIMIT);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("this node's rank is unknown"),
        "{}",
        r.stderr
    );
    // a flag wins over variables that would contradict it (a pod's layout, a test run in it)
    let mut cmd = launcher(&["--standalone", "--", "true"]);
    cmd.env("PET_NNODES", "2")
        .env("PET_NODE_RANK", "1")
        .env("PET_MASTER_ADDR", "nowhere.invalid")
        .env("PET_RDZV_ENDPOINT", "nowhere.invalid:1");
    let r = run(cmd, LIMIT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

#[test]
fn usage_errors_exit_2() {
    let unknown = run(launcher(&["--no-such-flag"]), LIMIT);
    assert_eq!(unknown.code(), 2);
    // torchrun's `torchrun train.py --lr 1`: the usage error says where programs go
    let script = run(launcher(&["--standalone", "train.py", "--lr", "1"]), LIMIT);
    assert_eq!(script.code(), 2);
    assert!(
        script
            .stderr
            .contains("launcher [OPTIONS] -- python train.py ARGS"),
        "{}",
        script.stderr
    );
    // llama-recipes' flags after a config: the --set that gives them, not clap's `-- --lr`;
    // a typo of a real flag keeps clap's suggestion, not the config note
    for (flag, says, not) in [
        (["--lr", "1e-5"], "`--set lr=1e-5`", "tip:"),
        (["--max-restart", "3"], "'--max-restarts'", "--set"),
    ] {
        let o = run(
            launcher(&[&["--standalone", "cfg.yaml"][..], &flag].concat()),
            LIMIT,
        );
        assert_eq!(o.code(), 2);
        assert!(
            o.stderr.contains(says) && !o.stderr.contains(not),
            "{}",
            o.stderr
        );
    }
    // torchrun's --no-python is how this launcher always runs programs
    let no_python = run(
        launcher(&["--standalone", "--no-python", "--", "true"]),
        LIMIT,
    );
    assert_eq!(no_python.code(), 0, "{}", no_python.stderr);
    let nodes = run(launcher(&["--nnodes", "200000", "--", "true"]), LIMIT);
    assert_eq!(nodes.code(), 1, "{}", nodes.stderr);
    assert!(nodes.stderr.contains("at most 65536"), "{}", nodes.stderr);
    let huge = run(
        launcher(&["--nproc-per-node", "10000000000", "--", "true"]),
        LIMIT,
    );
    assert_ne!(huge.code(), 0);
    assert!(
        huge.stderr.contains("at most 4096 ranks per node"),
        "{}",
        huge.stderr
    );
}

/// --finish-timeout across nodes names the node still running, not the node that finished and
/// waited (both nodes blamed node 0, whose ranks had all exited 0). One rank per node, so node 1
/// has no finished rank of its own to time out against.
#[test]
fn a_finish_timeout_across_nodes_names_the_node_still_running() {
    let dir = Scratch::new("finishnodes");
    let port = free_port().to_string();
    let node = |rank| {
        let extra = ["--finish-timeout", "3", "--grace-period", "1"];
        let rank_args = ["--sleep", "60", "--sleep-rank", "1"];
        spawn_node(
            dir.path(),
            &port,
            "finishnodes",
            ("2", rank),
            &extra,
            &rank_args,
        )
    };
    let started = Instant::now();
    let (node0, node1) = (node("0"), node("1"));
    for run in [wait(node0, started, LIMIT), wait(node1, started, LIMIT)] {
        assert_eq!(run.code(), 124, "{}", run.stderr);
        assert!(
            run.stderr
                .contains("node(s) [1] still running 3 s after node 0's ranks finished")
                && run.stderr.contains("node       : 1\n"),
            "{}",
            run.stderr
        );
    }
}

/// Ranks failing on both nodes at once: one node's failure is the root cause on both, and the
/// other node's own failure is listed first among the others in its summary (it was dropped).
#[test]
fn a_nodes_own_failure_that_lost_the_race_is_listed() {
    let dir = Scratch::new("racefail");
    // (a long monitor interval: each node records its own ranks' failure before it looks at
    // the store)
    let (run0, run1, _) = two_nodes(
        dir.path(),
        "racefail",
        &["--monitor-interval", "2", "--grace-period", "1"],
        &["--exit-code", "5", "--stderr", "it broke here"],
        false,
    );
    let runs = [run0, run1];
    let root = |run: &Run| run.stderr.contains(" on node 1)\n    host") as usize;
    let winner = root(&runs[0]);
    assert_eq!(
        root(&runs[1]),
        winner,
        "one root cause: {}\n{}",
        runs[0].stderr,
        runs[1].stderr
    );
    let loser = &runs[1 - winner];
    let own = format!(" on node {}, ", 1 - winner);
    let listed = loser
        .stderr
        .lines()
        .skip_while(|l| !l.contains("other failures:"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        listed.contains(&own) && listed.ends_with("exited with code 5: it broke here"),
        "{}",
        loser.stderr
    );
}

#[test]
fn a_multi_node_group_restarts_together() {
    let dir = Scratch::new("noderestart");
    let (run0, run1, _) = two_nodes(
        dir.path(),
        "noderestart",
        &["--grace-period", "2", "--max-restarts", "1"],
        &[
            "--rank",
            "3",
            "--kill-self",
            "--attempt",
            "0",
            "--sleep",
            "1",
            "--trap",
            "--store",
        ],
        false,
    );
    assert_eq!(run0.code(), 0, "node 0: {}", run0.stderr);
    assert_eq!(run1.code(), 0, "node 1: {}", run1.stderr);
    for rank in 0..4usize {
        let env = read_env(dir.path(), rank, 1);
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "1");
        assert_eq!(env["RANK"], rank.to_string());
        // The second attempt's barrier is not confused by the first attempt's keys.
        let total = std::fs::read_to_string(dir.path().join(format!("store-{rank}-1"))).unwrap();
        assert_eq!(total, "4");
    }
    assert_no_survivors_in(dir.path(), &[run0.pgid, run1.pgid]);
}

#[test]
fn nproc_auto_counts_visible_gpus() {
    for (visible, expected) in [("0,1", "2"), ("", "1"), ("3", "1")] {
        let dir = Scratch::new("auto");
        let mut cmd = launch_testrank(
            &["--standalone", "--nproc-per-node", "auto"],
            dir.path(),
            &[],
        );
        cmd.env("CUDA_VISIBLE_DEVICES", visible);
        let run = run(cmd, LIMIT);
        assert_eq!(run.code(), 0, "{}", run.stderr);
        assert_eq!(
            read_env(dir.path(), 0, 0)["WORLD_SIZE"],
            expected,
            "CUDA_VISIBLE_DEVICES={visible:?}"
        );
    }
}

#[test]
fn a_slurm_allocation_provides_the_layout_and_nodes_may_differ_in_size() {
    let dir = Scratch::new("slurm");
    let port = free_port().to_string();
    let node = |node_id: &str, nproc: &str| {
        let mut cmd = launch_testrank(
            &["--nproc-per-node", nproc, "--master-port", &port],
            dir.path(),
            &["--store"],
        );
        // (what `srun --ntasks-per-node=1` sets, step 7)
        cmd.env("SLURM_JOB_ID", "4242")
            .env("SLURM_STEP_ID", "7")
            .env("SLURM_LOCALID", "0")
            .env("SLURM_NNODES", "2")
            .env("SLURM_NODEID", node_id)
            .env("SLURM_JOB_NODELIST", "localhost,node[2-3]");
        cmd
    };
    let started = Instant::now();
    let node0 = node("0", "1").spawn().unwrap();
    let node1 = node("1", "3").spawn().unwrap();
    let run0 = wait(node0, started, LIMIT);
    let run1 = wait(node1, started, LIMIT);
    assert_eq!(run0.code(), 0, "node 0: {}", run0.stderr);
    assert_eq!(run1.code(), 0, "node 1: {}", run1.stderr);
    assert!(
        run0.stderr
            .contains("SLURM job 4242: 2 node(s), this is node 0, master localhost"),
        "{}",
        run0.stderr
    );
    for rank in 0..4usize {
        let env = read_env(dir.path(), rank, 0);
        let (group, local, local_world) = if rank == 0 {
            (0, 0, 1)
        } else {
            (1, rank - 1, 3)
        };
        assert_eq!(env["GROUP_RANK"], group.to_string());
        assert_eq!(env["LOCAL_RANK"], local.to_string());
        assert_eq!(env["LOCAL_WORLD_SIZE"], local_world.to_string());
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["MASTER_ADDR"], "localhost");
        assert_eq!(env["TORCHELASTIC_RUN_ID"], "4242.7", "the job and step ids");
        // node 1 adopts node 0's launch id
        assert_eq!(
            env["LLAVA_SCO_LAUNCH_ID"],
            read_env(dir.path(), 0, 0)["LLAVA_SCO_LAUNCH_ID"]
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(format!("store-{rank}-0"))).unwrap(),
            "4"
        );
    }
}

/// The usual ways of misplacing the launcher in a SLURM job stop it at once, saying what to
/// write: several launchers per node (`srun --ntasks-per-node=8 launcher`) and an sbatch script
/// on several nodes without srun (it would wait for the other nodes until --rdzv-timeout). With
/// --standalone (independent runs, e.g. a sweep) the layout is the user's: it runs.
#[test]
fn misplaced_in_a_slurm_job_is_an_error_at_once() {
    let dir = Scratch::new("slurm-misuse");
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], Option<&'a str>);
    let several = [
        ("SLURM_STEP_ID", "0"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "0"),
    ];
    let cases: [Case; 3] = [
        (
            &several,
            &[],
            Some("srun started several launchers on this node"),
        ),
        (&[("SLURM_NODEID", "0")], &[], Some("not started by srun")),
        (&several, &["--standalone"], None),
    ];
    for (env, flags, want) in cases {
        // (a regression would wait for the other node until the rendezvous timeout)
        let mut args = vec!["--nproc-per-node", "1", "--rdzv-timeout", "8"];
        args.extend_from_slice(flags);
        let mut cmd = launch_testrank(&args, dir.path(), &[]);
        cmd.env("SLURM_JOB_ID", "4243")
            .env("SLURM_NNODES", "2")
            .env("SLURM_JOB_NODELIST", "localhost,node2");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let r = run(cmd, Duration::from_secs(10));
        match want {
            Some(want) => {
                assert_eq!(r.code(), 1, "{want}: {}", r.stderr);
                assert!(r.stderr.contains(want), "{want}: {}", r.stderr);
            }
            None => assert_eq!(r.code(), 0, "{flags:?}: {}", r.stderr),
        }
    }
}

/// A bare program name not on PATH is found beside the launcher (`launcher -- trainer bench ...`
/// from a build folder), as the launcher finds `trainer` for a config.
#[test]
fn a_program_beside_the_launcher_runs_without_path() {
    let dir = Scratch::new("beside");
    let name = std::path::Path::new(TESTRANK).file_name().unwrap();
    let mut cmd = launcher(&["--standalone", "--nproc-per-node", "1", "--"]);
    cmd.arg(name)
        .args(["--out", dir.path().to_str().unwrap()])
        .env("PATH", "/usr/bin:/bin");
    let r = run(cmd, LIMIT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(read_env(dir.path(), 0, 0)["RANK"], "0");
}

/// A plain `salloc` shell sets SLURM_JOB_ID but not the step's layout: the flags replace what is
/// missing (the error without them names the flag).
#[test]
fn flags_replace_missing_slurm_variables() {
    let dir = Scratch::new("salloc");
    let port = free_port().to_string();
    let run = |flags: &[&str]| {
        let mut args = vec!["--nproc-per-node", "1", "--master-port", &port];
        args.extend_from_slice(flags);
        let mut cmd = launch_testrank(&args, dir.path(), &[]);
        cmd.env("SLURM_JOB_ID", "77");
        wait(cmd.spawn().unwrap(), Instant::now(), LIMIT)
    };
    let bare = run(&[]);
    assert_eq!(bare.code(), 1, "{}", bare.stderr);
    assert!(bare.stderr.contains("pass --nnodes"), "{}", bare.stderr);
    let flagged = run(&[
        "--nnodes",
        "1",
        "--node-rank",
        "0",
        "--master-addr",
        "localhost",
    ]);
    assert_eq!(flagged.code(), 0, "{}", flagged.stderr);
    // one node needs no SLURM layout at all
    let single = run(&["--nnodes", "1"]);
    assert_eq!(single.code(), 0, "{}", single.stderr);
    // but on a later node of the allocation it would run the job a second time
    let mut cmd = launch_testrank(
        &[
            "--nproc-per-node",
            "1",
            "--master-port",
            &port,
            "--nnodes",
            "1",
        ],
        dir.path(),
        &[],
    );
    cmd.env("SLURM_JOB_ID", "77").env("SLURM_NODEID", "1");
    let later = wait(cmd.spawn().unwrap(), Instant::now(), LIMIT);
    assert_eq!(later.code(), 1, "{}", later.stderr);
    assert!(
        later.stderr.contains("--nnodes 1 on SLURM node 1"),
        "{}",
        later.stderr
    );
}

/// Runs two launchers on localhost as nodes 0 and 1 of a 2-node x 2-rank job of test ranks
/// (`extra` launcher flags, `rank_args` for every rank) and waits for both. With
/// `node1_first`, node 1 starts 300 ms before node 0 and must wait for node 0's store.
/// Returns (node 0's run, node 1's run, the master port).
fn two_nodes(
    dir: &Path,
    run_id: &str,
    extra: &[&str],
    rank_args: &[&str],
    node1_first: bool,
) -> (Run, Run, String) {
    let port = free_port().to_string();
    let node = |rank: &str| {
        let mut flags = vec![
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--run-id",
            run_id,
            "--rdzv-timeout",
            "15",
        ];
        flags.extend_from_slice(extra);
        launch_testrank(&flags, dir, rank_args)
    };
    let started = Instant::now();
    let (node0, node1) = if node1_first {
        let node1 = node("1").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        (node("0").spawn().unwrap(), node1)
    } else {
        let node0 = node("0").spawn().unwrap();
        (node0, node("1").spawn().unwrap())
    };
    let run0 = wait(node0, started, LIMIT);
    let run1 = wait(node1, started, LIMIT);
    (run0, run1, port)
}

/// Runs `--standalone --nproc-per-node N` test ranks with `extra` launcher flags to completion.
fn standalone(dir: &Path, nproc: usize, extra: &[&str], rank_args: &[&str]) -> Run {
    let nproc = nproc.to_string();
    let mut flags = vec!["--standalone", "--nproc-per-node", &nproc];
    flags.extend_from_slice(extra);
    run(launch_testrank(&flags, dir, rank_args), LIMIT)
}

/// No process of the launchers' groups `pgids` or of any rank group recorded in `dir` is alive.
fn assert_no_survivors_in(dir: &Path, pgids: &[i32]) {
    let mut groups = recorded_groups(dir);
    groups.extend_from_slice(pgids);
    assert_no_survivors(&groups);
}

/// A rank fails, another ignores SIGTERM, and the launcher gets SIGINT during the grace period:
/// the run ends with 130 and is not restarted, although restarts are left.
#[test]
fn a_launcher_signal_while_stopping_ends_the_run_without_restart() {
    let dir = Scratch::new("signal-while-stopping");
    let started = Instant::now();
    let mut cmd = launcher(&[
        "--standalone",
        "--nproc-per-node",
        "2",
        "--grace-period",
        "20",
        "--max-restarts",
        "1",
        "--",
        "sh",
        "-c",
        // (rank 1 fails once rank 0 has its trap, as in the grace-period test)
        r#"a=$TORCHELASTIC_RESTART_COUNT; if [ "$RANK" = 1 ]; then touch "$0/up-1-$a"; while [ ! -e "$0/up-0-$a" ]; do sleep 0.05; done; exit 5; fi; trap '' TERM; touch "$0/up-0-$a"; sleep 60"#,
        dir.path().to_str().unwrap(),
    ]);
    cmd.env("PATH", std::env::var("PATH").unwrap());
    let child = cmd.spawn().unwrap();
    for rank in 0..2 {
        wait_for_file(&dir.path().join(format!("up-{rank}-0")), LIMIT);
    }
    std::thread::sleep(Duration::from_millis(700)); // rank 1 has failed; rank 0 ignores SIGTERM

    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let run = wait(child, started, LIMIT);
    assert_eq!(run.code(), 128 + libc::SIGINT, "{}", run.stderr);
    assert!(
        run.elapsed < Duration::from_secs(15),
        "killed at once: {:?}",
        run.elapsed
    );
    assert!(
        !dir.path().join("up-0-1").exists(),
        "no second attempt\n{}",
        run.stderr
    );
}

/// Nodes that disagree on restarting (--max-restarts 1 on one, 0 on the other): the node without
/// restarts ends the run, and the other, which would restart, learns it at the next rendezvous
/// instead of waiting out --rdzv-timeout for a node that is gone. Both ways round: when node 0
/// (which serves the store) is the one that stops, it stays until the other has read why.
fn restarts_alone(restarting_node: usize) {
    let port = free_port().to_string();
    let node = |rank: usize| {
        let restarts = if rank == restarting_node { "1" } else { "0" };
        let failing = if restarting_node == 0 { "1" } else { "0" }; // the stopping node's rank
        let script = format!(r#"if [ "$RANK" = {failing} ]; then sleep 0.5; exit 4; fi; sleep 30"#);
        let rank = rank.to_string();
        let mut c = launcher(&[
            "--nnodes",
            "2",
            "--node-rank",
            &rank,
            "--nproc-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--run-id",
            "giveup",
            "--rdzv-timeout",
            "60",
            "--max-restarts",
            restarts,
            "--grace-period",
            "2",
            "--",
            "sh",
            "-c",
            &script,
        ]);
        c.env("PATH", std::env::var("PATH").unwrap());
        c
    };
    let started = Instant::now();
    let node0 = node(0).spawn().unwrap();
    let node1 = node(1).spawn().unwrap();
    let run1 = wait(node1, started, LIMIT);
    let run0 = wait(node0, started, LIMIT);
    let (stopper, restarter) = if restarting_node == 0 {
        (run1, run0)
    } else {
        (run0, run1)
    };
    assert_eq!(stopper.code(), 4, "{}", stopper.stderr);
    assert_ne!(restarter.code(), 0, "{}", restarter.stderr);
    // (why the other node stopped: its --max-restarts, which its own console warned of)
    let other = 1 - restarting_node;
    assert!(
        restarter.stderr.contains("another node ended the run")
            && restarter.stderr.contains(&format!(
                "node {other} stopped after attempt 0 with --max-restarts 0"
            )),
        "{}",
        restarter.stderr
    );
    if restarting_node == 0 {
        assert!(
            stopper
                .stderr
                .contains("node 1's --max-restarts 0 differs from node 0's 1"),
            "{}",
            stopper.stderr
        );
    }
    assert!(
        restarter.elapsed < Duration::from_secs(20),
        "took {:?}",
        restarter.elapsed
    );
}

#[test]
fn a_node_that_restarts_alone_stops_when_the_other_gave_up() {
    restarts_alone(0);
}

#[test]
fn a_node_that_restarts_alone_stops_when_node_0_gave_up() {
    restarts_alone(1);
}

/// A rank's progress redraw on stdout (ending in '\r', no newline) reaches the launcher's stdout
/// while the rank still runs, not at its exit.
#[test]
fn a_stdout_redraw_is_shown_at_once() {
    use std::io::Read;
    let mut child = launcher(&[
        "--standalone",
        "--nproc-per-node",
        "1",
        "--",
        "sh",
        "-c",
        "printf '10%%\\r'; sleep 6",
    ])
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut seen = Vec::new();
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(4).any(|w| w == b"10%\r") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let shown = rx.recv_timeout(Duration::from_secs(4)).is_ok();
    // SAFETY: plain syscall to our own child's group.
    unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    assert!(shown, "the redraw was not relayed while the rank ran");
}

/// With a long --monitor-interval, a node whose ranks finished first still learns that the run
/// succeeded before node 0 takes its store down (node 0 waits ~10 s for the other nodes' acks;
/// node 1 used to sleep a whole monitor interval between looks), and both exit 0.
#[test]
fn a_long_monitor_interval_does_not_turn_success_into_lost_contact() {
    let dir = Scratch::new("longmonitor");
    let (run0, run1, _) = two_nodes(
        dir.path(),
        "longmonitor",
        &["--monitor-interval", "12"],
        &["--sleep", "1", "--sleep-rank", "0"],
        false,
    );
    assert_eq!(run0.code(), 0, "node 0: {}", run0.stderr);
    assert_eq!(run1.code(), 0, "node 1: {}", run1.stderr);
}

/// Nodes given different --nnodes stop at once with a message that says so (each used to wait
/// for a node count the others never reach, until the rendezvous timeout).
#[test]
fn different_nnodes_on_two_nodes_is_an_immediate_error() {
    let dir = Scratch::new("nnodes");
    let port = free_port().to_string();
    let node = |rank: &str, nnodes: &str| {
        spawn_node(dir.path(), &port, "nnodes", (nnodes, rank), &[], &[])
    };
    let started = Instant::now();
    let node0 = node("0", "2");
    std::thread::sleep(Duration::from_millis(300));
    let node1 = node("1", "3");
    let (run0, run1) = (wait(node0, started, LIMIT), wait(node1, started, LIMIT));
    assert_ne!(run1.code(), 0);
    assert!(
        run1.stderr.contains("--nnodes 3 differs from node 0's 2"),
        "{}",
        run1.stderr
    );
    assert_ne!(run0.code(), 0);
    assert!(run0.stderr.contains("--nnodes"), "node 0: {}", run0.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// A rank that exited stays a zombie (its pid, its process group's id, reserved) until the end
/// of the attempt's last SIGKILL to its group: that signal cannot reach another job's group that
/// was handed the same number meanwhile.
#[test]
fn an_exited_rank_keeps_its_pid_until_its_group_was_signalled() {
    let dir = Scratch::new("zombie");
    let mut cmd = launcher(&[
        "--standalone",
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        r#"echo $$ > "$0/pid-$RANK"; if [ "$RANK" = 1 ]; then sleep 3; fi"#,
        dir.path().to_str().unwrap(),
    ]);
    cmd.env("PATH", std::env::var("PATH").unwrap());
    let started = Instant::now();
    let child = cmd.spawn().unwrap();
    let pid0 = dir.path().join("pid-0");
    wait_for_file(&pid0, LIMIT);
    let pid: i32 = loop {
        if let Ok(Ok(p)) = std::fs::read_to_string(&pid0).map(|s| s.trim().parse()) {
            break p;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // rank 0 exits at once; while rank 1 sleeps its process is still there, a zombie
    std::thread::sleep(Duration::from_millis(1000));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .trim_start()
        .chars()
        .next();
    assert_eq!(state, Some('Z'), "rank 0 ({pid}): {stat:?}");
    let run = wait(child, started, LIMIT);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "reaped at the end"
    );
}

/// A node stopped (Ctrl-C) while waiting at the rendezvous tells the others: node 0 stops at
/// once, naming it, instead of waiting out --rdzv-timeout (or starting ranks without it once a
/// late node completed the count).
#[test]
fn a_node_interrupted_at_the_rendezvous_stops_the_others() {
    let dir = Scratch::new("rdzvint");
    let port = free_port().to_string();
    let node = |rank: &str| spawn_node(dir.path(), &port, "rdzvint", ("3", rank), &[], &[]);
    let started = Instant::now();
    let node0 = node("0");
    std::thread::sleep(Duration::from_millis(300));
    let mut node1 = node("1");
    // (node 2 never comes) node 1 joins (its log says so), then gets Ctrl-C
    let stderr1 = node1.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr1)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("node 1 joined the rendezvous") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(15))
        .expect("node 1 did not join within 15 s");
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(node1.id() as i32, libc::SIGINT) };
    let (run1, run0) = (wait(node1, started, LIMIT), wait(node0, started, LIMIT));
    let stderr1 = reader.join().unwrap();
    assert_eq!(run1.code(), 130, "node 1: {stderr1}");
    assert_ne!(run0.code(), 0);
    assert!(
        run0.stderr.contains("node 1") && run0.stderr.contains("signal 2"),
        "node 0: {}",
        run0.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// One node of a multi-node test run on 127.0.0.1 (one test rank with `rank_args`,
/// --rdzv-timeout 60, then `extra` flags), spawned.
fn spawn_node(
    dir: &Path,
    port: &str,
    run_id: &str,
    (nnodes, rank): (&str, &str),
    extra: &[&str],
    rank_args: &[&str],
) -> std::process::Child {
    let mut flags = vec![
        "--nnodes",
        nnodes,
        "--node-rank",
        rank,
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
        "--run-id",
        run_id,
        "--rdzv-timeout",
        "60",
    ];
    flags.extend_from_slice(extra);
    launch_testrank(&flags, dir, rank_args).spawn().unwrap()
}

/// With a long --monitor-interval, a node learns another node's failure from the store before
/// node 0 takes it down (node 0 keeps it up two monitor intervals at least): it reports the
/// failing rank as the root cause, not "lost contact with node 0".
#[test]
fn a_long_monitor_interval_still_reports_the_root_cause_on_every_node() {
    let dir = Scratch::new("longmonitorfail");
    let port = free_port().to_string();
    let extra = ["--monitor-interval", "25", "--grace-period", "1"];
    let rank_args = ["--rank", "0", "--exit-code", "7", "--sleep", "90"];
    let node = |rank: &str| {
        spawn_node(
            dir.path(),
            &port,
            "longmonitorfail",
            ("2", rank),
            &extra,
            &rank_args,
        )
    };
    let started = Instant::now();
    let (node0, node1) = (node("0"), node("1"));
    let limit = Duration::from_secs(60);
    let (run0, run1) = (wait(node0, started, limit), wait(node1, started, limit));
    assert_eq!(run0.code(), 7, "node 0: {}", run0.stderr);
    assert!(
        !run1.stderr.contains("lost contact"),
        "node 1: {}",
        run1.stderr
    );
    assert!(
        run1.stderr.contains("exit code 7"),
        "node 1: {}",
        run1.stderr
    );
}

/// Two launchers given the same --node-rank: the second is refused, and the nodes already waiting
/// stop at once with its reason instead of waiting out --rdzv-timeout for the node rank left
/// missing.
#[test]
fn a_duplicate_node_rank_stops_the_waiting_nodes_at_once() {
    let port = free_port().to_string();
    let node = |rank: &str| {
        launcher(&[
            "--nnodes",
            "3",
            "--node-rank",
            rank,
            "--master-port",
            &port,
            "--run-id",
            "dup",
            "--rdzv-timeout",
            "60",
            "--",
            "true",
        ])
    };
    let started = Instant::now();
    let node0 = node("0").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let node1 = node("1").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let again = node("1").spawn().unwrap();
    let dup = wait(again, started, LIMIT);
    assert_eq!(dup.code(), 1, "{}", dup.stderr);
    assert!(
        dup.stderr.contains("node rank 1 is already taken"),
        "{}",
        dup.stderr
    );
    // node 0 reads the reason from its own store; node 1 may find that store already gone
    // (node 0 exited first), which also stops it at once
    let run0 = wait(node0, started, LIMIT);
    assert_ne!(run0.code(), 0, "{}", run0.stderr);
    assert!(run0.stderr.contains("already taken"), "{}", run0.stderr);
    let run1 = wait(node1, started, LIMIT);
    assert_ne!(run1.code(), 0, "{}", run1.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// Starts 2 sleeping ranks (`rank_args` added), waits until both run, sends SIGUSR1 to the
/// launcher, waits for it to end.
fn notice_launcher(name: &str, launcher_args: &[&str], rank_args: &[&str]) -> (Run, Scratch) {
    let dir = Scratch::new(name);
    let started = Instant::now();
    let mut args = vec!["--standalone", "--nproc-per-node", "2"];
    args.extend_from_slice(launcher_args);
    let mut ranks = vec!["--sleep", "30", "--trap"];
    ranks.extend_from_slice(rank_args);
    let child = launch_testrank(&args, dir.path(), &ranks).spawn().unwrap();
    for rank in 0..2 {
        wait_for_file(&dir.path().join(format!("ready-{rank}-0")), LIMIT);
    }
    // SAFETY: plain syscall to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let run = wait(child, started, LIMIT);
    assert_no_survivors_in(dir.path(), &[run.pgid]);
    (run, dir)
}

/// SLURM's `--signal=USR1@90` notice: SIGUSR1 to the launcher is passed on to every rank and
/// stops nothing (uncaught, it killed the launcher and, through PR_SET_PDEATHSIG, every rank at
/// once); ranks that handle it finish as they choose, here successfully.
#[test]
fn sigusr1_is_passed_on_to_every_rank_without_a_stop() {
    let (run, dir) = notice_launcher("sigusr1", &[], &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("received SIGUSR1: passing it on"),
        "{}",
        run.stderr
    );
    for rank in 0..2 {
        assert!(
            dir.path().join(format!("notice-{rank}-0")).exists(),
            "rank {rank} got the notice\n{}",
            run.stderr
        );
    }
}

/// Ranks that stop on the passed-on notice with a failure code (the trainer: checkpoint, then
/// exit 143) are not restarted: the notice announces the end of the allocation.
#[test]
fn ranks_stopping_on_a_notice_are_not_restarted() {
    let (run, dir) = notice_launcher(
        "sigusr1-norestart",
        &["--max-restarts", "2"],
        &["--notice-exit", "143"],
    );
    assert_eq!(run.code(), 143, "{}", run.stderr);
    assert!(run.stderr.contains("not restarting"), "{}", run.stderr);
    assert!(!dir.path().join("env-0-1").exists(), "no second attempt");
    // (the summary said "all 2 restarts used")
    assert!(
        run.stderr
            .contains("(2 of 2 restarts left, not used after a SIGUSR1/SIGUSR2 notice"),
        "{}",
        run.stderr
    );
}

/// Two launches with one run id and --log-dir (two sruns of a job that give the layout by flags,
/// a reused --run-id) would interleave their logs and clear each other's error files: while one
/// holds the folder, the other is refused naming it.
#[test]
fn a_second_launch_into_the_same_run_log_folder_is_refused() {
    use std::os::fd::AsRawFd;
    let dir = Scratch::new("logdir-busy");
    let logs = dir.path().join("logs");
    let run_dir = logs.join("same");
    std::fs::create_dir_all(&run_dir).unwrap();
    let lock = std::fs::File::create(run_dir.join(".launcher-node0.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let args = [
        "--standalone",
        "--log-dir",
        logs.to_str().unwrap(),
        "--run-id",
        "same",
        "--",
        "true",
    ];
    let busy = run(launcher(&args), LIMIT);
    assert_eq!(busy.code(), 1, "{}", busy.stderr);
    assert!(
        busy.stderr
            .contains("is in use by another launch with this run id"),
        "{}",
        busy.stderr
    );
    drop(lock);
    let free = run(launcher(&args), LIMIT);
    assert_eq!(free.code(), 0, "{}", free.stderr);
}
