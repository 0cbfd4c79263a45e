//! `launcher`: torchrun's interface for LLaVA-SCo. Thin over the library: parse the command line,
//! resolve it (flags > SLURM > defaults) into a `LaunchSpec`, run, print the root cause, and map
//! the outcome to the exit code (`launcher::exit`).
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use launcher::env::{DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, STORE_TOKEN_VAR};
use launcher::outcome::{exit, to_stderr, Outcome};
use launcher::supervise::{self, LaunchSpec, OutputOptions, RankCommand};
use launcher::{gpus, slurm, token};

const EXAMPLES: &str = "\
Examples:
  launcher --nproc-per-node 2 configs/llava-sco.yaml             # `trainer train` on 2 ranks
  launcher --nproc-per-node auto configs/llava-sco.yaml --set train.lr=2e-5
  launcher --standalone --nproc-per-node 4 -- python run.py      # any program (torchrun --no-python)
      # that reads the rank variables; init_process_group(\"env://\") needs torchrun's TCPStore
  launcher --nnodes 2 --node-rank 0 --master-addr gpu01 --run-id exp1 configs/llava-sco.yaml   # on gpu01
  launcher --nnodes 2 --node-rank 1 --master-addr gpu01 --run-id exp1 configs/llava-sco.yaml   # on gpu02
  srun launcher --nproc-per-node 8 configs/llava-sco.yaml        # SLURM: layout from SLURM_* (configs/slurm.sbatch)

Every rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...).
Exit code: 0 on success; the first failed rank's code (128+N for signal N); 143/130/129 when the
launcher is stopped by SIGTERM/SIGINT/SIGHUP; 124 for --finish-timeout; 1 for launcher errors;
2 for command-line syntax errors.";

