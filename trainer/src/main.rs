//! `trainer`: one rank of a LLaVA-SCo run, plus the tools around it (config, data, infer, eval,
//! export, bench). Thin over the library: parse, dispatch, decide the exit code.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use trainer::config;

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

#[derive(Subcommand)]
enum Command {
    /// Train one rank (reads torchrun's RANK/WORLD_SIZE; world size 1 without a launcher). [not built yet: issue 7]
    /// Example: trainer train configs/demo.yaml --set train.max_steps=10
    Train(ConfigArgs),
    /// Inspect configs. Example: trainer config show configs/llava-sco.yaml --set train.lr=2e-5
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Data tools: check, dump, build-sco. Example: trainer data check configs/demo.yaml [not built yet: issue 6]
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate with self-correction turns. [not built yet: issue 9]
    /// Example: trainer infer --model M --adapter A --image x.jpg --question "..." --turns 2
    Infer(PendingArgs),
    /// Score a benchmark turn by turn. [not built yet: issue 9]
    /// Example: trainer eval --model M --data b.jsonl --image-root i --turns 3 --out r/
    Eval(PendingArgs),
    /// Export a checkpoint as a PEFT adapter or merged HF folder. [not built yet: issue 8]
    /// Example: trainer export --checkpoint ckpt/step-00000500 --out adapter/ --format peft
    Export(PendingArgs),
    /// Benchmarks: collectives, data, checkpoint, step. [not built yet: issues 4, 6, 7, 8]
    /// Example: trainer bench collectives --json
    Bench(PendingArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the resolved config (defaults filled in, overrides applied, validated) as YAML.
    Show(ConfigArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate every record and image and print statistics. Example: trainer data check configs/demo.yaml
    Check(PendingArgs),
    /// Write the exact tensors of one batch. Example: trainer data dump CONFIG --index 0 --out b.safetensors
    Dump(PendingArgs),
    /// Convert the seed's refinement JSON into SCo records. Example: trainer data build-sco r.json --out sco.jsonl
    BuildSco(PendingArgs),
}

/// Arguments of a subcommand that is not built yet (accepted verbatim so `--help` works).
#[derive(Args)]
struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

/// A subcommand whose issue has not landed: say so and fail, never fake success.
fn not_built(name: &str, issue: u32) -> Result<ExitCode> {
    eprintln!("trainer {name}: not implemented yet (tracked in issue {issue}); nothing was done");
    Ok(ExitCode::from(2))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Config(ConfigCommand::Show(args)) => {
            let resolved = config::load(&args.config, &args.overrides)?;
            print!("{}", resolved.to_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => {
            // Validate the config first so a broken file fails fast even before training exists.
            config::load(&args.config, &args.overrides)?;
            not_built("train", 7)
        }
        Command::Data(DataCommand::Check(_)) => not_built("data check", 6),
        Command::Data(DataCommand::Dump(_)) => not_built("data dump", 6),
        Command::Data(DataCommand::BuildSco(_)) => not_built("data build-sco", 6),
        Command::Infer(_) => not_built("infer", 9),
        Command::Eval(_) => not_built("eval", 9),
        Command::Export(_) => not_built("export", 8),
        Command::Bench(_) => not_built("bench", 4),
    }
}

fn main() -> ExitCode {
    trainer::logging::init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
