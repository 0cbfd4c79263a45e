//! `trainer`: one rank of a LLaVA-SCo run, plus the tools around it (config, data, infer, eval,
//! export, bench). Thin over the library: parse, dispatch, decide the exit code.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use launcher::error_file::Cause;

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
    /// per turn). Example: trainer compare report-base/ report-trained/
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
enum BenchCommand {
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
    Check(ConfigArgs),
    /// Write the exact tensors of one global batch (of a run at --world ranks). Example: trainer data dump CONFIG --index 0 --out b.safetensors
    Dump(DumpArgs),
    /// Convert the seed's refinement JSON into SCo records. Example: trainer data build-sco r.json --out sco.jsonl
    BuildSco(BuildScoArgs),
}

/// `trainer data dump`.
#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Global batch index within the epoch (train.batch_size x world x train.grad_accum samples):
    /// what step index + 1 of the epoch trains on
    #[arg(long)]
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

/// `trainer infer`.
#[derive(Args)]
struct InferArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer, preprocessor config);
    /// with --checkpoint it defaults to the run's model.path, with --adapter to the adapter's
    /// base_model_name_or_path when that is a folder here
    #[arg(long, required_unless_present_any = ["checkpoint", "adapter"])]
    model: Option<PathBuf>,
    /// PEFT adapter folder (ours or Python peft's, transformers 4 or 5 naming; LoRA or DoRA)
    #[arg(long, conflicts_with = "checkpoint")]
    adapter: Option<PathBuf>,
    /// A training checkpoint folder (step-NNNNNNNN) whose trained weights to use
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Image file (JPEG, PNG, WebP, GIF, BMP); without it the question is text-only
    #[arg(long)]
    image: Option<PathBuf>,
    /// The question (the first user turn's text)
    #[arg(long, required_unless_present = "questions")]
    question: Option<String>,
    /// Many questions instead of one: JSONL with "question" and optional "id" and "image" (null
    /// or left out: text-only) per line, generated in batches into --out, one JSON line per
    /// question (no scoring: `trainer eval` scores); a rerun resumes
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["question", "image", "json"], requires = "out")]
    questions: Option<PathBuf>,
    /// With --questions: the JSONL the generations are appended to
    #[arg(long, value_name = "FILE.jsonl", requires = "questions")]
    out: Option<PathBuf>,
    /// With --questions: the folder its image paths are relative to (default: the file's own)
    #[arg(long, requires = "questions")]
    image_root: Option<PathBuf>,
    /// With --questions: questions generated together (left-padded)
    #[arg(long, default_value_t = 8, value_parser = at_least_one, requires = "questions")]
    batch_size: usize,
    /// 0 = greedy. Default: 0.7, the seed's inference.py value, when the model's
    /// generation_config.json sets do_sample: true (Llama 3.2 Vision Instruct's does); else
    /// greedy, as transformers' generate decodes such a model even when passed a temperature
    #[arg(long, value_parser = parse_temperature, allow_negative_numbers = true)]
    temperature: Option<f64>,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Print one JSON object with every turn instead of streaming text
    #[arg(long)]
    json: bool,
}

/// A count of 1 or more (checked when the flags are read, not after the model loads).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a whole number of 1 or more, got {text:?}"
        )),
    }
}

/// The generation flags `infer` and `eval` share (each has its own --temperature default).
#[derive(Args, Clone)]
struct GenerationArgs {
    /// Total turns: 1 = the answer (no correction), 2 = answer + one self-correction, ...
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    turns: usize,
    /// The user message of each correction turn (default: the one the run's data used, as
    /// --checkpoint's manifest or an export's llava_sco_prompt.json records it; otherwise the one
    /// `data build-sco` writes)
    #[arg(long)]
    correction_prompt: Option<String>,
    /// Where the correction turn goes: after the whole answer, or after </REASONING>
    #[arg(long, value_enum, default_value = "after-answer")]
    position: PositionArg,
    /// With sampling: the K most likely tokens only, before top-p (0 = off). Default: the
    /// model's generation_config.json top_k, else 50 (transformers' default), as the seed's
    /// `generate` call, which did not pass it, got it
    #[arg(long)]
    top_k: Option<usize>,
    /// With sampling: the smallest set of most likely tokens whose probabilities add up to this
    /// (nucleus sampling, after top-k); 1 = off [default: 0.9, the seed's]
    #[arg(long, value_parser = parse_top_p, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// transformers' repetition_penalty: logits of tokens already in the sequence divided by it
    /// (multiplied where negative); 1 = off. Default: the model's generation_config.json
    /// repetition_penalty, else 1, as the seed's generate call got it
    #[arg(long, value_parser = parse_repetition_penalty, allow_negative_numbers = true)]
    repetition_penalty: Option<f64>,
    /// End a turn once its text holds this string (kept in the text; repeatable), as
    /// transformers' stop_strings, e.g. --stop "</CONCLUSION>"
    #[arg(long = "stop", value_name = "STRING", value_parser = parse_stop)]
    stop: Vec<String>,
    /// A turn that reaches it is cut off (eval scores it wrong unless its conclusion closed); the
    /// seed's inference used 2048
    #[arg(long, default_value_t = 2048, value_parser = parse_max_new_tokens, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// With sampling: the seed of the token draws (the same seed, the same text)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep a LLaVA `<image>` marker at the question's start or end as text (for a model trained
    /// with data.image_placeholder: keep, which --checkpoint and an export's llava_sco_prompt.json
    /// apply by themselves; by default it is removed, as in training)
    #[arg(long)]
    keep_image_placeholder: bool,
    /// Start the prompt with two <|begin_of_text|>, as a model trained with data.double_bos: true
    /// saw it (the seed's collator); by default one, as the seed's inference (with --checkpoint
    /// or an export's llava_sco_prompt.json, the run's own setting)
    #[arg(long)]
    double_bos: bool,
    /// The chat template's "Today Date" for text-only prompts, as YYYY-MM-DD (Llama 3.2's
    /// template writes one into a prompt without an image; default: the day an eval's --out or
    /// infer --questions' --out recorded, else today in local time, as transformers'
    /// strftime_now, so such an answer changes with the day and the time zone)
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = parse_date_flag)]
    date: Option<String>,
}