#[derive(Parser, Debug)]
#[command(
    name = "launcher",
    version,
    about = "torchrun-compatible launcher: one process per rank, rendezvous store, restarts",
    after_help = EXAMPLES
)]
struct Cli {
    /// Ranks on this node: a number, `auto` (visible GPUs, else 1), `gpu` (visible GPUs, error if
    /// none) or `cpu` (one per core)
    #[arg(
        long = "nproc-per-node",
        alias = "nproc_per_node",
        env = "PET_NPROC_PER_NODE",
        value_name = "N|auto|gpu|cpu",
        default_value = "1",
        // (`-1` is a bad count, not an unknown flag)
        allow_negative_numbers = true
    )]
    nproc_per_node: String,
    /// Number of nodes (`N`, or `N:N`; elastic ranges are not supported) [default: 1, or SLURM_STEP_NUM_NODES / SLURM_NNODES]
    #[arg(long, env = "PET_NNODES", value_name = "N")]
    nnodes: Option<String>,
    /// This node's rank in 0..nnodes [default: 0, or SLURM_NODEID]
    #[arg(
        long = "node-rank",
        alias = "node_rank",
        env = "PET_NODE_RANK",
        value_name = "R"
    )]
    node_rank: Option<usize>,
    /// Node 0's address, where the rendezvous store runs [default: 127.0.0.1, or the first SLURM node]
    #[arg(
        long = "master-addr",
        alias = "master_addr",
        env = "PET_MASTER_ADDR",
        value_name = "HOST"
    )]
    master_addr: Option<String>,
    /// Port of the rendezvous store on node 0 [default: 29500]
    #[arg(
        long = "master-port",
        alias = "master_port",
        env = "PET_MASTER_PORT",
        value_name = "PORT"
    )]
    master_port: Option<u16>,
    /// torchrun's spelling of --master-addr/--master-port (`HOST[:PORT]`)
    #[arg(
        long = "rdzv-endpoint",
        alias = "rdzv_endpoint",
        env = "PET_RDZV_ENDPOINT",
        value_name = "HOST[:PORT]"
    )]
    rdzv_endpoint: Option<String>,
    /// Accepted for torchrun compatibility (`static` or `c10d`): the store is always node 0's
    #[arg(
        long = "rdzv-backend",
        alias = "rdzv_backend",
        env = "PET_RDZV_BACKEND",
        value_name = "NAME"
    )]
    rdzv_backend: Option<String>,
    /// Single node on a free localhost port (no --master-* needed; several runs can share a machine)
    #[arg(long)]
    standalone: bool,
    /// Restart the whole group this many times after a rank fails
    #[arg(
        long = "max-restarts",
        alias = "max_restarts",
        env = "PET_MAX_RESTARTS",
        value_name = "K",
        default_value_t = 0
    )]
    max_restarts: u32,
    /// Seconds between checks of the other nodes (local ranks are checked every 10 ms)
    #[arg(
        long = "monitor-interval",
        alias = "monitor_interval",
        env = "PET_MONITOR_INTERVAL",
        value_name = "S",
        default_value_t = 0.1
    )]
    monitor_interval: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping ranks
    #[arg(
        long = "grace-period",
        alias = "grace_period",
        value_name = "S",
        default_value_t = 30.0
    )]
    grace_period: f64,
    /// Seconds ranks may keep running after another rank finished successfully (0: forever)
    #[arg(
        long = "finish-timeout",
        alias = "finish_timeout",
        value_name = "S",
        default_value_t = 900.0
    )]
    finish_timeout: f64,
    /// Seconds to reach node 0's store and for all nodes to join [default: 600, or --rdzv-conf's
    /// join_timeout / timeout]
    #[arg(long = "rdzv-timeout", alias = "rdzv_timeout", value_name = "S")]
    rdzv_timeout: Option<f64>,
    /// torchrun's rendezvous settings, KEY=VALUE,...: join_timeout (or static's timeout), in
    /// seconds, is --rdzv-timeout; its other keys are accepted and change nothing here
    #[arg(
        long = "rdzv-conf",
        alias = "rdzv_conf",
        env = "PET_RDZV_CONF",
        value_name = "K=V,.."
    )]
    rdzv_conf: Option<String>,
    /// The ranks' ROLE_NAME (torchrun's --role)
    #[arg(long, env = "PET_ROLE", value_name = "NAME", default_value = launcher::env::DEFAULT_ROLE)]
    role: String,
    /// Accepted for torchrun compatibility (spawn, fork, forkserver): every rank is a process of
    /// its own, started from the program's file
    #[arg(
        long = "start-method",
        alias = "start_method",
        env = "PET_START_METHOD",
        value_name = "METHOD",
        value_parser = ["spawn", "fork", "forkserver"]
    )]
    start_method: Option<String>,
    /// Write each rank's output to DIR/RUN_ID/attempt_N/LOCAL_RANK/{stdout,stderr}.log
    /// (attempt_N/nodeG/LOCAL_RANK with several nodes)
    #[arg(
        long = "log-dir",
        alias = "log_dir",
        env = "PET_LOG_DIR",
        value_name = "DIR"
    )]
    log_dir: Option<PathBuf>,
    /// Also show rank output on the console, prefixed `[rank r]` (`--tee 1` stdout, `2` stderr, `3`
    /// both; a bare --tee before another flag: 3)
    #[arg(short = 't', long, env = "PET_TEE", value_name = "STREAMS", num_args = 0..=1, default_missing_value = "3", value_parser = tee_streams)]
    tee: Option<u8>,
    /// torchrun's: the streams that go to the --log-dir files only (`3` both, the default there;
    /// `1` stdout, `2` stderr, `0` none): the others are also shown on the console, as --tee does
    #[arg(short = 'r', long, env = "PET_REDIRECTS", value_name = "STREAMS")]
    redirects: Option<String>,
    /// Only these local ranks' output reaches the console, e.g. `0` or `0,1` (log files keep all)
    #[arg(
        long = "local-ranks-filter",
        alias = "local_ranks_filter",
        env = "PET_LOCAL_RANKS_FILTER",
        value_name = "R,..",
        value_delimiter = ','
    )]
    local_ranks_filter: Option<Vec<usize>>,
    /// Run id shared by all nodes (TORCHELASTIC_RUN_ID; for multi-node runs also the store secret
    /// unless LLAVA_SCO_STORE_TOKEN is set) [default: SLURM_JOB_ID.SLURM_STEP_ID under srun,
    /// SLURM_JOB_ID outside a step, else random]
    #[arg(
        long = "run-id",
        aliases = ["run_id", "rdzv-id", "rdzv_id"],
        env = "PET_RDZV_ID",
        value_name = "ID"
    )]
    run_id: Option<String>,
    /// The trainer binary for CONFIG mode [default: `trainer` next to this launcher]
    #[arg(long, value_name = "PATH")]
    trainer: Option<PathBuf>,
    /// Override a config key for `trainer train`, e.g. `--set train.lr=2e-5` (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Training config: every rank runs `trainer train CONFIG [--set ...]`
    #[arg(value_name = "CONFIG.yaml")]
    config: Option<PathBuf>,
    /// Accepted for torchrun compatibility: PROGRAM always runs as given (after `--`, e.g.
    /// `-- python train.py`), as torchrun's --no-python runs it
    #[arg(long = "no-python", alias = "no_python")]
    no_python: bool,
    /// Any program to run once per rank instead of the trainer (after `--`)
    #[arg(last = true, value_name = "PROGRAM [ARGS]")]
    program: Vec<OsString>,
}

fn main() -> ExitCode {
    init_logging();
    let parsed = Cli::command()
        .try_get_matches_from(with_tee_value(std::env::args_os().collect()))
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let cli = match parsed {
        Ok((mut cli, matches)) => {
            env_yields_to_flags(&mut cli, &matches);
            cli
        }
        Err(e) => {
            let code = e.exit_code();
            // torchrun's `torchrun [OPTIONS] train.py --lr 1`: clap stops at `--lr`
            let script = e
                .use_stderr()
                .then(|| script_before_dashes(std::env::args_os().skip(1)))
                .flatten();
            // (clap's own tip for a program's flag, "to pass '-m' as a value, use '-- -m'",
            // would run `-m` as the program)
            let note = launcher::cli_note::for_clap_error(&e).or_else(|| {
                script.map(|script| {
                    format!(
                        "note: programs run after `--` (the launcher's own options come before it): \
                         launcher [OPTIONS] -- {script} ARGS"
                    )
                })
            });
            match note {
                Some(note) => to_stderr(&launcher::cli_note::with_note(&e, &note)),
                None => {
                    let _ = e.print();
                }
            }
            return ExitCode::from(code as u8);
        }
    };
    match run(cli) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(err) => {
            to_stderr(&format!("launcher: error: {err:#}\n"));
            ExitCode::from(exit::LAUNCH_ERROR)
        }
    }
}

