//! `trainer infer`: one question or a file of them, with self-correction turns; and what infer,
//! eval and export share: the generation flags and the model, adapter or checkpoint they load.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

/// The weights `infer` and `eval` answer with: a model folder, with a PEFT adapter or the trained
/// weights of a checkpoint.
#[derive(Args)]
pub(crate) struct WeightsArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer, preprocessor config);
    /// with --checkpoint it defaults to the run's model.path, with --adapter to the adapter's
    /// base_model_name_or_path when that is a folder here
    #[arg(long, alias = "model_name", required_unless_present_any = ["checkpoint", "adapter"])]
    pub(crate) model: Option<PathBuf>,
    /// PEFT adapter folder (ours or Python peft's, transformers 4 or 5 naming; LoRA or DoRA);
    /// the seed's inference.py took it as --finetuning_path, which is read as this
    #[arg(long, alias = "finetuning_path", conflicts_with = "checkpoint")]
    pub(crate) adapter: Option<PathBuf>,
    /// A training checkpoint folder (step-NNNNNNNN) whose trained weights to use (LoRA or full
    /// finetuning; no export needed)
    #[arg(long)]
    pub(crate) checkpoint: Option<PathBuf>,
}

/// `trainer infer`.
#[derive(Args)]
pub(crate) struct InferArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// Image file (JPEG, PNG, WebP, GIF, BMP); without it the question is text-only
    #[arg(long)]
    image: Option<PathBuf>,
    /// The question (the first user turn's text)
    #[arg(long, required_unless_present = "questions", value_parser = parse_question)]
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

/// The question text: not blank (--questions and eval refuse a blank one too).
fn parse_question(text: &str) -> Result<String, String> {
    match text.trim().is_empty() {
        true => Err(
            "the question is empty: give the text to ask (about the image, with --image)".into(),
        ),
        false => Ok(text.to_string()),
    }
}

/// A count of 1 or more (checked when the flags are read, not after the model loads).
pub(crate) fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a whole number of 1 or more, got {text:?}"
        )),
    }
}