/// --date: a calendar day as YYYY-MM-DD (kept as the template renders it: 2024-7-1 is 2024-07-01).
fn parse_date_flag(s: &str) -> Result<String, String> {
    use trainer::data::template::{parse_date, strftime};
    parse_date(s).map(|clock| strftime("%Y-%m-%d", clock))
}

impl GenerationArgs {
    /// Pins the chat template's date to --date (call before anything renders a prompt).
    fn pin_date(&self) {
        if let Some(clock) = self
            .date
            .as_deref()
            .and_then(|d| trainer::data::template::parse_date(d).ok())
        {
            trainer::data::template::use_template_clock(clock);
        }
    }

    /// The generation options; the flags not given take `model_dir`'s generation_config.json
    /// values, as transformers' `generate` takes what its call does not pass. `temperature`:
    /// the flag's, else (None) the seed's 0.7 where generation_config.json sets do_sample: true
    /// and greedy where it does not (transformers' generate, passed the seed's temperature=0.7,
    /// decodes greedily unless do_sample is set).
    fn options(
        &self,
        temperature: Option<f64>,
        model_dir: &std::path::Path,
    ) -> Result<trainer::infer::InferOptions> {
        let defaults = trainer::infer::sampling::GenerationDefaults::read(model_dir)?;
        let gen_config = model_dir.join("generation_config.json");
        let temperature = match temperature {
            Some(t) => t,
            None if defaults.do_sample == Some(true) => {
                tracing::info!(
                    "sampling at temperature {SEED_TEMPERATURE} (the seed's; {} sets do_sample: true); --temperature 0 decodes greedily",
                    gen_config.display()
                );
                SEED_TEMPERATURE
            }
            None => {
                tracing::info!(
                    "greedy decoding: {} {} (transformers' generate then decodes greedily, also when passed the seed's temperature 0.7); --temperature T samples",
                    gen_config.display(),
                    match gen_config.exists() {
                        true => "does not set do_sample: true",
                        false => "is not there",
                    }
                );
                0.0
            }
        };
        let sampling = temperature > 0.0;
        if !sampling && (self.top_k.is_some() || self.top_p.is_some()) {
            tracing::warn!(
                "--top-k and --top-p apply to sampling only: greedy decoding (temperature 0) ignores them"
            );
        }
        let top_k = self.top_k.or(defaults.top_k);
        let repetition_penalty = self.repetition_penalty.or(defaults.repetition_penalty);
        // (top_k matters only when sampling; the repetition penalty also applies when greedy)
        for (flag, given, from_file) in [
            (
                "top_k",
                self.top_k.is_some() || !sampling,
                defaults.top_k.map(|k| k.to_string()),
            ),
            (
                "repetition_penalty",
                self.repetition_penalty.is_some(),
                defaults.repetition_penalty.map(|p| p.to_string()),
            ),
        ] {
            if let (false, Some(v)) = (given, from_file) {
                tracing::info!(
                    "{flag} {v} from {} (--{} sets another)",
                    gen_config.display(),
                    flag.replace('_', "-")
                );
            }
        }
        Ok(trainer::infer::InferOptions {
            turns: self.turns,
            correction_prompt: self
                .correction_prompt
                .as_deref()
                .unwrap_or(trainer::data::records::DEFAULT_CORRECTION_PROMPT)
                .to_string(),
            position: position_of(self.position),
            temperature,
            top_k: top_k.unwrap_or(trainer::infer::sampling::DEFAULT_TOP_K),
            top_p: self.top_p.unwrap_or(SEED_TOP_P),
            repetition_penalty: repetition_penalty.unwrap_or(1.0),
            stop: self.stop.clone(),
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            keep_image_placeholder: self.keep_image_placeholder,
            double_bos: self.double_bos,
            date: self.date.clone(),
            eos_token_ids: defaults.eos_token_ids,
        })
    }
}