fn run(cli: Cli) -> Result<Outcome> {
    let spec = resolve(cli)?;
    let (max_restarts, node_rank) = (spec.max_restarts, spec.node_rank);
    let outcome = supervise::run(&spec)?;
    match &outcome {
        Outcome::Success { restarts: 0 } => tracing::info!("all ranks finished successfully"),
        Outcome::Success { restarts } => {
            tracing::info!("all ranks finished successfully after {restarts} restart(s)")
        }
        Outcome::Failed(failure) => to_stderr(&failure.summary(max_restarts, node_rank)),
    }
    Ok(outcome)
}

/// A `PET_*` value that conflicts with a flag given on the command line gives way to it (a flag
/// wins over its variable, as in torchrun): `--rdzv-endpoint` over `PET_MASTER_ADDR/PORT` and
/// the other way, `--standalone` over the layout variables. Other conflicts between two flags, or
/// two variables, stay errors (`--rdzv-endpoint` beside the master flags is used, they are
/// ignored with a warning: torchrun's rule).
fn env_yields_to_flags(cli: &mut Cli, m: &clap::ArgMatches) {
    use clap::parser::ValueSource;
    let env = |id: &str| m.value_source(id) == Some(ValueSource::EnvVariable);
    let flag = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    if flag("rdzv_endpoint") || cli.standalone {
        if env("master_addr") {
            cli.master_addr = None;
        }
        if env("master_port") {
            cli.master_port = None;
        }
    }
    if (flag("master_addr") || flag("master_port") || cli.standalone) && env("rdzv_endpoint") {
        cli.rdzv_endpoint = None;
    }
    if cli.standalone {
        if env("nnodes") {
            cli.nnodes = None;
        }
        if env("node_rank") {
            cli.node_rank = None;
        }
    }
}

/// A Python or shell script named among the launcher's own arguments (before any `--`), as
/// torchrun takes it, for the hint after a usage error: how to run it after `--`
/// (`python train.py`, `./run.sh`).
fn script_before_dashes(args: impl Iterator<Item = OsString>) -> Option<String> {
    let args: Vec<String> = args
        .take_while(|a| a != "--")
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // torchrun's `-m MODULE ARGS`
    if let Some(i) = args.iter().position(|a| a == "-m" || a == "--module") {
        let module = args.get(i + 1).map_or("MODULE", String::as_str);
        return Some(format!("python -m {module}"));
    }
    // (not an option's value: `--trainer ./run.sh`)
    let script = args.iter().enumerate().find(|(i, a)| {
        !a.starts_with('-')
            && (a.ends_with(".py") || a.ends_with(".sh"))
            && (*i == 0 || args[i - 1] != "--trainer")
    })?;
    let a = script.1;
    Some(match a.ends_with(".py") {
        true => format!("python {a}"),
        false if a.contains('/') => a.clone(),
        false => format!("./{a}"),
    })
}

