//! `trainer eval` (a benchmark scored turn by turn) and `trainer compare` (two evaluations paired).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::infer::{
    at_least_one, checkpoint_and_base, load_for_generation, parse_temperature, GenerationArgs,
    WeightsArgs,
};

/// `trainer eval`.
#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    weights: WeightsArgs,
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

pub(crate) fn eval(args: EvalArgs) -> Result<ExitCode> {
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
    let (ckpt, model_dir, generation) =
        checkpoint_and_base(&args.weights, &args.generation, &verify)?;
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
    let opts = EvalOptions {
        infer: generation.options(Some(args.temperature), &model_dir)?,
        image_root: args.image_root.clone(),
        out: args.out.clone(),
        limit: args.limit,
        training_metrics: args.train_metrics.clone(),
        batch_size: args.batch_size as usize,
        made_with: trainer::eval::made_with(
            &model_dir,
            args.weights.adapter.as_deref(),
            args.weights.checkpoint.as_deref(),
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
        let cut = match t.cut_off {
            0 => String::new(),
            n => format!(", {n} cut off at --max-new-tokens"),
        };
        println!(
            "turn {}: {}/{} correct ({:.1}%){cut}",
            t.turn,
            t.correct,
            t.total,
            100.0 * t.accuracy
        );
    }
    for t in &report.transitions {
        println!(
            "turn {} -> {}: wrong->right {} ({} from cut off), right->wrong {} ({} cut off), answer changed {:.1}%",
            t.from,
            t.to,
            t.wrong_right,
            t.wrong_right_from_cut_off,
            t.right_wrong,
            t.right_cut_off,
            100.0 * t.change_rate
        );
    }
    println!("report: {}", args.out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}

/// `trainer compare`.
#[derive(Args)]
pub(crate) struct CompareArgs {
    /// `trainer eval --out` folder of run A (e.g. the base model)
    a: PathBuf,
    /// `trainer eval --out` folder of run B (e.g. the trained model)
    b: PathBuf,
    /// Also write the comparison as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `trainer compare A B [--json FILE]`.
pub(crate) fn compare(args: CompareArgs) -> Result<ExitCode> {
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
        anyhow::ensure!(
            !path.is_dir(),
            "--json {}: a folder; give the file the comparison is written to, e.g. {}",
            path.display(),
            path.join("compare.json").display()
        );
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
    // (the file first: a reader of stdout that goes away early does not cost it)
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&c)? + "\n";
        trainer::checkpoint::replace_synced(&path, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("--json: {e:#}"))?;
    }
    print!("{}", c.markdown());
    Ok(ExitCode::SUCCESS)
}