/// The seed's inference.py sampling values (passed to its `generate` call).
const SEED_TEMPERATURE: f64 = 0.7;
const SEED_TOP_P: f64 = 0.9;

#[derive(Clone, Copy, clap::ValueEnum)]
enum PositionArg {
    #[value(alias = "after_answer")]
    AfterAnswer,
    #[value(alias = "after_reasoning")]
    AfterReasoning,
}

fn infer(args: InferArgs) -> Result<ExitCode> {
    use std::io::Write;
    use trainer::data::image;
    use trainer::infer::Session;

    args.generation.pin_date();
    let (ckpt, model_dir, generation) = checkpoint_and_base(
        args.checkpoint.as_deref(),
        args.model.as_ref(),
        args.adapter.as_deref(),
        &args.generation,
        &|c| Ok(c.verify_part(0, 1).map(drop)?),
    )?;
    if let Some(file) = &args.questions {
        return infer_questions(&args, file, ckpt, &model_dir, &generation);
    }
    // (the image too: a wrong --image must not cost a model load first)
    let img = args
        .image
        .as_ref()
        .map(|p| image::load_rgb(p))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--image: {e}"))?;
    let (model, text, image_config) = load_for_generation(
        &model_dir,
        args.adapter.as_deref(),
        ckpt.as_ref(),
        generation.double_bos,
        &generation.stop,
    )?;
    let opts = generation.options(args.temperature, &model_dir)?;
    let session = Session {
        model: &model,
        text: &text,
        image_config: &image_config,
    };
    let mut current = usize::MAX;
    let mut stdout = std::io::stdout();
    let question = args.question.as_deref().unwrap_or_default();
    let turns = session.run(img.as_ref(), question, &opts, &mut |turn, piece| {
        if args.json {
            return;
        }
        if turn != current {
            current = turn;
            let _ = writeln!(
                stdout,
                "{}--- turn {turn} ---",
                if turn > 0 { "\n" } else { "" }
            );
        }
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    if args.json {
        let out = serde_json::json!({
            "turns": turns,
            "model": model_dir.display().to_string(),
            "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
            "checkpoint": args.checkpoint.as_ref().map(|p| p.display().to_string()),
            "settings": opts,
            // (the "Today Date" a text-only prompt renders: --date, else this process's day)
            "template_date": trainer::data::template::strftime_now("%Y-%m-%d"),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        for (i, t) in turns.iter().enumerate() {
            eprintln!(
                "turn {i}: {} tokens in {:.2} s, conclusion: {}",
                t.tokens,
                t.seconds,
                t.stages.conclusion.as_deref().unwrap_or("(none)")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `infer --questions FILE --out OUT`: every question of FILE not yet in OUT, in batches of
/// --batch-size, each answered as `infer` alone answers it (its sampler seeded from --seed and
/// its id), a JSON line per question appended to OUT.
fn infer_questions(
    args: &InferArgs,
    file: &std::path::Path,
    ckpt: Option<trainer::infer::checkpoint::CheckpointWeights>,
    model_dir: &std::path::Path,
    generation: &GenerationArgs,
) -> Result<ExitCode> {
    use anyhow::Context;
    use std::io::Write;
    use trainer::infer::questions;
    let out = args.out.as_deref().context("--questions needs --out")?;
    // (every rank would answer every question into the one file)
    let env = launcher::env::RankEnv::from_env()?;
    anyhow::ensure!(
        env.is_single(),
        "infer --questions runs as one process (this is rank {} of {}): run it without the launcher, or use `trainer eval`, which shares the questions out among ranks",
        env.rank,
        env.world_size
    );
    let image_root = match &args.image_root {
        Some(root) => root.clone(),
        None => file
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
    };
    anyhow::ensure!(
        !out.is_dir(),
        "--out {}: a folder; give the JSONL file the generations go into",
        out.display()
    );
    anyhow::ensure!(
        !same_file(out, file),
        "--out {} is the questions file: give another file for the generations",
        out.display()
    );
    let all = questions::read(file, &image_root)?;
    let opts = generation.options(args.temperature, model_dir)?;
    let made_with = trainer::eval::made_with(
        model_dir,
        args.adapter.as_deref(),
        args.checkpoint.as_deref(),
    );
    let mut settings = serde_json::json!({
        // (paths as text: one that is not UTF-8 would not serialize)
        "model": model_dir.display().to_string(),
        "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
        "checkpoint": args.checkpoint.as_ref().map(|p| p.display().to_string()),
        // the folders' content (a resume compares it, not their paths)
        "files_sha256": trainer::eval::content_sha256(&made_with),
        "infer": opts,
    });
    // one run at a time into --out (a second would answer every question again, interleaved)
    let out_lock = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("--out {}", out.display()))?;
    match launcher::flock::try_exclusive(&out_lock) {
        Ok(launcher::flock::Flock::Held) => {}
        Ok(launcher::flock::Flock::Busy) => anyhow::bail!(
            "--out {} is being written by another `infer --questions`: wait for it, or give another --out",
            out.display()
        ),
        Ok(launcher::flock::Flock::Unsupported(e)) => tracing::warn!(
            "--out {}: this filesystem has no file locks ({e}): two runs into it would mix their lines",
            out.display()
        ),
        Err(e) => anyhow::bail!("--out {}: {e}", out.display()),
    }
    // the day text-only prompts carry ("Today Date"): --date, else the day the lines already in
    // --out were made with (a resume on another day asks as the first run asked), else today
    let stored = questions::stored(out)?;
    if all.iter().any(|q| q.image.is_none()) {
        use trainer::data::template::{fix_day, run_clock};
        let recorded = questions::stored_template_date(&stored);
        settings["template_date"] =
            fix_day(run_clock(generation.date.is_some(), recorded.as_deref())).into();
    }
    let done = questions::done(out, &stored, &settings, &all)?;
    let todo: Vec<&questions::Question> = all.iter().filter(|q| !done.contains(&q.id)).collect();
    if !done.is_empty() {
        tracing::info!(
            "resuming: {} of {} questions already in {}, {} to go",
            all.len() - todo.len(),
            all.len(),
            out.display(),
            todo.len()
        );
    }
    if todo.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // every image there before the model loads (decoded batch by batch)
    for q in &todo {
        if let Some(p) = q.image.as_ref().filter(|p| !p.is_file()) {
            anyhow::bail!(
                "{}:{}: image {} not found (paths are relative to --image-root {})",
                file.display(),
                q.line,
                p.display(),
                image_root.display()
            );
        }
    }
    let (model, text, image_config) = load_for_generation(
        model_dir,
        args.adapter.as_deref(),
        ckpt.as_ref(),
        generation.double_bos,
        &generation.stop,
    )?;
    let session = trainer::infer::Session {
        model: &model,
        text: &text,
        image_config: &image_config,
    };
    for q in &todo {
        session
            .prompt_ids(&q.question, q.image.is_some(), &[], &opts)
            .with_context(|| format!("{}:{}: id {:?}", file.display(), q.line, q.id))?;
    }
    let mut sink = trainer::eval::open_lines_for_append(out, &|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.get("id").is_some())
    })
    .with_context(|| format!("--out {}", out.display()))?;
    let _note = trainer::eval::interrupt::install(trainer::eval::interrupt::note(
        "infer",
        "generations",
        out,
    ));
    let mut answered = all.len() - todo.len();
    for batch in todo.chunks(args.batch_size) {
        let images = batch
            .iter()
            .map(|q| {
                q.image
                    .as_ref()
                    .map(|p| trainer::data::image::load_rgb(p))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), q.line))
            })
            .collect::<Result<Vec<_>>>()?;
        let inputs: Vec<_> = batch
            .iter()
            .zip(&images)
            .map(|(q, image)| (image.as_ref(), q.question.as_str()))
            .collect();
        let seeds: Vec<u64> = batch
            .iter()
            .map(|q| questions::seed_of(opts.seed, &q.id))
            .collect();
        let outputs = session.run_batch_seeded(&inputs, &seeds, &opts, &mut |_, _, _| {})?;
        for (q, turns) in batch.iter().zip(outputs) {
            let line = serde_json::json!({
                "id": q.id,
                // (as the questions file writes it)
                "image": q.image_text,
                "question": q.question,
                "turns": turns,
                "settings": settings,
            });
            // (one write per line: a signal between two writes would tear it)
            sink.write_all(format!("{line}\n").as_bytes())
                .and_then(|_| sink.flush())
                .with_context(|| format!("--out {}", out.display()))?;
        }
        answered += batch.len();
        tracing::info!("infer: {answered}/{} questions", all.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether two paths name one file (both exist and share a device and inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `trainer eval`.
#[derive(Args)]
struct EvalArgs {
    /// Hugging Face model folder; with --checkpoint it defaults to the run's model.path, with
    /// --adapter to the adapter's base_model_name_or_path when that is a folder here
    #[arg(long, required_unless_present_any = ["checkpoint", "adapter"])]
    model: Option<PathBuf>,
    /// PEFT adapter folder
    #[arg(long, conflicts_with = "checkpoint")]
    adapter: Option<PathBuf>,
    /// A training checkpoint folder (step-NNNNNNNN) whose trained weights to evaluate (LoRA or
    /// full finetuning; no export needed)
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Benchmark JSONL: {"id", "image", "question", "answer", "choices"?, "category"?} per line
    #[arg(long)]
    data: PathBuf,
    /// Folder the benchmark's image paths are relative to
    #[arg(long)]
    image_root: PathBuf,
    /// Output folder: predictions.jsonl, report.json, report.md (an existing one is resumed)
    #[arg(long)]
    out: PathBuf,
    /// Only the first K samples
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    /// 0 = greedy (default for scoring)
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature, allow_negative_numbers = true)]
    temperature: f64,
    #[command(flatten)]
    generation: GenerationArgs,
    /// A training metrics.jsonl, to report training FLOPs next to inference FLOPs
    #[arg(long)]
    train_metrics: Option<PathBuf>,
    /// Samples generated together (left-padded; greedy results depend on it only through rounding)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
}

/// `--checkpoint` (read, its files checked by `verify`, its base checked) and the model folder:
/// `--model`, else the checkpoint's run's; and the generation settings with the prompt as the
/// run trained on it (the flags can only add to that): the checkpoint's manifest says how, an
/// exported adapter or merged folder its `llava_sco_prompt.json`.
fn checkpoint_and_base(
    checkpoint: Option<&std::path::Path>,
    model: Option<&PathBuf>,
    adapter: Option<&std::path::Path>,
    generation: &GenerationArgs,
    verify: &dyn Fn(&trainer::infer::CheckpointWeights) -> Result<()>,
) -> Result<(
    Option<trainer::infer::CheckpointWeights>,
    PathBuf,
    GenerationArgs,
)> {
    let ckpt = checkpoint
        .map(trainer::infer::CheckpointWeights::read_unverified)
        .transpose()?;
    if let Some(c) = &ckpt {
        verify(c)?;
    }
    let model_dir = match (model, &ckpt, adapter) {
        (Some(m), _, _) => m.clone(),
        (None, Some(c), _) => c.model_path(),
        (None, None, Some(a)) => trainer::model::adapter::base_folder(a, None)?,
        (None, None, None) => anyhow::bail!("--model is required (or --checkpoint or --adapter)"),
    };
    // (before the base's weights are read: a wrong --model fails in a second, not after 20 GB)
    if let Some(c) = &ckpt {
        c.check_base(&model_dir)?;
    }
    use trainer::checkpoint::{PromptSettings, PROMPT_FILE};
    let exported = |dir: &std::path::Path| -> Result<Option<(PromptSettings, String)>> {
        let label = format!("the run of {}", dir.join(PROMPT_FILE).display());
        Ok(PromptSettings::read_folder(dir)?.map(|s| (s, label)))
    };
    // the weights' own run: an adapter's file, never its base's (that describes the base's
    // training; an adapter peft saved has none and is prompted with the defaults)
    let (trained, run) = match (&ckpt, adapter) {
        (Some(c), _) => Some((c.prompt_settings(), "the checkpoint's run".to_string())),
        (None, Some(a)) => {
            let found = exported(a)?;
            if found.is_none() && model_dir.join(PROMPT_FILE).is_file() {
                tracing::warn!(
                    "{} describes the base model's own training, not the adapter's (which has no {PROMPT_FILE}): not applied",
                    model_dir.join(PROMPT_FILE).display()
                );
            }
            found
        }
        (None, None) => exported(&model_dir)?,
    }
    .unwrap_or_default();
    let mut generation = generation.clone();
    generation.double_bos |= trained.double_bos;
    generation.keep_image_placeholder |= trained.keep_image_placeholder;
    if trained.double_bos || trained.keep_image_placeholder {
        tracing::info!(
            "prompts as {run} trained on them: double_bos {}, image placeholder {}",
            trained.double_bos,
            if trained.keep_image_placeholder {
                "kept"
            } else {
                "stripped"
            }
        );
    }
    // the correction turn the run trained on, unless --correction-prompt says otherwise
    match (&generation.correction_prompt, trained.correction_prompt) {
        (None, Some(p)) => {
            tracing::info!("correction prompt as {run} trained on it: {p:?} (--correction-prompt gives another)");
            generation.correction_prompt = Some(p);
        }
        (Some(given), Some(p)) if given.trim() != p => {
            tracing::warn!("--correction-prompt differs from the one {run} trained on ({p:?})")
        }
        _ => {}
    }
    Ok((ckpt, model_dir, generation))
}

/// After an export: the prompt settings its folder carries (the run's correction prompt, double
/// BOS, kept image placeholder), which `trainer infer|eval` follow, as the flags that give them.
fn print_prompt_settings(out: &std::path::Path) {
    use trainer::checkpoint::{PromptSettings, PROMPT_FILE};
    let Ok(Some(p)) = PromptSettings::read_folder(out) else {
        return;
    };
    let mut flags = vec![];
    let default = trainer::data::records::DEFAULT_CORRECTION_PROMPT;
    if let Some(prompt) = p.correction_prompt.as_deref().filter(|&t| t != default) {
        // (single-quoted for a POSIX shell: nothing inside is expanded)
        flags.push(format!(
            "--correction-prompt '{}'",
            prompt.replace('\'', "'\\''")
        ));
    }
    if p.double_bos {
        flags.push("--double-bos".into());
    }
    if p.keep_image_placeholder {
        flags.push("--keep-image-placeholder".into());
    }
    println!(
        "{}: the run's prompt settings, which `trainer infer` / `trainer eval` follow with this export ({})",
        out.join(PROMPT_FILE).display(),
        match flags.is_empty() {
            true => "the defaults".to_string(),
            false => format!("as {}", flags.join(" ")),
        }
    );
}

/// Loads model (+ adapter, or a training checkpoint's weights), tokenizer/template and image
/// processor of a model folder.
fn load_for_generation(
    model_dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    checkpoint: Option<&trainer::infer::CheckpointWeights>,
    double_bos: bool,
    stops: &[String],
) -> Result<(
    trainer::model::MllamaModel,
    trainer::data::tokenize::TextProcessor,
    trainer::data::image::ImageProcessorConfig,
)> {
    use anyhow::Context;
    use trainer::model::{AttentionImpl, LoadOptions, MllamaModel};
    // (the config and the tokenizer first: what they refuse costs no model load)
    trainer::model::MllamaConfig::from_file(&model_dir.join("config.json"))
        .with_context(|| format!("loading the model from {}", model_dir.display()))?;
    let text = trainer::data::tokenize::TextProcessor::from_model_dir(model_dir, double_bos)
        .map_err(anyhow::Error::msg)?;
    // the streamed text skips special tokens (as transformers' decode does), so a stop string
    // made of them would never match: the end tokens end a turn already
    for stop in stops {
        let shown = text
            .tokenize(stop)
            .and_then(|ids| text.decode_exact(&ids))
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            shown.contains(stop.as_str()),
            "--stop {stop:?}: special tokens are not part of the generated text, so it would never match (an end-of-turn token such as <|eot_id|> ends a turn already); give text the model writes, e.g. --stop \"</CONCLUSION>\""
        );
    }
    // one GPU per local rank under the launcher
    let local_rank: usize = match std::env::var("LOCAL_RANK") {
        Ok(r) => r.trim().parse().map_err(|_| {
            anyhow::anyhow!("LOCAL_RANK={r:?} is not a rank number (the launcher sets it)")
        })?,
        Err(_) => 0,
    };
    let (device, dtype) = if tch::Cuda::is_available() {
        let gpus = tch::Cuda::device_count() as usize;
        if local_rank >= gpus {
            anyhow::bail!("LOCAL_RANK {local_rank}, but {gpus} GPU(s) are visible: run at most {gpus} rank(s) per node (--nproc-per-node), or check CUDA_VISIBLE_DEVICES");
        }
        (tch::Device::Cuda(local_rank), tch::Kind::BFloat16)
    } else {
        (tch::Device::Cpu, tch::Kind::Float)
    };
    let mut model = MllamaModel::load(
        model_dir,
        LoadOptions {
            dtype,
            device,
            attention: AttentionImpl::Sdpa,
        },
    )
    .with_context(|| format!("loading the model from {}", model_dir.display()))?;
    if let Some(dir) = adapter {
        // factors in fp32 over the bf16 model, as PEFT's from_pretrained keeps them for inference
        model.set_lora_kind(tch::Kind::Float);
        model
            .load_adapter(dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        // (DoRA's g once, not in every decoding step)
        model.fix_dora();
    }
    let image_config = trainer::data::image::ImageProcessorConfig::from_model_dir(model_dir)
        .map_err(anyhow::Error::msg)?;
    image_config
        .check_fits(&model.config.vision, model_dir)
        .map_err(anyhow::Error::msg)?;
    trainer::data::dataset::check_tokenizer_fits_model(model_dir, &text, &model.config)
        .map_err(anyhow::Error::msg)?;
    model
        .config
        .check_special_ids()
        .with_context(|| format!("{}/config.json", model_dir.display()))?;
    if let Some(c) = checkpoint {
        c.apply(&mut model)?;
    }
    Ok((model, text, image_config))
}

/// --max-new-tokens: a whole number of 1 or more.
fn parse_max_new_tokens(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "`{s}`: expected a whole number of 1 or more (tokens per turn)"
        )),
    }
}

/// --repetition-penalty: a finite number > 0 (1 = off).
fn parse_repetition_penalty(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 => Ok(p),
        _ => Err(format!("`{s}`: expected a number > 0 (1 = off)")),
    }
}