/// Turns the command line (plus SLURM's variables) into a validated launch.
fn resolve(cli: Cli) -> Result<LaunchSpec> {
    let command = rank_command(&cli)?;
    // (flags that set the layout themselves, or --standalone's independent runs, e.g. a sweep of
    // several runs per node, are the user's choice)
    let explicit_layout = cli.standalone || cli.nnodes.is_some() || cli.node_rank.is_some();
    let in_allocation = slurm::layout_from(|k| std::env::var(k).ok());
    if let Some(why) = in_allocation
        .as_ref()
        .filter(|_| !explicit_layout)
        .and_then(|s| s.misuse())
    {
        bail!(why);
    }
    let slurm = in_allocation.filter(|_| !cli.standalone);
    // a SLURM field is read (and its absence an error) only where no flag gives the value
    fn from_slurm<T: Clone>(field: &std::result::Result<T, String>) -> Result<T> {
        field.clone().map_err(|e| anyhow!(e))
    }

    let nnodes = match (&cli.nnodes, &slurm) {
        (Some(n), _) => parse_nnodes(n)?,
        (None, Some(s)) => from_slurm(&s.nnodes)?,
        (None, None) => 1,
    };
    let (mut master_addr, mut master_port) =
        (cli.master_addr.as_deref().map(unbracketed), cli.master_port);
    if let Some(endpoint) = &cli.rdzv_endpoint {
        // (torchrun's rule: the endpoint when given, the master flags otherwise; --standalone
        // ignores both, said below)
        if (master_addr.is_some() || master_port.is_some()) && !cli.standalone {
            tracing::warn!(
                "--rdzv-endpoint {endpoint} is used; --master-addr/--master-port are ignored (as torchrun does)"
            );
        }
        let (host, port) = split_endpoint(endpoint)?;
        master_addr = Some(host);
        master_port = port;
    }
    if let Some(backend) = &cli.rdzv_backend {
        if !matches!(backend.as_str(), "static" | "c10d") {
            bail!("--rdzv-backend {backend:?} is not supported (use static or c10d; both mean node 0's store)");
        }
    }
    // one node (--nnodes 1, e.g. in a salloc shell on any host): node 0, serving its own store
    // locally; SLURM's node id and node list (possibly naming other hosts) are not read
    let slurm_layout = slurm.as_ref().filter(|_| nnodes != 1);
    if let (1, None, Some(Ok(id))) = (nnodes, cli.node_rank, slurm.as_ref().map(|s| &s.node_rank)) {
        if *id > 0 {
            bail!(
                "--nnodes 1 on SLURM node {id} of the allocation: every node would run the job on its own; start it on one node (srun -N1), or give --nnodes for the whole allocation"
            );
        }
    }
    let mut node_rank = match (cli.node_rank, slurm_layout) {
        (Some(r), _) => r,
        (None, Some(s)) => from_slurm(&s.node_rank)?,
        (None, None) => 0,
    };
    let mut master_addr = match (master_addr, slurm_layout) {
        (Some(a), _) => a,
        (None, Some(s)) => from_slurm(&s.master_addr)?,
        (None, None) => DEFAULT_MASTER_ADDR.to_string(),
    };
    let mut master_port = master_port.unwrap_or(DEFAULT_MASTER_PORT);
    let mut nnodes = nnodes;
    if cli.standalone {
        if nnodes != 1 || node_rank != 0 {
            bail!(
                "--standalone runs a single node: drop --nnodes/--node-rank, or drop --standalone"
            );
        }
        if cli.master_addr.is_some() || cli.master_port.is_some() || cli.rdzv_endpoint.is_some() {
            // (torchrun warns the same way and serves its own store on a free local port)
            tracing::warn!(
                "--standalone serves the store on a free local port: --master-addr, --master-port and --rdzv-endpoint are ignored"
            );
        }
        (nnodes, node_rank, master_addr, master_port) = (1, 0, DEFAULT_MASTER_ADDR.to_string(), 0);
    }
    if nnodes == 0 {
        bail!("--nnodes must be at least 1");
    }
    if nnodes > 1 && cli.node_rank.is_none() && slurm_layout.is_none() {
        // (every node would take rank 0 and serve a store of its own: which launcher fails, and
        // how, would depend on who came first)
        bail!(
            "--nnodes {nnodes}: this node's rank is unknown: give each node's launcher its own --node-rank (0 on the host of --master-addr / --rdzv-endpoint); node ranks are not assigned at the store as torchrun's c10d rendezvous does (under SLURM, srun's SLURM_NODEID gives them)"
        );
    }
    if node_rank >= nnodes {
        bail!(
            "node rank {node_rank} is out of range for {nnodes} node(s) (valid: 0..={}); check --node-rank and --nnodes",
            nnodes - 1
        );
    }
    // (one node serves its store on a free port and tells its ranks, as torchrun does for
    // `--rdzv-endpoint localhost:0`, what its --standalone passes; other nodes could not find it)
    if master_port == 0 && nnodes > 1 {
        bail!("port 0 (--master-port or --rdzv-endpoint) is picked freely by node 0, and the other nodes could not find it: give every node the same fixed port");
    }
    if let Some(s) = &slurm {
        tracing::info!(
            "SLURM job {}: {nnodes} node(s), this is node {node_rank}, master {master_addr} (flags override SLURM)",
            s.job_id
        );
    }

    let nproc = nproc_per_node(&cli.nproc_per_node)?;
    // (CONFIG mode: the ranks run `trainer train CONFIG`)
    if cli.config.is_some() {
        check_config(&command, (nnodes * nproc, nproc))?;
    }
    // (`JOBID.STEPID` only when the step gave the layout: nodes started by separate sruns with
    // explicit --nnodes/--node-rank share the job id)
    let explicit_run_id = cli
        .run_id
        .clone()
        .or(slurm.as_ref().map(|s| match explicit_layout {
            true => s.job_id.clone(),
            false => s.run_id(),
        }));
    let run_id = match &explicit_run_id {
        // (a folder name under --log-dir)
        Some(id) if id.is_empty() || id.contains(['/', '\n']) || id == "." || id == ".." => {
            bail!("--run-id {id:?} must be a folder name: non-empty, without '/', not . or ..")
        }
        Some(id) => id.clone(),
        None => token::random_hex(6).context("cannot read /dev/urandom for a run id")?,
    };
    let token = store_token(nnodes, explicit_run_id.as_deref())?;

    // (the cap keeps `Instant::now() + d` from overflowing: 1e9 s is 31 years)
    let seconds = |name: &str, s: f64| -> Result<Duration> {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| d.as_secs_f64() <= 1e9)
            .ok_or_else(|| anyhow!("--{name} {s} is not a number of seconds from 0 to 1e9"))
    };
    let finish = seconds("finish-timeout", cli.finish_timeout)?;
    // (the flag wins over --rdzv-conf's timeout)
    let joined = cli
        .rdzv_conf
        .as_deref()
        .map(rdzv_conf_timeout)
        .transpose()?;
    let rdzv_timeout = cli.rdzv_timeout.or(joined.flatten()).unwrap_or(600.0);
    let rdzv_timeout = seconds("rdzv-timeout", rdzv_timeout)?;
    let monitor_interval =
        seconds("monitor-interval", cli.monitor_interval)?.max(Duration::from_millis(5));
    let grace_period = seconds("grace-period", cli.grace_period)?;
    if cli.role.is_empty() {
        bail!(
            "--role: give a name (torchrun's default: {})",
            launcher::env::DEFAULT_ROLE
        );
    }
    // (after the argument checks: a bad flag is the only line)
    let mut command = command;
    default_omp_threads(&mut command, nproc);
    // torchrun's too: PyTorch ranks abort a failed NCCL collective instead of hanging on it
    if std::env::var_os("TORCH_NCCL_ASYNC_ERROR_HANDLING").is_none() {
        let var = ("TORCH_NCCL_ASYNC_ERROR_HANDLING".into(), "1".into());
        command.extra_env.push(var);
    }
    // Ranks write into pipes (the relays prefix, tee and log them), where Python buffers whole
    // blocks: a rank's prints would show late, and never when it is stopped by a signal (on a
    // terminal, torchrun's ranks inherit it and print line by line)
    if std::env::var_os("PYTHONUNBUFFERED").is_none() {
        let var = ("PYTHONUNBUFFERED".into(), "1".into());
        command.extra_env.push(var);
    }
    let mut tee = cli.tee.unwrap_or(0);
    if let Some(r) = &cli.redirects {
        let redirected = match r.trim().parse::<u8>() {
            Ok(n) if n <= 3 => n,
            _ if r.contains(':') => bail!("--redirects {r}: per-rank maps (LOCAL_RANK:STREAMS) are not supported; use one value for every rank (0-3), and --local-ranks-filter to choose the ranks shown"),
            _ => bail!("--redirects {r}: use 3 (stdout and stderr to the --log-dir files only), 1 (stdout), 2 (stderr) or 0 (none)"),
        };
        // (our --log-dir files get every stream; torchrun's redirection is what stays off the console)
        match cli.log_dir {
            Some(_) => tee |= 3 & !redirected,
            None => tracing::info!("--redirects {redirected} without --log-dir: rank output stays on the console (there are no log files)"),
        }
    }
    if let Some(filter) = &cli.local_ranks_filter {
        if let Some(bad) = filter.iter().find(|&&r| r >= nproc) {
            bail!(
                "--local-ranks-filter {bad} is not a local rank (0 to {})",
                nproc - 1
            );
        }
    }
    // absolute: a rank that changes directory still finds its TORCHELASTIC_ERROR_FILE
    let log_dir = match &cli.log_dir {
        Some(dir) => {
            Some(std::path::absolute(dir).with_context(|| format!("--log-dir {}", dir.display()))?)
        }
        None => None,
    };
    if let Some(dir) = &log_dir {
        if dir.exists() && !dir.is_dir() {
            bail!("--log-dir {} is a file, not a folder", dir.display());
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --log-dir {}", dir.display()))?;
        if tee == 0 {
            tracing::info!(
                "rank output goes to {}/{run_id}/attempt_N/{}<local_rank>/ (add --tee to see it here too)",
                dir.display(),
                if nnodes > 1 { "node<G>/" } else { "" }
            );
        }
    }
    Ok(LaunchSpec {
        command,
        nproc,
        nnodes,
        node_rank,
        master_addr,
        master_port,
        max_restarts: cli.max_restarts,
        monitor_interval,
        grace_period,
        finish_timeout: (!finish.is_zero()).then_some(finish),
        rdzv_timeout,
        role: cli.role.clone(),
        run_id_explicit: explicit_run_id.is_some(),
        run_id,
        token,
        output: OutputOptions {
            log_dir,
            tee_stdout: tee & 1 != 0,
            tee_stderr: tee & 2 != 0,
            local_ranks_filter: cli.local_ranks_filter.clone(),
        },
    })
}