/// The generation flags `infer` and `eval` share (each has its own --temperature default).
#[derive(Args, Clone)]
pub(crate) struct GenerationArgs {
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
    #[arg(long, alias = "top_k")]
    top_k: Option<usize>,
    /// With sampling: the smallest set of most likely tokens whose probabilities add up to this
    /// (nucleus sampling, after top-k); 1 = off [default: 0.9, the seed's]
    #[arg(long, alias = "top_p", value_parser = parse_top_p, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// transformers' repetition_penalty: logits of tokens already in the sequence divided by it
    /// (multiplied where negative); 1 = off. Default: the model's generation_config.json
    /// repetition_penalty, else 1, as the seed's generate call got it
    #[arg(
        long,
        alias = "repetition_penalty",
        value_parser = parse_repetition_penalty,
        allow_negative_numbers = true
    )]
    repetition_penalty: Option<f64>,
    /// End a turn once its text holds this string (kept in the text; repeatable), as
    /// transformers' stop_strings, e.g. --stop "</CONCLUSION>"
    #[arg(long = "stop", value_name = "STRING", value_parser = parse_stop)]
    pub(crate) stop: Vec<String>,
    /// A turn that reaches it is cut off (eval scores it wrong unless its conclusion closed); the
    /// seed's inference used 2048
    #[arg(long, alias = "max_new_tokens", default_value_t = 2048, value_parser = parse_max_new_tokens, allow_negative_numbers = true)]
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
    pub(crate) double_bos: bool,
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
    pub(crate) fn pin_date(&self) {
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
    pub(crate) fn options(
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
        if self.turns == 1 && !matches!(self.position, PositionArg::AfterAnswer) {
            tracing::warn!("--position applies to correction turns, and --turns 1 asks none");
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

pub(crate) fn infer(args: InferArgs) -> Result<ExitCode> {
    use std::io::Write;
    use trainer::data::image;
    use trainer::infer::Session;

    // (clap's `requires` does not hold --out to --questions, which requires it in turn)
    if let (Some(out), None) = (&args.out, &args.questions) {
        anyhow::bail!(
            "--out {} is for --questions FILE (many questions, a JSON line each); one --question prints its answer (--json: as JSON), redirect it to keep it",
            out.display()
        );
    }
    args.generation.pin_date();
    let (ckpt, model_dir, generation) =
        checkpoint_and_base(&args.weights, &args.generation, &|c| {
            Ok(c.verify_part(0, 1).map(drop)?)
        })?;
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
    // (generation_config.json too, before the model loads)
    let opts = generation.options(args.temperature, &model_dir)?;
    let (model, text, image_config) = load_for_generation(
        &model_dir,
        args.weights.adapter.as_deref(),
        ckpt.as_ref(),
        generation.double_bos,
        &generation.stop,
    )?;
    let session = Session {
        model: &model,
        text: &text,
        image_config: &image_config,
    };
    // the turns headed so far (a turn that wrote no text gets its header too, before the next)
    let mut headed = 0;
    let mut stdout = std::io::stdout();
    let head = |out: &mut std::io::Stdout, upto: usize, headed: &mut usize| {
        for turn in *headed..=upto {
            let gap = if turn > 0 { "\n" } else { "" };
            let _ = writeln!(out, "{gap}--- turn {turn} ---");
        }
        *headed = (*headed).max(upto + 1);
    };
    let question = args.question.as_deref().unwrap_or_default();
    let turns = session.run(img.as_ref(), question, &opts, &mut |turn, piece| {
        if args.json {
            return;
        }
        if turn >= headed {
            head(&mut stdout, turn, &mut headed);
        }
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    if !args.json && turns.len() > headed {
        head(&mut stdout, turns.len() - 1, &mut headed);
    }
    if args.json {
        let out = serde_json::json!({
            "turns": turns,
            "model": model_dir.display().to_string(),
            "adapter": args.weights.adapter.as_ref().map(|p| p.display().to_string()),
            "checkpoint": args.weights.checkpoint.as_ref().map(|p| p.display().to_string()),
            "settings": opts,
            // (the "Today Date" a text-only prompt renders: --date, else this process's day)
            "template_date": trainer::data::template::strftime_now("%Y-%m-%d"),
        });
        let text = serde_json::to_string_pretty(&out)?;
        written(writeln!(stdout, "{text}").and_then(|()| stdout.flush()))?;
    } else {
        // (the streamed text's write errors were passed over: seen here, at its end)
        written(writeln!(stdout).and_then(|()| stdout.flush()))?;
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

/// A write to stdout: a reader that closed it (`| head`) ends the process quietly with a shell's
/// status for SIGPIPE (nothing is left to write); another failure (a full disk) is an error.
fn written(r: std::io::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(crate::BROKEN_PIPE_STATUS.into())
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context("writing to stdout (a full disk, or an output that cannot be written?)")),
        Ok(()) => Ok(()),
    }
}

/// `infer --questions FILE --out OUT`: every question of FILE not yet in OUT, in batches of
/// --batch-size, each answered as `infer` alone answers it greedily (up to the rounding of
/// batched kernels); a sampling run seeds each question from --seed and its id (`seed_of`: not
/// `infer --seed S` alone, which uses S itself), so its answer does not depend on its batch; a JSON
/// line per question appended to OUT.
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
        // (the questions file's folder; "." for a file named without one)
        None => file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(
                || std::path::PathBuf::from("."),
                std::path::Path::to_path_buf,
            ),
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
        args.weights.adapter.as_deref(),
        args.weights.checkpoint.as_deref(),
    );
    let mut settings = serde_json::json!({
        // (paths as text: one that is not UTF-8 would not serialize)
        "model": model_dir.display().to_string(),
        "adapter": args.weights.adapter.as_ref().map(|p| p.display().to_string()),
        "checkpoint": args.weights.checkpoint.as_ref().map(|p| p.display().to_string()),
        // the folders' content (a resume compares it, not their paths)
        "files": trainer::eval::content_fingerprints(&made_with),
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
    // every image there and readable as far as its header tells before the model loads, every
    // question's image decoded and prompt built before the first is generated (a bad one would
    // stop the run when its batch comes, hours in, and every rerun there): all named at once
    let named = file.display().to_string();
    let mut problems = vec![];
    for q in &todo {
        let Some(p) = q.image.as_ref() else { continue };
        let checked = match p.is_file() {
            true => trainer::data::image::check_header(p),
            false => Err(format!(
                "image {} not found (paths are relative to --image-root {})",
                p.display(),
                image_root.display()
            )),
        };
        if let Err(e) = checked {
            problems.push((q.line, e));
        }
    }
    trainer::eval::bench_problems(&named, problems)?;
    let (model, text, image_config) = load_for_generation(
        model_dir,
        args.weights.adapter.as_deref(),
        ckpt.as_ref(),
        generation.double_bos,
        &generation.stop,
    )?;
    let session = trainer::infer::Session {
        model: &model,
        text: &text,
        image_config: &image_config,
    };
    let mut problems = vec![];
    for q in &todo {
        let checked = session
            .prompt_ids(&q.question, q.image.is_some(), &[], &opts)
            .map(drop)
            .map_err(|e| format!("id {:?}: {e}", q.id))
            .and_then(|()| {
                q.image
                    .as_deref()
                    .map_or(Ok(()), |p| trainer::data::image::load_rgb(p).map(drop))
            });
        if let Err(e) = checked {
            problems.push((q.line, e));
        }
    }
    trainer::eval::bench_problems(&named, problems)?;
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
        let outputs = session
            .run_batch_seeded(&inputs, &seeds, &opts, &mut |_, _, _| {})
            .with_context(|| {
                let at: Vec<String> = batch.iter().map(|q| format!("{named}:{} (id {:?})", q.line, q.id)).collect();
                format!(
                    "generating for {} ({} answered questions are kept in --out {}: a rerun continues after them)",
                    at.join(", "),
                    answered,
                    out.display()
                )
            })?;
        for (q, turns) in batch.iter().zip(outputs) {
            let line = serde_json::json!({
                "id": q.id,
                // (as the questions file writes it)
                "image": q.image_text,
                // (what a resume compares: the path may hold another image by then)
                "image_sha256": q.image.as_deref().and_then(trainer::checkpoint::file_sha256),
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

/// `--checkpoint` (read, its files checked by `verify`, its base checked) and the model folder:
/// `--model`, else the checkpoint's run's; and the generation settings with the prompt as the
/// run trained on it (the flags can only add to that): the checkpoint's manifest says how, an
/// exported adapter or merged folder its `llava_sco_prompt.json`.
pub(crate) fn checkpoint_and_base(
    weights: &WeightsArgs,
    generation: &GenerationArgs,
    verify: &dyn Fn(&trainer::infer::CheckpointWeights) -> Result<()>,
) -> Result<(
    Option<trainer::infer::CheckpointWeights>,
    PathBuf,
    GenerationArgs,
)> {
    let (model, adapter) = (weights.model.as_ref(), weights.adapter.as_deref());
    let ckpt = weights
        .checkpoint
        .as_deref()
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
    // (another missing folder is named by the model load, with what the folder should hold)
    let hub_id = model.filter(|m| trainer::config::is_hub_id(m) && !model_dir.is_dir());
    if let Some(m) = hub_id {
        anyhow::bail!(
            "--model {}: no such folder ({})",
            m.display(),
            trainer::config::HUB_ID_NOTE
        );
    }
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
pub(crate) fn print_prompt_settings(out: &std::path::Path) {
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
pub(crate) fn load_for_generation(
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

/// --stop: a non-empty string (an empty one would end every turn at once; transformers refuses it).
fn parse_stop(s: &str) -> Result<String, String> {
    match s.is_empty() {
        true => Err("an empty stop string would end every turn at once; give some text".into()),
        false => Ok(s.to_string()),
    }
}

/// --temperature: a finite number >= 0 (0 = greedy).
pub(crate) fn parse_temperature(s: &str) -> Result<f64, String> {
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
