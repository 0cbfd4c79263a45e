//! `trainer bench`: collectives, checkpoint, decode, data and step, each next to its PyTorch peer.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

/// Runs one benchmark.
pub(crate) fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Collectives {
            backend,
            sizes,
            reps,
            json,
        } => bench_collectives(&backend, &sizes, reps, json),
        BenchCommand::Checkpoint {
            mib,
            groups,
            reps,
            dir,
            json,
        } => {
            let scratch = bench_scratch(&dir);
            trainer::bench::checkpoint::main(&scratch, mib, groups, reps, json)?;
            drop_if_empty(&dir);
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Decode {
            models,
            prompt_tokens,
            new_tokens,
            reps,
            dir,
            python,
            script,
            no_peer,
            json,
            out,
            threads,
        } => {
            use trainer::bench::decode;
            clear_out(&out)?;
            let peer = python_peer(no_peer, python, script)?;
            let opts = decode::DecodeOptions {
                models: models.clone(),
                prompt_tokens,
                new_tokens,
                reps,
                dir: bench_scratch(&dir),
                peer,
                threads,
            };
            let mut all = vec![];
            for m in &models {
                let r = decode::measure(m, &opts)?;
                if json {
                    println!("{}", r.json());
                }
                all.push(r);
            }
            drop_if_empty(&dir);
            if !json {
                print!("{}", decode::table(&all));
            }
            write_out(out, all.iter().map(|m| m.json().to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Data {
            images,
            workers,
            batch_size,
            reps,
            dir,
            python,
            script,
            no_peer,
            json,
            out,
        } => {
            use trainer::bench::data;
            clear_out(&out)?;
            let peer = python_peer(no_peer, python, script)?;
            let opts = data::DataBenchOptions {
                images,
                workers,
                batch_size,
                reps,
                dir: bench_scratch(&dir),
                peer,
            };
            let (stages, ms) = data::run(&opts)?;
            drop_if_empty(&dir);
            let lines: String = std::iter::once(stages.json())
                .chain(ms.iter().map(|m| m.json()))
                .map(|l| format!("{l}\n"))
                .collect();
            if json {
                print!("{lines}");
            } else {
                print!("{}{}", data::table(&ms), stages.line());
            }
            write_out(out, lines.lines().map(str::to_string))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Step {
            models,
            modes,
            batch,
            seq,
            steps,
            warmup,
            threads,
            dir,
            python,
            script,
            no_peer,
            sharding,
            json,
            out,
        } => {
            let code = bench_step(
                trainer::bench::step::StepOptions {
                    models,
                    modes,
                    batch,
                    seq,
                    steps: steps.max(1),
                    warmup,
                    threads: threads.unwrap_or_else(default_bench_threads),
                    dir: bench_scratch(&dir),
                    peer: (!no_peer).then_some((python, script)),
                    sharding,
                },
                json,
                out,
            );
            drop_if_empty(&dir);
            code
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// all_gather / reduce_scatter / all_reduce time and bus bandwidth at 1-256 MiB; one per rank
    /// under the launcher. Example: launcher --nproc-per-node 2 -- trainer bench collectives --json
    Collectives {
        /// cpu, tcp (the cpu backend over TCP), nccl or auto
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Buffer sizes in MiB
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        sizes: Vec<usize>,
        /// Timed repetitions per size (median reported)
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// One JSON object per measurement
        #[arg(long)]
        json: bool,
    },
    /// Save / load throughput of the checkpoint format on synthetic state (CPU backend); one per
    /// rank under the launcher. Example: launcher --nproc-per-node 2 -- trainer bench checkpoint --json
    Checkpoint {
        /// Total state (fp32 weights + 2 AdamW moments) over all ranks, MiB
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Flat tensors the state is split into
        #[arg(long, default_value_t = 16)]
        groups: usize,
        /// Repetitions (median reported)
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Where the checkpoints are written (in its subfolder .llava-sco-bench, removed afterwards)
        #[arg(long, default_value = "bench-results/checkpoint-tmp")]
        dir: PathBuf,
        /// One JSON object per measurement
        #[arg(long)]
        json: bool,
    },
    /// Greedy decoding speed of `trainer infer`'s engine (time to first token, decode tokens/s) on
    /// random tiny and ~100M-parameter models, next to transformers' generate (scripts/bench_decode.py).
    /// Example: trainer bench decode --json
    Decode {
        /// Models: tiny, 100m
        #[arg(long, value_delimiter = ',', default_value = "tiny,100m")]
        models: Vec<String>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Timed repetitions (median reported)
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Where the model folders are written (in its subfolder .llava-sco-bench, removed afterwards)
        #[arg(long, default_value = "bench-results/decode-tmp")]
        dir: PathBuf,
        /// Python with torch + transformers for the peer
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        #[arg(long, default_value = "scripts/bench_decode.py")]
        script: PathBuf,
        /// Skip the transformers peer
        #[arg(long)]
        no_peer: bool,
        /// One JSON object per measurement
        #[arg(long)]
        json: bool,
        /// Also write the JSON lines to this file
        #[arg(long)]
        out: Option<PathBuf>,
        /// CPU threads of both sides (0 = libtorch's default; 1 is steadier on a busy machine)
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Samples/s of the whole data pipeline (decode, resize/pad/tile, normalize, template,
    /// tokenize, mask, collate) on generated JPEGs at 560-px tiles, per core, next to
    /// transformers' MllamaProcessor + the seed's masking (scripts/bench_data.py).
    /// Example: trainer bench data --json
    Data {
        /// Generated JPEGs (samples), about 640x480 to 2000x1500
        #[arg(long, default_value_t = 512)]
        images: usize,
        /// Worker thread counts to measure (data.num_workers)
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        workers: Vec<usize>,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Full passes per side (median reported)
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Where the inputs are written (in its subfolder .llava-sco-bench, removed afterwards)
        #[arg(long, default_value = "bench-results/data-tmp")]
        dir: PathBuf,
        /// Python with transformers for the peer
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        #[arg(long, default_value = "scripts/bench_data.py")]
        script: PathBuf,
        /// Skip the transformers peer
        #[arg(long)]
        no_peer: bool,
        /// One JSON object per worker count
        #[arg(long)]
        json: bool,
        /// Also write the JSON lines to this file
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Optimizer-step time (LoRA and full finetuning, fp32 CPU) on random tiny and ~100M models,
    /// next to transformers + peft (scripts/bench_step.py) on the same folder and batches; under
    /// the launcher, our FSDP engine against PyTorch FSDP2 (fully_shard) over gloo at the same W.
    /// Example: launcher --standalone --nproc-per-node 2 -- trainer bench step --json
    Step {
        /// Models: tiny, 100m
        #[arg(long, value_delimiter = ',', default_value = "tiny,100m")]
        models: Vec<String>,
        /// lora, full
        #[arg(long, value_delimiter = ',', default_value = "lora,full")]
        modes: Vec<String>,
        /// Samples per optimizer step (global; split across ranks)
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sample
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed steps (median reported)
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Intra-op threads per rank, both sides (default: cores / local ranks)
        #[arg(long)]
        threads: Option<usize>,
        /// Where model folders and batches are written (in its subfolder .llava-sco-bench, removed afterwards)
        #[arg(long, default_value = "bench-results/step-tmp")]
        dir: PathBuf,
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        #[arg(long, default_value = "scripts/bench_step.py")]
        script: PathBuf,
        /// Skip the PyTorch peer
        #[arg(long)]
        no_peer: bool,
        /// Our engine's fsdp.sharding_strategy under the launcher; the peer is FSDP2 for
        /// full_shard and shard_grad_op, DDP for no_shard
        #[arg(long, default_value = "full_shard", value_parser = parse_sharding)]
        sharding: trainer::config::ShardingStrategy,
        /// One JSON object per measurement
        #[arg(long)]
        json: bool,
        /// Also write the JSON lines to this file (rank 0)
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// --sharding: a `fsdp.sharding_strategy` name.
fn parse_sharding(s: &str) -> Result<trainer::config::ShardingStrategy, String> {
    use trainer::config::ShardingStrategy;
    ShardingStrategy::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = ShardingStrategy::ALL.iter().map(|(_, n)| *n).collect();
        format!("`{s}`: expected one of {}", names.join(", "))
    })
}

/// `--out FILE`: the measurements' JSON lines, when given, each with where and when it was
/// measured (`provenance`).
fn write_out(out: Option<PathBuf>, lines: impl Iterator<Item = String>) -> Result<()> {
    let Some(path) = out else {
        return Ok(());
    };
    let provenance = provenance();
    let text: String = lines
        .map(|l| match serde_json::from_str::<serde_json::Value>(&l) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.insert("provenance".into(), provenance.clone());
                serde_json::Value::Object(m).to_string()
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// `--out FILE` removed before measuring: a run that fails leaves no earlier run's results that
/// look like this one's.
fn clear_out(out: &Option<PathBuf>) -> Result<()> {
    match out.as_deref().map(std::fs::remove_file) {
        Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
            "{}: cannot remove the earlier results: {e}",
            out.as_deref().unwrap_or(std::path::Path::new("")).display()
        )),
        _ => Ok(()),
    }
}

/// When and on what a measurement was made: unix time, this machine's cores and 1-minute load
/// average, this binary's build profile, and the git commit of the working directory (null
/// outside a checkout) with whether its tracked files had changes (the binary is built from the
/// checkout by `make bench`, not necessarily otherwise).
fn provenance() -> serde_json::Value {
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    // (--no-optional-locks: no index.lock taken beside a git command running in the checkout)
    let dirty = commit
        .as_ref()
        .and_then(|_| {
            git(&[
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
            ])
        })
        .map(|s| !s.is_empty());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    serde_json::json!({"unix_time": unix_time, "cores": cores, "loadavg_1m": loadavg,
        "profile": profile, "commit": commit, "dirty": dirty})
}

/// The Python peer of a benchmark (`.venv`'s python + its script), or None with `--no-peer`.
fn python_peer(
    no_peer: bool,
    python: PathBuf,
    script: PathBuf,
) -> Result<Option<(PathBuf, PathBuf)>> {
    if no_peer {
        return Ok(None);
    }
    anyhow::ensure!(
        python.exists() && script.exists(),
        "the transformers peer needs {} and {} (run from the repository root after `make setup`), or pass --no-peer",
        python.display(),
        script.display()
    );
    Ok(Some((python, script)))
}

/// Cores of this host shared by its local ranks.
fn default_bench_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local: usize = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (cores / local.max(1)).max(1)
}

fn bench_step(
    o: trainer::bench::step::StepOptions,
    json: bool,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    use trainer::bench::step;
    clear_out(&out)?;
    if let Some((python, script)) = &o.peer {
        anyhow::ensure!(
            python.exists() && script.exists(),
            "the PyTorch peer needs {} and {} (run from the repository root after `make setup`), or pass --no-peer",
            python.display(),
            script.display()
        );
    }
    // the other ranks wait at a barrier while rank 0 runs the PyTorch peer of each row, which
    // can take many minutes for the ~100M model on a busy machine
    let pg = trainer::dist::ProcessGroup::from_env(
        trainer::dist::Backend::Cpu,
        std::time::Duration::from_secs(3600),
    )?;
    let all = step::run(&pg, &o)?;
    if pg.rank() != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        for m in &all {
            println!("{}", m.json());
        }
    } else {
        print!("{}", step::table(&all));
    }
    write_out(out, all.iter().map(|m| m.json().to_string()))?;
    Ok(ExitCode::SUCCESS)
}

fn bench_collectives(backend: &str, sizes: &[usize], reps: usize, json: bool) -> Result<ExitCode> {
    use anyhow::Context;
    use trainer::dist::{Backend, ProcessGroup};
    let backend = match backend {
        "cpu" => Backend::Cpu,
        "tcp" => Backend::Tcp,
        "nccl" => Backend::Nccl,
        "auto" => Backend::Auto,
        other => anyhow::bail!("--backend: expected cpu, tcp, nccl or auto, got {other:?}"),
    };
    let pg = ProcessGroup::from_env(backend, std::time::Duration::from_secs(600))
        .context("setting up the process group")?;
    let device = if pg.backend_name() == "nccl" {
        tch::Device::Cuda(launcher::env::RankEnv::from_env()?.local_rank)
    } else {
        tch::Device::Cpu
    };
    let results = trainer::bench::collectives::run(&pg, sizes, reps.max(1), device)?;
    if pg.rank() == 0 {
        if !json {
            println!(
                "{:<15} {:>10} {:>12} {:>12}   ({} backend, world {})",
                "op",
                "MiB",
                "seconds",
                "busbw GB/s",
                pg.backend_name(),
                pg.world_size()
            );
        }
        for m in &results {
            if json {
                println!(
                    "{}",
                    trainer::bench::collectives::json_line(
                        m,
                        pg.backend_name(),
                        pg.transport(),
                        pg.world_size()
                    )
                );
            } else {
                println!(
                    "{:<15} {:>10.1} {:>12.6} {:>12.3}",
                    m.op,
                    m.bytes as f64 / (1 << 20) as f64,
                    m.seconds,
                    m.busbw_gbps
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The folder a benchmark works in and removes afterwards: a subfolder of `--dir`, so that a
/// `--dir` holding anything else (checkpoints, a working tree) loses nothing.
fn bench_scratch(dir: &std::path::Path) -> PathBuf {
    dir.join(".llava-sco-bench")
}

/// After a benchmark: removes its scratch folder and `dir` if they are empty (nothing else).
fn drop_if_empty(dir: &std::path::Path) {
    let _ = std::fs::remove_dir(bench_scratch(dir));
    let _ = std::fs::remove_dir(dir);
}