/// `--rdzv-conf`'s rendezvous timeout in seconds, if it gives one: `join_timeout` (c10d's), else
/// `timeout` (static's); its other keys (torchrun's c10d and static rendezvous') change nothing
/// here; an unknown key is an error.
fn rdzv_conf_timeout(conf: &str) -> Result<Option<f64>> {
    // torchrun's RendezvousParameters keys that have no counterpart here
    const IGNORED: [&str; 8] = [
        "read_timeout",
        "last_call_timeout",
        "close_timeout",
        "heartbeat",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "is_host",
        "use_libuv",
    ];
    let (mut join, mut timeout) = (None, None);
    for pair in conf.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--rdzv-conf {conf}: {pair} is not KEY=VALUE");
        };
        let seconds = || {
            value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| (0.0..=1e9).contains(s))
                .ok_or_else(|| {
                    anyhow!("--rdzv-conf {conf}: {pair} is not a number of seconds from 0 to 1e9")
                })
        };
        match key.trim() {
            "join_timeout" => join = Some(seconds()?),
            "timeout" => timeout = Some(seconds()?),
            k if IGNORED.contains(&k) => tracing::warn!(
                "--rdzv-conf {k}: accepted for torchrun compatibility; it changes nothing here (the store is node 0's launcher's)"
            ),
            k => bail!(
                "--rdzv-conf {conf}: unknown key {k:?} (join_timeout or timeout sets the rendezvous timeout; torchrun's {} are accepted and ignored)",
                IGNORED.join(", ")
            ),
        }
    }
    Ok(join.or(timeout))
}

/// `--tee`'s value, as torchrun takes it (`--tee 3`, `-t 3`, `-t3`, `--tee=3`); an empty
/// `PET_TEE` is none.
fn tee_streams(s: &str) -> Result<u8, String> {
    match s.trim() {
        "" => Ok(0),
        s => match s.parse::<u8>() {
            Ok(t) if t <= 3 => Ok(t),
            _ => Err("use 1 (stdout), 2 (stderr), 3 (both) or 0 (none)".into()),
        },
    }
}

