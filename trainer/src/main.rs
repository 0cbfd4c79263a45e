//! `trainer`: one rank of a LLaVA-SCo run, plus the tools around it (config, data, infer, eval,
//! export, bench). Thin over the library: parse, dispatch, decide the exit code; the larger
//! subcommands are in `cmd/`.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use launcher::error_file::Cause;

use trainer::config;

mod cmd;
use cmd::bench::BenchCommand;
use cmd::eval::{CompareArgs, EvalArgs};
use cmd::infer::{print_prompt_settings, InferArgs};

const EXAMPLES: &str = "\
Examples:
  launcher --nproc-per-node 2 configs/llava-sco.yaml      # train on 2 ranks (runs `trainer train` per rank)
  trainer train configs/demo.yaml --set train.max_steps=10
  trainer config show configs/llava-sco.yaml --set train.lr=2e-5
  trainer infer --model M --adapter A --image x.jpg --question \"...\" --turns 2
  trainer eval --model M --adapter A --data bench.jsonl --image-root imgs --turns 3 --out report/";

#[derive(Parser)]
#[command(name = "trainer", version, about = "LLaVA-SCo trainer: FSDP + LoRA training, inference and evaluation of Mllama", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A config file and its `--set KEY=VALUE` overrides.
#[derive(Args)]
struct ConfigArgs {
    /// YAML config (see configs/ and `trainer config show`)
    config: PathBuf,
    /// Override one key, e.g. `--set train.lr=2e-5` or `--set peft.target_modules=[q_proj,v_proj]`
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

/// A count of at least 1 (a `usize` flag's parser).
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Args)]
struct ConfigCheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Also check the config for a run of this many ranks (fsdp.enabled: false trains one;
    /// hybrid_shard's groups must divide them)
    #[arg(long, value_name = "N", value_parser = positive)]
    world: Option<usize>,
    /// Ranks per node, with --world (hybrid_shard's default shard group) [default: --world]
    #[arg(long, value_name = "N", requires = "world", value_parser = positive)]
    nproc_per_node: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Train one rank (reads torchrun's RANK/WORLD_SIZE; world size 1 without a launcher).
    /// Example: trainer train configs/demo.yaml --set train.max_steps=10
    Train(ConfigArgs),
    /// Inspect configs. Example: trainer config show configs/llava-sco.yaml --set train.lr=2e-5
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Data tools: check, dump, build-sco. Example: trainer data check configs/demo.yaml
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate with self-correction turns (greedy with --temperature 0; --adapter or --checkpoint).
    /// Example: trainer infer --model M --adapter A --image x.jpg --question "..." --turns 2
    Infer(InferArgs),
    /// Score a benchmark turn by turn (greedy by default), resumable; writes predictions and reports.
    /// Example: trainer eval --model M --data b.jsonl --image-root i --turns 3 --out r/
    Eval(EvalArgs),
    /// Compare two evaluations of the same benchmark question by question (paired exact McNemar
    /// per turn, and each one's last turn). Example: trainer compare report-base/ report-trained/
    Compare(CompareArgs),
    /// Export a checkpoint as a PEFT adapter, or (--format merged) as a full HF model folder.
    /// Example: trainer export --checkpoint ckpt/step-00000500 --out adapter/ --format peft
    Export(ExportArgs),
    /// Benchmarks: collectives, data, step, checkpoint, decode (each next to its PyTorch peer).
    /// Example: launcher --nproc-per-node 2 -- trainer bench collectives --json
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Generate the demo's data (shape scenes, SCo records, a test bench) and tiny model folder;
    /// cached when the same options made it. Example: trainer demo-data --out data/demo
    DemoData(DemoDataArgs),
    /// Demo helpers: `table` prints the final results and writes the plots.
    /// Example: trainer demo-model table --base B --after A --metrics M --bench B --chance C --out D
    #[command(subcommand)]
    DemoModel(DemoModelCommand),
}

/// `trainer demo-data`.
#[derive(Args)]
struct DemoDataArgs {
    /// Output folder (train.jsonl, val.jsonl, test.jsonl, images/, model/)
    #[arg(long, default_value = "data/demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Training records (configs/demo.yaml's 160 steps are one pass over 1280)
    #[arg(long, default_value_t = 1280)]
    train: usize,
    /// Validation records
    #[arg(long, default_value_t = 64)]
    val: usize,
    /// Held-out benchmark questions
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Image side in pixels = the model's tile size (a multiple of 14)
    #[arg(long, default_value_t = 112)]
    image_size: u32,
    /// BPE vocabulary size before the 257 special tokens
    #[arg(long, default_value_t = 600)]
    bpe_vocab: usize,
}

/// `trainer demo-model ...`.
#[derive(Subcommand)]
enum DemoModelCommand {
    /// The final table (accuracy per turn before/after, transitions, chance per question type) and plots.
    Table {
        /// `trainer eval --out` folder of the base model
        #[arg(long)]
        base: PathBuf,
        /// `trainer eval --out` folder after training
        #[arg(long)]
        after: PathBuf,
        /// metrics.jsonl of the training run
        #[arg(long)]
        metrics: PathBuf,
        /// The bench (test.jsonl) and chance.json of the demo data
        #[arg(long)]
        bench: PathBuf,
        #[arg(long)]
        chance: PathBuf,
        #[arg(long)]
        wall_seconds: Option<f64>,
        /// The `trainer eval --limit` used (majority answers over the same questions)
        #[arg(long)]
        limit: Option<usize>,
        /// Where table.md, loss.svg and accuracy.svg go
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the resolved config (defaults filled in, overrides applied, validated) as YAML.
    Show(ConfigArgs),
    /// Check that the config can train (what `trainer train` refuses before loading anything;
    /// the launcher runs this once before starting ranks, with its layout). Example: trainer config check configs/llava-sco.yaml --world 8 --nproc-per-node 8
    Check(ConfigCheckArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate every record and image and print statistics; exit 1 when a problem would stop
    /// training. Example: trainer data check configs/demo.yaml
    Check(DataCheckArgs),
    /// Write the exact tensors of one global batch (of a run at --world ranks). Example: trainer data dump CONFIG --index 0 --out b.safetensors
    Dump(DumpArgs),
    /// Convert the seed's refinement JSON into SCo records. Example: trainer data build-sco r.json --out sco.jsonl
    BuildSco(BuildScoArgs),
}

/// `trainer data check`.
#[derive(Args)]
struct DataCheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// World size of the run to check for (the global batch, the steps per epoch and the samples
    /// left over depend on it)
    #[arg(long, default_value_t = 1, value_parser = positive)]
    world: usize,
}

/// `trainer data dump`.
#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Global batch index within the epoch (train.batch_size x world x train.grad_accum samples):
    /// what step index + 1 of the epoch trains on
    #[arg(long, allow_negative_numbers = true)]
    index: u64,
    /// World size of the run to reproduce (the sampler depends on the global batch); each rank's
    /// part is named rank{r}.input_ids etc. when above 1
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    world: u32,
    /// Epoch whose shuffle to use
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Output safetensors file
    #[arg(long)]
    out: PathBuf,
    /// Also print each sample's text with the supervised spans marked [[...]]
    #[arg(long)]
    text: bool,
}

/// `trainer data build-sco`.
#[derive(Args)]
struct BuildScoArgs {
    /// JSON list of {question, original_answer, refined_answer, image_path}
    refined: PathBuf,
    /// Output JSONL of two-turn self-correction records
    #[arg(long)]
    out: PathBuf,
    /// The second user turn of every record (what infer and eval ask the trained model with)
    #[arg(long, default_value = trainer::data::records::DEFAULT_CORRECTION_PROMPT)]
    correction_prompt: String,
}

/// `trainer export`.
#[derive(Args)]
struct ExportArgs {
    /// A checkpoint folder (`checkpoint.dir/step-N`)
    #[arg(long, required_unless_present = "adapter", conflicts_with = "adapter")]
    checkpoint: Option<PathBuf>,
    /// merged only: a PEFT LoRA adapter folder to merge into --model instead of a checkpoint
    /// (PEFT's merge_and_unload; either key naming)
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output folder
    #[arg(long)]
    out: PathBuf,
    /// peft: adapter_config.json + adapter_model.safetensors; merged: a full HF model folder
    /// (LoRA merged into the base weights, sharded safetensors + config and tokenizer files)
    #[arg(long, value_enum, default_value_t = ExportFormat::Peft)]
    format: ExportFormat,
    /// merged only: the base model folder (default: the model.path recorded in the checkpoint,
    /// or the adapter's base_model_name_or_path when that is a folder)
    #[arg(long)]
    model: Option<PathBuf>,
    /// merged only: largest weight file (default 5GB = 5e9 bytes; 2GiB = 2^31; HF naming above
    /// one shard)
    #[arg(long)]
    max_shard_size: Option<String>,
    /// peft only: the adapter's key naming. hf5: transformers >= 4.52 (current peft); hf4:
    /// transformers 4.45-4.51, the seed's stack (it loads nothing from hf5 keys, with no error)
    #[arg(long, value_enum)]
    naming: Option<trainer::checkpoint::AdapterNaming>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    Peft,
    Merged,
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Config(ConfigCommand::Show(args)) => {
            let resolved = config::load(&args.config, &args.overrides)?;
            print!("{}", resolved.to_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check(args)) => {
            let (file, sets) = (&args.config.config, &args.config.overrides);
            let resolved = config::load(file, sets)?;
            let in_file = |e| config::in_file(file, sets, e);
            config::training_conflicts(&resolved).map_err(in_file)?;
            let mut multi_node = false;
            if let Some(world) = args.world {
                let per_node = args.nproc_per_node.unwrap_or(world);
                config::world_conflicts(&resolved, world, per_node).map_err(in_file)?;
                multi_node = world > per_node;
            }
            trainer::checkpoint::check_resume_setting(&resolved)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            // (across nodes the paths are each node's: one node's launcher stopping before the
            // rendezvous would leave the others waiting for it; its ranks check them instead,
            // after the group formed, and the group fails together)
            // (and the model's structure with the adapter's layout: the same on every node)
            let mut summary = None;
            if !multi_node {
                config::missing_paths(&resolved).map_err(in_file)?;
                summary = Some(anyhow::Context::with_context(
                    trainer::train::check_model(&resolved),
                    || format!("{}: the model and its adapter layout", file.display()),
                )?);
            }
            println!("{}: config ok", file.display());
            for note in trainer::train::config_notes(&resolved) {
                println!("note: {note}");
            }
            if let Some((summary, warnings)) = summary {
                println!("{summary}");
                for w in warnings {
                    println!("warning: {w}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare(args) => cmd::eval::compare(args),
        Command::Train(args) => {
            let resolved = config::load(&args.config, &args.overrides)?;
            // (a config error found by `train`, a missing path or a conflict, named with the
            // file and its --set as `load` names its own)
            let outcome = trainer::train::train(&resolved).map_err(|e| match e
                .downcast::<config::ConfigError>()
            {
                Ok(c) => config::in_file(&args.config, &args.overrides, c).into(),
                Err(e) => e,
            })?;
            // (under the launcher: which rank the signal was sent to, the others its messengers)
            if let Some((message, elsewhere)) = &outcome.stop_note {
                let cause = elsewhere.map_or(Cause::ThisRank, |r| Cause::AnotherRank(Some(r)));
                launcher::error_file::record(message, "", cause);
            }
            // 128 + the signal that stopped it cleanly after a step (143 for SIGTERM and for
            // SIGUSR1's notice, 130 for Ctrl-C)
            Ok(match outcome.stopped_by {
                Some(sig) => ExitCode::from(trainer::train::stop_exit_code(sig)),
                None => ExitCode::SUCCESS,
            })
        }
        Command::Data(DataCommand::Check(DataCheckArgs {
            config: args,
            world,
        })) => {
            let resolved = config::load(&args.config, &args.overrides)?;
            // (the paths `trainer train` checks first: one error, not one per record)
            config::missing_data_paths(&resolved)
                .map_err(|c| config::in_file(&args.config, &args.overrides, c))?;
            // (text-only samples' lengths as the run the config resumes renders them: its date)
            use_resumed_template_clock(&resolved);
            let outcome = trainer::data::tools::check(&resolved, world)?;
            print!("{}", outcome.text);
            if outcome.failed {
                eprintln!("error: {}", outcome.summary);
                Ok(ExitCode::FAILURE)
            } else {
                println!("{}", outcome.summary);
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Data(DataCommand::Dump(args)) => {
            let resolved = config::load(&args.config.config, &args.config.overrides)?;
            use_resumed_template_clock(&resolved);
            let msg = trainer::data::tools::dump(
                &resolved,
                args.epoch,
                args.index,
                args.world as usize,
                &args.out,
                args.text,
            )?;
            print!("{msg}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::BuildSco(args)) => {
            let o = trainer::data::tools::build_sco_file(
                &args.refined,
                &args.out,
                Some(&args.correction_prompt),
            )?;
            let entries = |n: usize| format!("{n} {}", if n == 1 { "entry" } else { "entries" });
            println!(
                "wrote {} record(s) to {}; skipped {} with an empty refined_answer; {} malformed",
                o.written,
                args.out.display(),
                entries(o.skipped_empty_refined),
                o.problems.len()
            );
            for p in &o.problems {
                eprintln!("{}: {p}", args.refined.display());
            }
            if o.without_image > 0 {
                eprintln!(
                    "warning: {} without an image_path, written as text-only records (training drops them unless data.text_only: keep)",
                    entries(o.without_image)
                );
            }
            if o.problems.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "error: {} malformed in {} (listed above); the output holds the others",
                    entries(o.problems.len()),
                    args.refined.display()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Infer(args) => cmd::infer::infer(args),
        Command::Eval(args) => cmd::eval::eval(args),
        Command::Bench(command) => cmd::bench::run(command),
        Command::Export(args) => match args.format {
            ExportFormat::Peft => {
                // (an adapter has no base weights to take from --model, nor shards)
                for (flag, given) in [
                    ("--model", args.model.is_some()),
                    ("--max-shard-size", args.max_shard_size.is_some()),
                ] {
                    anyhow::ensure!(
                        !given,
                        "{flag} is for --format merged; a PEFT adapter is written without it"
                    );
                }
                let Some(checkpoint) = args.checkpoint else {
                    anyhow::bail!(
                        "--adapter is for --format merged: an adapter folder is PEFT's format already"
                    );
                };
                use trainer::checkpoint::AdapterNaming;
                let naming = args.naming.unwrap_or_default();
                let n = trainer::checkpoint::export_peft(&checkpoint, &args.out, naming)
                    .map_err(|e| trainer::checkpoint::load::for_reading(e, &checkpoint))?;
                let named = match naming {
                    AdapterNaming::Hf4 => "transformers-4 key naming",
                    AdapterNaming::Hf5 => "transformers-5 key naming; --naming hf4 for a transformers 4.45-4.51 stack such as the seed's",
                };
                println!(
                    "wrote {} ({n} LoRA tensors, {named}) from {}",
                    args.out.display(),
                    checkpoint.display()
                );
                print_prompt_settings(&args.out);
                Ok(ExitCode::SUCCESS)
            }
            ExportFormat::Merged => {
                anyhow::ensure!(
                    args.naming.is_none(),
                    "--naming is for --format peft; a merged folder is named as its base model"
                );
                let max = trainer::checkpoint::parse_size(
                    args.max_shard_size
                        .as_deref()
                        .unwrap_or(trainer::checkpoint::merged::DEFAULT_MAX_SHARD),
                )?;
                use trainer::checkpoint::MergeSource;
                let (source, from) = match (&args.checkpoint, &args.adapter) {
                    (Some(c), _) => (MergeSource::Checkpoint(c), c),
                    (None, Some(a)) => (MergeSource::Adapter(a), a),
                    (None, None) => unreachable!("clap requires --checkpoint or --adapter"),
                };
                let s = trainer::checkpoint::export_merged(
                    source,
                    &args.out,
                    args.model.as_deref(),
                    max,
                )
                .map_err(|e| match &args.checkpoint {
                    Some(c) => trainer::checkpoint::load::for_reading(e, c),
                    None => e,
                })?;
                println!(
                    "wrote {} ({} tensors, {} LoRA-merged, {} replaced by trained weights; {:.1} MB in {}) from {}",
                    args.out.display(),
                    s.tensors,
                    s.merged,
                    s.replaced,
                    s.total_bytes as f64 / 1e6,
                    s.files.join(", "),
                    from.display()
                );
                print_prompt_settings(&args.out);
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::DemoData(a) => {
            anyhow::ensure!(
                a.image_size % 14 == 0 && a.image_size >= 28,
                "--image-size must be a multiple of 14 (the patch size) and at least 28, got {}",
                a.image_size
            );
            let opts = trainer::demo::DemoOptions {
                out: a.out,
                seed: a.seed,
                train: a.train,
                val: a.val,
                test: a.test,
                image_size: a.image_size,
                bpe_vocab: a.bpe_vocab,
            };
            let t = std::time::Instant::now();
            let s = trainer::demo::generate(&opts)?;
            if s.cached {
                println!(
                    "demo data: reusing {} (same seed and sizes; {} records, {} parameters)",
                    opts.out.display(),
                    s.records,
                    s.parameters
                );
            } else {
                println!(
                    "demo data: wrote {} in {:.1} s: {} train + {} val records ({} with a wrong first turn), {} test questions, model with {} parameters",
                    opts.out.display(),
                    t.elapsed().as_secs_f64(),
                    opts.train,
                    opts.val,
                    s.first_turn_wrong,
                    opts.test,
                    s.parameters
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoModel(DemoModelCommand::Table {
            base,
            after,
            metrics,
            bench,
            chance,
            wall_seconds,
            limit,
            out,
        }) => {
            let text = trainer::demo::report::table(&trainer::demo::report::TableInputs {
                base: &base,
                after: &after,
                metrics: &metrics,
                bench: &bench,
                chance: &chance,
                wall_seconds,
                limit,
                out: &out,
            })?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    trainer::logging::init();
    remember_panics();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // a config's settings given as flags (`train CONFIG.yaml --use_peft`): the --set
            // that sets them, instead of clap's tip to pass the flag as a value
            match launcher::cli_note::for_clap_error(&e) {
                Some(note) => {
                    launcher::outcome::to_stderr(&launcher::cli_note::with_note(&e, &note));
                    return ExitCode::from(e.exit_code() as u8);
                }
                None => e.exit(),
            }
        }
    };
    // for the launcher's (or torchrun's) summary, `TORCHELASTIC_ERROR_FILE` gets the error that
    // ends the process: its whole chain and each cause, or the panic that unwound out of `run`
    // (panics caught on the way, e.g. a decoder's on a malformed image, are not recorded)
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            // (each line with the rank's prefix, as its log lines: ranks' errors interleave)
            let text = format!("error: {err:#}");
            // (not eprintln!: it panics on a broken stderr, and the error file would be lost)
            let text = match trainer::logging::rank_prefix() {
                Some(p) => text.lines().map(|line| format!("{p} {line}\n")).collect(),
                None => format!("{text}\n"),
            };
            launcher::outcome::to_stderr(&text);
            launcher::error_file::record(&format!("{err:#}"), &error_detail(&err), cause(&err));
            ExitCode::FAILURE
        }
        Err(payload) => {
            // the panic that ended `run` is the payload's; the hook's record of it (with its
            // place and backtrace) only when it is that one: a panic caught on another thread
            // since (a decoder's on a malformed image, under bad_records: skip) is not the cause
            let last = LAST_PANIC.lock().ok().and_then(|mut p| p.take());
            let payload = trainer::logging::panic_message(payload.as_ref());
            // print!/println! to a stdout that cannot be written: a reader that closed the pipe
            // (`| head`) ends the output quietly with a shell's status for SIGPIPE (a failed
            // command does not pass for a success under pipefail), another failure (a full
            // disk) is an error
            if let Some(why) = payload.strip_prefix(STDOUT_FAILED) {
                if why.contains(&format!("(os error {})", libc::EPIPE)) {
                    return ExitCode::from(BROKEN_PIPE_STATUS);
                }
                let message = format!("writing to stdout failed{why} (a full disk, or an output that cannot be written?)");
                let text = match trainer::logging::rank_prefix() {
                    Some(p) => format!("{p} error: {message}\n"),
                    None => format!("error: {message}\n"),
                };
                launcher::outcome::to_stderr(&text);
                launcher::error_file::record(&message, &message, Cause::ThisRank);
                return ExitCode::FAILURE;
            }
            let (mut message, detail) = panic_record(&payload, last);
            // (libtorch's allocation failures reach us as panics of tch's ops)
            if let Some(hint) = out_of_memory_hint(&message) {
                let text = match trainer::logging::rank_prefix() {
                    Some(p) => format!("{p} error: {hint}\n"),
                    None => format!("error: {hint}\n"),
                };
                launcher::outcome::to_stderr(&text);
                message = format!("{hint}: {message}");
            }
            launcher::error_file::record(&message, &detail, Cause::ThisRank);
            ExitCode::from(101) // (Rust's exit code for a panic)
        }
    }
}

/// The data of the run the config resumes renders that run's chat-template date (what its
/// text-only samples trained on), not today's: `data check` and `data dump` show what it trains.
fn use_resumed_template_clock(resolved: &config::Config) {
    if let Some(clock) = trainer::checkpoint::resumed_template_clock(resolved) {
        trainer::data::template::use_template_clock(clock);
    }
}

/// Whether `err` is this rank's own or one it reports because another rank failed an agreed
/// check (the launcher then names that rank as the root cause).
fn cause(err: &anyhow::Error) -> Cause {
    use trainer::dist::FailedElsewhere;
    use trainer::eval::EvalError;
    let elsewhere = err
        .chain()
        .find_map(|c| match c.downcast_ref::<EvalError>() {
            Some(EvalError::Elsewhere(f)) => Some(f.rank),
            _ => c.downcast_ref::<FailedElsewhere>().map(|f| f.rank),
        });
    elsewhere.map_or(Cause::ThisRank, Cause::AnotherRank)
}

/// An error's detail for the error file, innermost last as a Python traceback (the launcher
/// shows its last lines): with a captured backtrace (RUST_BACKTRACE=1), this program's frames
/// only, then the error and its causes, each on its own lines.
fn error_detail(err: &anyhow::Error) -> String {
    detail_of(&format!("{err:?}"))
}

/// `error_detail` of an error's `{:?}` text (the chain, then anyhow's "Stack backtrace:").
fn detail_of(debug: &str) -> String {
    let Some((chain, backtrace)) = debug.split_once("\n\nStack backtrace:\n") else {
        return debug.to_string();
    };
    // frames are "  N: symbol" followed by "      at file:line" lines
    let mut ours = String::new();
    let mut keep = false;
    for line in backtrace.lines() {
        let t = line.trim_start();
        if t.starts_with("at ") {
            if keep {
                ours.push_str(line);
                ours.push('\n');
            }
            continue;
        }
        let symbol = t.split_once(": ").map_or(t, |(_, s)| s);
        keep = ["trainer::", "launcher::", "kernels::"]
            .iter()
            .any(|c| symbol.starts_with(c) || symbol.starts_with(&format!("<{c}")));
        if keep {
            ours.push_str(line);
            ours.push('\n');
        }
    }
    // (none of this program's frames resolved: the chain alone, not an empty heading)
    match ours.is_empty() {
        true => chain.to_string(),
        false => {
            format!("Stack backtrace (this program's frames, outermost last):\n{ours}\n{chain}")
        }
    }
}

/// The error file's (message, detail) for the panic whose message is `message`: the hook's
/// record of the latest panic (`last`, with its place and backtrace) when it is that one, else
/// the message alone.
fn panic_record(message: &str, last: Option<(String, String)>) -> (String, String) {
    match last {
        Some((m, d)) if m.ends_with(&format!(": {message}")) => (m, d),
        _ => (format!("panic: {message}"), message.to_string()),
    }
}

/// What to do about a panic that is libtorch failing to allocate (CUDA's "out of memory", the
/// CPU allocator's "can't allocate memory"); None for other panics.
fn out_of_memory_hint(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    (m.contains("out of memory") || m.contains("can't allocate memory")).then_some(
        "the device ran out of memory: training: lower train.batch_size (raise train.grad_accum to \
         keep the global batch), keep fsdp.activation_checkpointing true, or use more ranks; \
         infer and eval: lower --batch-size or --max-new-tokens",
    )
}

/// How std's print!/println! panic when stdout cannot be written ("...: <the io error>").
const STDOUT_FAILED: &str = "failed printing to stdout";
/// The exit status of a program whose reader closed its output (128 + SIGPIPE, as a shell reports
/// `yes | head`'s `yes`).
pub(crate) const BROKEN_PIPE_STATUS: u8 = 141;

/// The latest panic's (message, detail), for `main` to record if it ends the process.
static LAST_PANIC: std::sync::Mutex<Option<(String, String)>> = std::sync::Mutex::new(None);

/// Keeps each panic (a bug, not bad input: that is an error) in `LAST_PANIC` after the default
/// hook has printed it.
fn remember_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = trainer::logging::panic_message(info.payload());
        // (not a bug: `main` says what failed, without a backtrace)
        if payload.starts_with(STDOUT_FAILED) {
            return;
        }
        default_hook(info);
        let place = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let thread = std::thread::current();
        let detail = format!(
            "thread '{}' panicked{place}:\n{payload}\n{}",
            thread.name().unwrap_or("<unnamed>"),
            std::backtrace::Backtrace::capture()
        );
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some((format!("panic{place}: {payload}"), detail));
        }
    }));
}

#[cfg(test)]
mod tests {
    /// libtorch's allocation failures (tch panics with its error) get the fixes; other panics not.
    #[test]
    fn out_of_memory_panics_get_a_hint() {
        let cuda = "panic at src/x.rs:3: called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)\")";
        let cpu = "panic: Torch(\"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.\")";
        for m in [cuda, cpu] {
            let hint = super::out_of_memory_hint(m).unwrap();
            assert!(
                hint.contains("train.batch_size") && hint.contains("--batch-size"),
                "{hint}"
            );
        }
        assert!(super::out_of_memory_hint("panic: index out of bounds").is_none());
    }

    /// The error file names the panic that ended the run, not a later one caught elsewhere.
    #[test]
    fn the_recorded_panic_is_the_one_that_ended_the_run() {
        let hooked = |m: &str| Some((format!("panic at src/x.rs:3: {m}"), format!("trace of {m}")));
        assert_eq!(
            super::panic_record("index out of bounds", hooked("index out of bounds")),
            (
                "panic at src/x.rs:3: index out of bounds".to_string(),
                "trace of index out of bounds".to_string()
            )
        );
        // a decoder's panic caught on a worker thread came last: not this one's record
        assert_eq!(
            super::panic_record("index out of bounds", hooked("bad huffman code")),
            (
                "panic: index out of bounds".to_string(),
                "index out of bounds".to_string()
            )
        );
        assert_eq!(super::panic_record("x", None).0, "panic: x");
    }

    /// The error file's detail keeps this program's frames under a heading, and is the error's
    /// chain alone when none of them resolved (a heading over nothing, from a release build).
    #[test]
    fn error_detail_keeps_this_programs_frames_or_no_heading() {
        let chain = "loading x\n\nCaused by:\n    no such file";
        let frames = "   0: std::backtrace::Backtrace::capture\n             at /rustc/x/backtrace.rs:1:1\n   \
            1: trainer::train::train\n             at ./src/train/mod.rs:82:5\n   2: <unknown>\n";
        let ours = super::detail_of(&format!("{chain}\n\nStack backtrace:\n{frames}"));
        assert!(
            ours.starts_with("Stack backtrace (this program's frames, outermost last):\n   1: trainer::train::train\n             at ./src/train/mod.rs:82:5\n"),
            "{ours}"
        );
        assert!(ours.ends_with(chain), "{ours}");
        let unresolved = "   0: <unknown>\n   1: <unknown>\n";
        let none = super::detail_of(&format!("{chain}\n\nStack backtrace:\n{unresolved}"));
        assert_eq!(none, chain);
        assert_eq!(super::detail_of(chain), chain);
    }
}