/// --sharding: a `fsdp.sharding_strategy` name.
fn parse_sharding(s: &str) -> Result<trainer::config::ShardingStrategy, String> {
    use trainer::config::ShardingStrategy;
    ShardingStrategy::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = ShardingStrategy::ALL.iter().map(|(_, n)| *n).collect();
        format!("`{s}`: expected one of {}", names.join(", "))
    })
}

/// --stop: a non-empty string (an empty one would end every turn at once; transformers refuses it).
fn parse_stop(s: &str) -> Result<String, String> {
    match s.is_empty() {
        true => Err("an empty stop string would end every turn at once; give some text".into()),
        false => Ok(s.to_string()),
    }
}

/// --temperature: a finite number >= 0 (0 = greedy).
fn parse_temperature(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("`{s}`: expected a number >= 0 (0 = greedy)")),
    }
}

/// --top-p: a number in [0, 1] (0 keeps only the most likely token, as transformers' does).
fn parse_top_p(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{s}`: expected a number in [0, 1]")),
    }
}

fn position_of(p: PositionArg) -> trainer::infer::Position {
    match p {
        PositionArg::AfterAnswer => trainer::infer::Position::AfterAnswer,
        PositionArg::AfterReasoning => trainer::infer::Position::AfterReasoning,
    }
}

fn eval(args: EvalArgs) -> Result<ExitCode> {
    use trainer::eval::{run, EvalOptions, Shard};
    use trainer::infer::Session;
    args.generation.pin_date();
    // the benchmark and the image folder before the model loads (every line is checked again,
    // with its images, before anything is generated)
    trainer::eval::read_bench(&args.data)?;
    anyhow::ensure!(
        args.image_root.is_dir(),
        "--image-root {} is not a folder (the benchmark's image paths are relative to it)",
        args.image_root.display()
    );
    // under the launcher every rank evaluates its share; rank 0 merges and reports
    let env = launcher::env::RankEnv::from_env()?;
    // (rank 0 writes the report, the one reader of the metrics: another node may not have them)
    if let (Some(metrics), 0) = (&args.train_metrics, env.rank) {
        trainer::eval::training_flops(metrics)?;
    }
    let group = if env.is_single() {
        None
    } else {
        let g = trainer::dist::ProcessGroup::from_env(
            trainer::dist::Backend::Cpu,
            std::time::Duration::from_secs(24 * 3600),
        )?;
        trainer::data::template::agree_template_clock(&g, tch::Device::Cpu, None)?;
        Some(g)
    };
    let barrier = || {
        group
            .as_ref()
            .map_or(Ok(()), |g| g.barrier().map_err(|e| e.to_string()))
    };
    let any = |flag: bool| -> Result<bool, String> {
        let Some(g) = group.as_ref() else {
            return Ok(flag);
        };
        let t = tch::Tensor::from_slice(&[flag as i64]);
        g.all_reduce(&t, trainer::dist::ReduceOp::Max)
            .map_err(|e| e.to_string())?;
        Ok(t.int64_value(&[0]) != 0)
    };
    // the ranks of a node split the checkpoint's hashing (each node checks the copy it reads)
    let verify = |c: &trainer::infer::CheckpointWeights| -> Result<()> {
        let mine = c.verify_part(env.local_rank, env.local_world_size);
        if let (Ok(k), true) = (&mine, env.local_world_size > 1) {
            tracing::info!(
                "checked {k} of the {} files of checkpoint {} (this node's {} ranks split them)",
                c.manifest.files.len(),
                c.dir.display(),
                env.local_world_size
            );
        }
        let failed = any(mine.is_err()).map_err(anyhow::Error::msg)?;
        match mine.map(drop) {
            Err(e) => Err(e.into()),
            Ok(()) if failed => Err(trainer::dist::FailedElsewhere {
                what: format!(
                    "another rank found a damaged file in checkpoint {}",
                    c.dir.display()
                ),
                rank: None,
            }
            .into()),
            Ok(()) => Ok(()),
        }
    };
    let (ckpt, model_dir, generation) = checkpoint_and_base(
        args.checkpoint.as_deref(),
        args.model.as_ref(),
        args.adapter.as_deref(),
        &args.generation,
        &verify,
    )?;
    let (model, text, image_config) = load_for_generation(
        &model_dir,
        args.adapter.as_deref(),
        ckpt.as_ref(),
        generation.double_bos,
        &generation.stop,
    )?;
    let session = Session {
        model: &model,
        text: &text,
        image_config: &image_config,
    };
    let opts = EvalOptions {
        infer: generation.options(Some(args.temperature), &model_dir)?,
        image_root: args.image_root.clone(),
        out: args.out.clone(),
        limit: args.limit,
        training_metrics: args.train_metrics.clone(),
        batch_size: args.batch_size as usize,
        made_with: trainer::eval::made_with(
            &model_dir,
            args.adapter.as_deref(),
            args.checkpoint.as_deref(),
        ),
    };
    let gather = |x: i64| -> Result<Vec<i64>, String> {
        let Some(g) = group.as_ref() else {
            return Ok(vec![x]);
        };
        let all = tch::Tensor::zeros(
            [g.world_size() as i64],
            (tch::Kind::Int64, tch::Device::Cpu),
        );
        g.all_gather_into(&all, &tch::Tensor::from_slice(&[x]))
            .map_err(|e| e.to_string())?;
        Vec::<i64>::try_from(&all).map_err(|e| e.to_string())
    };
    let shard = group.as_ref().map(|g| Shard {
        rank: g.rank(),
        world: g.world_size(),
        barrier: &barrier,
        any: &any,
        gather: &gather,
    });
    let Some(report) = run(
        &session,
        &args.data,
        &opts,
        shard.as_ref(),
        &mut |done, total| {
            if done % 10 == 0 || done == total {
                eprintln!("eval: {done}/{total} samples of this rank");
            }
        },
    )?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    for t in &report.turns {
        println!(
            "turn {}: {}/{} correct ({:.1}%)",
            t.turn,
            t.correct,
            t.total,
            100.0 * t.accuracy
        );
    }
    for t in &report.transitions {
        println!(
            "turn {} -> {}: wrong->right {}, right->wrong {}, answer changed {:.1}%",
            t.from,
            t.to,
            t.wrong_right,
            t.right_wrong,
            100.0 * t.change_rate
        );
    }
    println!("report: {}", args.out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
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

/// `trainer compare`.
#[derive(Args)]
struct CompareArgs {
    /// `trainer eval --out` folder of run A (e.g. the base model)
    a: PathBuf,
    /// `trainer eval --out` folder of run B (e.g. the trained model)
    b: PathBuf,
    /// Also write the comparison as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `trainer compare A B [--json FILE]`.
fn compare(args: CompareArgs) -> Result<ExitCode> {
    // (every question agrees with itself: a table of no differences, as if it said something)
    let (a, b) = (
        std::fs::canonicalize(&args.a),
        std::fs::canonicalize(&args.b),
    );
    if let (Ok(a), Ok(b)) = (a, b) {
        anyhow::ensure!(
            a != b,
            "{} and {} are the same evaluation ({}): give two evaluation folders, e.g. the base model's and the trained one's",
            args.a.display(),
            args.b.display(),
            a.display()
        );
    }
    // an existing file is replaced only when it is an earlier comparison: not an evaluation's
    // predictions.jsonl or report.json, nor a benchmark
    if let Some(path) = args.json.as_deref().filter(|p| p.exists()) {
        let earlier = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.get("paired").is_some() && v.get("turns").is_some());
        anyhow::ensure!(
            earlier,
            "--json {}: the file exists and is not an earlier comparison; it is left as it is: give another path",
            path.display()
        );
    }
    let c = trainer::eval::compare::compare(&args.a, &args.b)?;
    print!("{}", c.markdown());
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&c)? + "\n";
        trainer::checkpoint::replace_synced(&path, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("writing {}: {e:#}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    Peft,
    Merged,
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
    if let Some(path) = out {
        let lines: String = all.iter().map(|m| format!("{}\n", m.json())).collect();
        std::fs::write(&path, lines)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
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
                    trainer::bench::collectives::json_line(m, pg.backend_name(), pg.world_size())
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
        Command::Compare(args) => compare(args),
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
        Command::Data(DataCommand::Check(args)) => {
            let resolved = config::load(&args.config, &args.overrides)?;
            // (the paths `trainer train` checks first: one error, not one per record)
            config::missing_data_paths(&resolved)
                .map_err(|c| config::in_file(&args.config, &args.overrides, c))?;
            // (text-only samples' lengths as the run the config resumes renders them: its date)
            use_resumed_template_clock(&resolved);
            let outcome = trainer::data::tools::check(&resolved)?;
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
        Command::Infer(args) => infer(args),
        Command::Eval(args) => eval(args),
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
        Command::Bench(BenchCommand::Collectives {
            backend,
            sizes,
            reps,
            json,
        }) => bench_collectives(&backend, &sizes, reps, json),
        Command::Bench(BenchCommand::Checkpoint {
            mib,
            groups,
            reps,
            dir,
            json,
        }) => {
            let scratch = bench_scratch(&dir);
            trainer::bench::checkpoint::main(&scratch, mib, groups, reps, json)?;
            drop_if_empty(&dir);
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Bench(BenchCommand::Decode {
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
        }) => {
            use trainer::bench::decode;
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
            if let Some(path) = out {
                let lines: String = all.iter().map(|m| format!("{}\n", m.json())).collect();
                std::fs::write(&path, lines)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Data {
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
        }) => {
            use trainer::bench::data;
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
            if let Some(path) = out {
                std::fs::write(&path, lines)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Step {
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
        }) => {
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

fn main() -> ExitCode {
    trainer::logging::init();
    remember_panics();
    let cli = Cli::parse();
    // for the launcher's (or torchrun's) summary, `TORCHELASTIC_ERROR_FILE` gets the error that
    // ends the process: its whole chain and each cause, or the panic that unwound out of `run`
    // (panics caught on the way, e.g. a decoder's on a malformed image, are not recorded)
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            // (each line with the rank's prefix, as its log lines: ranks' errors interleave)
            let text = format!("error: {err:#}");
            match trainer::logging::rank_prefix() {
                Some(p) => text.lines().for_each(|line| eprintln!("{p} {line}")),
                None => eprintln!("{text}"),
            }
            launcher::error_file::record(&format!("{err:#}"), &error_detail(&err), cause(&err));
            ExitCode::FAILURE
        }
        Err(_) => {
            let last = LAST_PANIC.lock().ok().and_then(|mut p| p.take());
            if let Some((message, detail)) = last {
                launcher::error_file::record(&message, &detail, Cause::ThisRank);
            }
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

/// The latest panic's (message, detail), for `main` to record if it ends the process.
static LAST_PANIC: std::sync::Mutex<Option<(String, String)>> = std::sync::Mutex::new(None);

/// Keeps each panic (a bug, not bad input: that is an error) in `LAST_PANIC` after the default
/// hook has printed it.
fn remember_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
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

#[cfg(test)]
mod tests {
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