/// The command line with a bare `--tee` / `-t` (ours: both streams) given its value `3` when
/// the next word is not one (`--tee train.yaml`, where clap would take the config for the
/// value); before `--` only.
fn with_tee_value(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut words = args.into_iter().peekable();
    let mut after_dashes = false;
    // (a flag, or the value clap reads)
    let tee_reads = |next: &OsString| {
        next.to_str()
            .is_some_and(|n| n.starts_with('-') || n.parse::<u8>().is_ok())
    };
    while let Some(word) = words.next() {
        let bare_tee = !after_dashes && (word == "--tee" || word == "-t");
        after_dashes |= word == "--";
        out.push(word);
        if bare_tee && words.peek().is_some_and(|next| !tee_reads(next)) {
            out.push("3".into());
        }
    }
    out
}

/// What each rank runs: `trainer train CONFIG --set ...`, or `PROGRAM ARGS` after `--`.
fn rank_command(cli: &Cli) -> Result<RankCommand> {
    match (&cli.config, cli.program.split_first()) {
        (Some(_), Some(_)) => bail!("give either CONFIG.yaml or `-- PROGRAM ARGS`, not both"),
        (None, None) => {
            bail!("nothing to run: give CONFIG.yaml (runs `trainer train`) or `-- PROGRAM [ARGS]`")
        }
        (None, Some((program, args))) => {
            if !cli.overrides.is_empty() {
                bail!(
                    "--set applies to CONFIG.yaml mode; pass options to PROGRAM after `--` instead"
                );
            }
            Ok(RankCommand {
                program: find_program(Path::new(program))?,
                args: args.to_vec(),
                extra_env: Vec::new(),
            })
        }
        (Some(config), None) => {
            let is_yaml = matches!(
                config.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            if !is_yaml {
                let program = match config.extension().and_then(|e| e.to_str()) {
                    Some("py") => format!("python {}", config.display()),
                    _ => "PROGRAM".to_string(),
                };
                bail!(
                    "{} is not a YAML config (the trainer's, e.g. configs/llava-sco.yaml); to run a program on every rank use `launcher [OPTIONS] -- {program} ARGS` (for programs that read the rank variables: one that calls torch.distributed's init_process_group(\"env://\") needs torchrun, as MASTER_PORT is this launcher's own store)",
                    config.display()
                );
            }
            if !config.is_file() {
                bail!("config file {} not found", config.display());
            }
            for o in &cli.overrides {
                if !o.contains('=') {
                    bail!("--set {o:?} needs KEY=VALUE, e.g. --set train.lr=2e-5");
                }
            }
            let trainer = match &cli.trainer {
                Some(path) => path.clone(),
                None => std::env::current_exe()
                    .context("cannot locate the launcher executable")?
                    .with_file_name("trainer"),
            };
            if !trainer.is_file() {
                // the build command of the launcher's own profile (target/release or target/debug)
                let release = trainer.parent().is_some_and(|d| d.ends_with("release"));
                bail!(
                    "trainer binary not found at {} (build it with `cargo build{} -p trainer`, or pass --trainer PATH)",
                    trainer.display(),
                    if release { " --release" } else { "" }
                );
            }
            let mut args: Vec<OsString> = vec!["train".into(), config.clone().into()];
            for o in &cli.overrides {
                args.extend(["--set".into(), o.into()]);
            }
            Ok(RankCommand {
                program: trainer,
                args,
                extra_env: Vec::new(),
            })
        }
    }
}

/// CONFIG mode: the config (with its `--set`s) is checked once, by `trainer config check`, for
/// the launch's layout (`world` ranks, `per_node` on each node), before any rank starts: a bad
/// key is then one error, not one per rank, and is not restarted `--max-restarts` times (no
/// restart can fix it).
fn check_config(command: &RankCommand, (world, per_node): (usize, usize)) -> Result<()> {
    let trainer = &command.program;
    // (the ranks run `train CONFIG [--set K=V ...]`: the check takes the same arguments)
    let mut check = std::process::Command::new(trainer);
    // (a launcher stopped now, before its ranks start, takes the check with it)
    launcher::supervise::process::dies_with_launcher(&mut check);
    let out = check
        .args(["config", "check"])
        .args(&command.args[1..])
        .args(["--world", &world.to_string()])
        .args(["--nproc-per-node", &per_node.to_string()])
        // (not a rank: a job script's exported WORLD_SIZE would prefix its error `[rank 0]`)
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("running {} config check", trainer.display()))?;
    if out.status.success() {
        return Ok(());
    }
    // (its last `error:` line: log lines may come before it)
    let stderr = String::from_utf8_lossy(&out.stderr);
    match stderr.lines().rev().find_map(|l| l.strip_prefix("error: ")) {
        Some(message) => bail!("{message}"),
        None => bail!(
            "checking the config with `{} config check` failed ({}){}{}",
            trainer.display(),
            out.status,
            if stderr.trim().is_empty() { "" } else { ":\n" },
            stderr.trim()
        ),
    }
}

/// Fails early, in one line, when the program cannot be found (rather than once per rank).
fn find_program(program: &Path) -> Result<PathBuf> {
    // torchrun runs `python SCRIPT` itself; this launcher runs programs as they are
    let python_hint = match program.extension().and_then(|e| e.to_str()) {
        Some("py") => format!(
            " (a Python script: write `-- python {} ARGS`, as torchrun's --no-python would)",
            program.display()
        ),
        _ => String::new(),
    };
    if program.components().count() > 1 {
        if is_executable(program) {
            return Ok(program.to_path_buf());
        }
        if program.is_file() {
            bail!(
                "program {} is not executable{python_hint}",
                program.display()
            );
        }
        bail!("program {} not found{python_hint}", program.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    // then beside the launcher: `launcher -- trainer bench ...` from a build folder not on PATH
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(program));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .chain(beside)
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            anyhow!(
                "program {:?} not found in PATH nor beside the launcher{python_hint}",
                program
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn parse_nnodes(text: &str) -> Result<usize> {
    // (a cap, as --nproc-per-node has: node 0 tracks every node, and a typo of 10^6 nodes would
    // wait for them all)
    const MAX_NODES: usize = 1 << 16;
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n <= MAX_NODES)
            .ok_or_else(|| anyhow!("--nnodes {text:?} is not a node count (at most {MAX_NODES})"))
    };
    match text.split_once(':') {
        None => parse(text),
        Some((lo, hi)) if parse(lo)? == parse(hi)? => parse(lo),
        Some(_) => {
            bail!("--nnodes {text}: elastic node ranges are not supported; give a fixed count")
        }
    }
}

fn nproc_per_node(text: &str) -> Result<usize> {
    let cores = || std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = match text {
        "auto" => match gpus::visible_gpus() {
            Some(g) if g.count > 0 => {
                tracing::info!("--nproc-per-node auto: {} GPU(s) ({})", g.count, g.source);
                g.count
            }
            _ => {
                tracing::info!("--nproc-per-node auto: no GPU visible, running 1 rank");
                1
            }
        },
        "gpu" => match gpus::visible_gpus() {
            Some(g) if g.count > 0 => g.count,
            Some(g) => bail!("--nproc-per-node gpu: no GPU visible ({} lists none CUDA would use); use a number or auto", g.source),
            None => bail!("--nproc-per-node gpu: no GPU visible (nvidia-smi, /proc/driver/nvidia); use a number or auto"),
        },
        "cpu" => cores(),
        n => n
            .parse()
            .map_err(|_| anyhow!("--nproc-per-node {n:?}: give a number, auto, gpu or cpu"))?,
    };
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    // (a typo's extra zeros would otherwise try to start that many processes)
    const MAX_LOCAL_RANKS: usize = 4096;
    if n > MAX_LOCAL_RANKS {
        bail!("--nproc-per-node {n}: at most {MAX_LOCAL_RANKS} ranks per node");
    }
    Ok(n)
}

/// The store's secret: LLAVA_SCO_STORE_TOKEN if exported; a fresh random one for a single node;
/// for several nodes derived from the shared run id (all nodes must agree without talking first).
fn store_token(nnodes: usize, explicit_run_id: Option<&str>) -> Result<String> {
    if let Some(token) = std::env::var(STORE_TOKEN_VAR)
        .ok()
        .filter(|t| !t.is_empty())
    {
        return Ok(token);
    }
    if nnodes == 1 {
        return token::random_hex(16).context("cannot read /dev/urandom for the store token");
    }
    match explicit_run_id {
        Some(id) => {
            tracing::info!("store token derived from the run id; export {STORE_TOKEN_VAR} on every node for a real secret");
            Ok(format!("run-id:{id}"))
        }
        None => bail!(
            "a multi-node run needs a secret shared by all nodes: pass the same --run-id to every node's launcher \
             (or export {STORE_TOKEN_VAR})"
        ),
    }
}

/// torchrun's courtesy: without OMP_NUM_THREADS, ranks would each start one thread per core.
fn default_omp_threads(command: &mut RankCommand, nproc: usize) {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / nproc).max(1);
    tracing::info!(
        "OMP_NUM_THREADS is not set: using {threads} per rank ({cores} cores / {nproc} local ranks); export it to choose"
    );
    command
        .extra_env
        .push(("OMP_NUM_THREADS".into(), threads.to_string()));
}

/// `launcher: message` lines on stderr (`launcher: warning: ...` for warnings); level from
/// LAUNCHER_LOG (default info).
struct LauncherFormat;

impl<S, N> FormatEvent<S, N> for LauncherFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            Level::INFO => "",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
        };
        write!(writer, "launcher: {level}")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("LAUNCHER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // (its report of a failed write is an eprintln!, which panics on a broken stderr; set
        // before event_format, which keeps it)
        .log_internal_errors(false)
        .event_format(LauncherFormat)
        .try_init();
}

/// `[::1]`, as torchrun's --help writes an IPv6 --master-addr, is the address ::1.
fn unbracketed(addr: &str) -> String {
    match addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(inner) => inner.to_string(),
        None => addr.to_string(),
    }
}

/// `HOST[:PORT]` of --rdzv-endpoint; an IPv6 host is written `[ADDR]` (with or without a port)
/// or bare (then without a port), as torchrun takes it.
fn split_endpoint(endpoint: &str) -> Result<(String, Option<u16>)> {
    let port = |p: &str| {
        p.parse::<u16>()
            .with_context(|| format!("--rdzv-endpoint {endpoint:?}: bad port {p:?}"))
    };
    if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .with_context(|| format!("--rdzv-endpoint {endpoint:?}: no closing ']'"))?;
        return match after {
            "" => Ok((host.to_string(), None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host.to_string(), Some(port(p)?))),
                None => bail!("--rdzv-endpoint {endpoint:?}: expected ':PORT' after ']'"),
            },
        };
    }
    match endpoint.split_once(':') {
        // two or more colons: a bare IPv6 address
        Some((_, rest)) if rest.contains(':') => Ok((endpoint.to_string(), None)),
        Some((host, p)) => Ok((host.to_string(), Some(port(p)?))),
        None => Ok((endpoint.to_string(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_like_torchrun() {
        let ok = |e: &str| split_endpoint(e).unwrap();
        assert_eq!(ok("node0:29500"), ("node0".into(), Some(29500)));
        assert_eq!(ok("node0"), ("node0".into(), None));
        assert_eq!(ok("[::1]:29500"), ("::1".into(), Some(29500)));
        assert_eq!(ok("[fe80::1]"), ("fe80::1".into(), None));
        assert_eq!(ok("::1"), ("::1".into(), None));
        for bad in ["node0:port", "[::1", "[::1]29500", "node0:99999"] {
            assert!(split_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(unbracketed("[::1]"), "::1");
        assert_eq!(unbracketed("node0"), "node0");
    }

    #[test]
    fn the_hint_replaces_claps_tip_to_pass_dashes_m() {
        let argv = ["launcher", "--nproc-per-node", "1", "-m", "pkg.train"];
        let err = Cli::command().try_get_matches_from(argv).unwrap_err();
        let full = err.render().to_string();
        assert!(full.contains("use '-- -m'"), "{full}");
        let shown = launcher::cli_note::without_tips(&full);
        assert!(
            !shown.contains("tip:") && !shown.contains("'-- -m'"),
            "{shown}"
        );
        assert!(
            shown.starts_with("error: unexpected argument '-m' found\n\nUsage:"),
            "{shown}"
        );
        assert!(
            shown.contains("For more information, try '--help'."),
            "{shown}"
        );
    }

    #[test]
    fn a_script_before_the_dashes_is_found_for_the_hint() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>().into_iter();
        let found = script_before_dashes(args(&["--nproc-per-node", "2", "train.py", "--lr"]));
        assert_eq!(found.as_deref(), Some("python train.py"));
        let sh = script_before_dashes(args(&["--trainer", "./t.sh", "go.sh", "-x"]));
        assert_eq!(sh.as_deref(), Some("./go.sh"));
        assert_eq!(script_before_dashes(args(&["c.yaml", "--", "x.py"])), None);
        // torchrun's module mode
        let m = script_before_dashes(args(&["--nproc-per-node", "2", "-m", "pkg.train", "--lr"]));
        assert_eq!(m.as_deref(), Some("python -m pkg.train"));
    }

    /// A bare --tee before CONFIG is both streams (clap would take CONFIG for its value);
    /// torchrun's `--tee 1` keeps its value; nothing after `--` changes.
    #[test]
    fn a_bare_tee_before_a_word_gets_its_value() {
        let words = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let fixed = |v: &[&str]| with_tee_value(words(v));
        let l = "launcher";
        assert_eq!(
            fixed(&[l, "--tee", "c.yaml"]),
            words(&[l, "--tee", "3", "c.yaml"])
        );
        assert_eq!(
            fixed(&[l, "-t", "c.yaml"]),
            words(&[l, "-t", "3", "c.yaml"])
        );
        for same in [
            &[l, "--tee", "1", "c.yaml"][..],
            &[l, "--tee", "--", "prog"],
            &[l, "--tee"],
            &[l, "--", "prog", "--tee", "x"],
        ] {
            assert_eq!(fixed(same), words(same));
        }
        assert_eq!(tee_streams(""), Ok(0));
        assert!(tee_streams("7").is_err() && tee_streams("x").is_err());
    }

    /// `--rdzv-conf`: join_timeout is the rendezvous timeout, torchrun's other keys pass, an
    /// unknown key or a value that is not a number is refused.
    #[test]
    fn rdzv_conf_reads_join_timeout_and_refuses_unknown_keys() {
        assert_eq!(rdzv_conf_timeout("join_timeout=900").unwrap(), Some(900.0));
        assert_eq!(
            rdzv_conf_timeout("read_timeout=60, join_timeout=30,is_host=1").unwrap(),
            Some(30.0)
        );
        assert_eq!(rdzv_conf_timeout("timeout=5").unwrap(), Some(5.0));
        assert_eq!(
            rdzv_conf_timeout("timeout=5,join_timeout=7").unwrap(),
            Some(7.0)
        );
        assert_eq!(rdzv_conf_timeout("read_timeout=5").unwrap(), None);
        let e = rdzv_conf_timeout("join_timeout=-5")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("join_timeout=-5 is not a number of seconds"),
            "{e}"
        );
        let e = rdzv_conf_timeout("join_timout=5").unwrap_err().to_string();
        assert!(e.contains("unknown key \"join_timout\""), "{e}");
        let e = rdzv_conf_timeout("join_timeout=soon")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("join_timeout=soon is not a number of seconds"),
            "{e}"
        );
        assert!(rdzv_conf_timeout("join_timeout").is_err());
    }
}
