//! trainer infer's engine on a tiny random model with the data fixtures' tokenizer and processor:
//! greedy turns equal the model's no-cache greedy reference, sampling is seedable, correction turns
//! carry the earlier answer and the prompt.
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use trainer::data::image::{load_rgb, process, ImageProcessorConfig};
use trainer::data::records::DEFAULT_CORRECTION_PROMPT;
use trainer::data::tokenize::TextProcessor;
use trainer::infer::{InferOptions, Position, Session};
use trainer::model::{Batch, GenerateOptions, LoadOptions, MllamaConfig, MllamaModel};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/data"
    ))
}

/// A random Mllama whose vocabulary and tiles agree with the fixture tokenizer (image token 711).
fn model() -> MllamaModel {
    model_of_width(64, 128)
}

/// [`model`] with another text width: at 256 / 512 the LM head, q/o projections and MLP are large
/// enough for the decode-time fast path (model/gemv.rs); at 64 / 128 every linear stays libtorch's.
fn model_of_width(hidden: usize, intermediate: usize) -> MllamaModel {
    let cfg = r#"{
      "image_token_index": 711,
      "vision_config": {"hidden_size": 32, "attention_heads": 2, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_global_layers": 1, "intermediate_layers_indices": [0],
        "vision_output_dim": 64, "image_size": 56, "patch_size": 14, "max_num_tiles": 4},
      "text_config": {"vocab_size": 711, "hidden_size": HIDDEN, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": INTERMEDIATE, "cross_attention_layers": [1],
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "bos_token_id": 455, "eos_token_id": 456, "pad_token_id": 459}
    }"#;
    let cfg = cfg
        .replace("HIDDEN", &hidden.to_string())
        .replace("INTERMEDIATE", &intermediate.to_string());
    let config = MllamaConfig::from_json_str(&cfg).expect("config");
    MllamaModel::random(config, LoadOptions::default(), 5).expect("model")
}

fn opts(turns: usize, temperature: f64, seed: u64) -> InferOptions {
    InferOptions {
        turns,
        correction_prompt: DEFAULT_CORRECTION_PROMPT.into(),
        position: Position::AfterAnswer,
        temperature,
        top_k: 50,
        top_p: 0.9,
        repetition_penalty: 1.0,
        stop: vec![],
        max_new_tokens: 12,
        seed,
        keep_image_placeholder: false,
        double_bos: false,
        date: None,
        eos_token_ids: vec![],
    }
}

fn first_image() -> PathBuf {
    let dir = fixtures().join("images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files[0].clone()
}

/// A session over `model` with the fixture processors.
fn session<'a>(
    model: &'a MllamaModel,
    procs: &'a (TextProcessor, ImageProcessorConfig),
) -> Session<'a> {
    Session {
        model,
        text: &procs.0,
        image_config: &procs.1,
    }
}

/// The fixture tokenizer's text and image processors.
fn processors() -> (TextProcessor, ImageProcessorConfig) {
    let tok = fixtures().join("tok");
    (
        TextProcessor::from_model_dir(&tok, false).unwrap(),
        ImageProcessorConfig::from_model_dir(&tok).unwrap(),
    )
}

#[test]
fn greedy_turn_equals_the_no_cache_reference_and_turns_chain() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let image = load_rgb(&first_image()).unwrap();
    let o = opts(2, 0.0, 1);
    let turns = greedy_equals_the_no_cache_reference(&session, &image, &o);
    let ids = session
        .prompt_ids("How many red shapes?", true, &[], &o)
        .unwrap();

    // turn 1's prompt holds the turn-0 answer and the correction prompt
    let next = session
        .prompt_ids("How many red shapes?", true, &[turns[0].text.clone()], &o)
        .unwrap();
    let rendered = procs
        .0
        .tokenizer
        .decode(&next.iter().map(|&i| i as u32).collect::<Vec<_>>(), false)
        .unwrap();
    assert!(rendered.contains(DEFAULT_CORRECTION_PROMPT), "{rendered}");
    assert!(next.len() > ids.len() + turns[0].token_ids.len());
}

/// generation_config.json's eos ids end a turn besides the model config's, as transformers'
/// `generate` stops at them: with the first greedy token among them, the turn is empty.
#[test]
fn generation_config_eos_ids_end_a_turn() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let image = load_rgb(&first_image()).unwrap();
    let mut o = opts(1, 0.0, 1);
    let run = |o: &InferOptions| {
        session
            .run(Some(&image), "How many red shapes?", o, &mut |_, _| {})
            .unwrap()
    };
    let free = run(&o);
    assert!(free[0].token_ids.len() > 1, "{:?}", free[0].token_ids);
    o.eos_token_ids = vec![free[0].token_ids[0]];
    let stopped = run(&o);
    assert!(
        stopped[0].token_ids.is_empty(),
        "{:?}",
        stopped[0].token_ids
    );
    // (the second token instead: one token, then the stop)
    o.eos_token_ids = vec![free[0].token_ids[1]];
    assert_eq!(run(&o)[0].token_ids, free[0].token_ids[..1]);
}

#[test]
fn streamed_pieces_add_up_to_the_text_wherever_generation_stops() {
    // sampled from a random model over a small byte-level vocabulary, answers often end inside a
    // character (max_new_tokens cuts them); the stream must flush the bytes it held back
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let mut cut_inside = 0;
    // (each answer ends inside a character with a chance of about 1 in 12: seeds until 3 have)
    for seed in 0..80 {
        if cut_inside >= 3 {
            break;
        }
        for max_new in [3, 7, 12] {
            let o = InferOptions {
                max_new_tokens: max_new,
                ..opts(1, 1.0, seed)
            };
            let mut streamed = String::new();
            let turns = session
                .run(None, "How many red shapes?", &o, &mut |_, p| {
                    streamed.push_str(p)
                })
                .unwrap();
            let exact = procs.0.decode_exact(&turns[0].token_ids).unwrap();
            assert_eq!(streamed, exact, "seed {seed}, max_new_tokens {max_new}");
            cut_inside += usize::from(exact.ends_with('\u{FFFD}'));
        }
    }
    assert!(
        cut_inside >= 3,
        "only {cut_inside} answers ended inside a character"
    );
}

#[test]
fn decode_steps_on_the_gemv_fast_path_equal_the_no_cache_reference() {
    // large enough linears for model/gemv.rs (its own test compares it with libtorch's linear);
    // the no-cache reference multiplies whole sequences with libtorch's gemm
    let model = model_of_width(256, 512);
    let procs = processors();
    let session = session(&model, &procs);
    let image = load_rgb(&first_image()).unwrap();
    let turns = greedy_equals_the_no_cache_reference(&session, &image, &opts(1, 0.0, 1));
    assert!(turns[0].token_ids.len() > 1, "{:?}", turns[0].token_ids);
}

/// Turns of `session.run` on "How many red shapes?"; asserts that the pieces streamed add up to
/// turn 0's text and that its tokens equal the model's own greedy generate without the KV cache.
fn greedy_equals_the_no_cache_reference(
    session: &Session,
    image: &trainer::data::image::RgbImage,
    o: &InferOptions,
) -> Vec<trainer::infer::TurnOutput> {
    let (model, text, image_config) = (session.model, session.text, session.image_config);
    let mut streamed = String::new();
    let turns = session
        .run(Some(image), "How many red shapes?", o, &mut |t, p| {
            if t == 0 {
                streamed.push_str(p)
            }
        })
        .unwrap();
    assert_eq!(turns.len(), o.turns);
    assert_eq!(
        streamed, turns[0].text,
        "streamed pieces add up to the text"
    );

    // the reference: the model's own greedy generate, without the KV cache, on the same prompt
    let ids = session
        .prompt_ids("How many red shapes?", true, &[], o)
        .unwrap();
    let images = session.images(&ids, &process(image_config, image), Device::Cpu);
    let batch = Batch {
        input_ids: Tensor::from_slice(&ids).view([1, -1]),
        attention_mask: None,
        labels: None,
        images: Some(images),
    };
    let eos = vec![456, text.ids.eot];
    let gen = GenerateOptions {
        max_new_tokens: 12,
        min_new_tokens: 0,
        eos_token_ids: eos.clone(),
        pad_token_id: 459,
        use_cache: false,
    };
    let reference: Vec<i64> = Vec::try_from(
        model
            .generate(&batch, &gen)
            .unwrap()
            .view([-1])
            .to_kind(Kind::Int64),
    )
    .unwrap();
    let reference: Vec<i64> = reference
        .into_iter()
        .take_while(|t| !eos.contains(t))
        .collect();
    assert_eq!(turns[0].token_ids, reference);
    turns
}

#[test]
fn sampling_is_seedable() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let run = |seed| {
        session
            .run(None, "Describe.", &opts(1, 1.0, seed), &mut |_, _| {})
            .unwrap()[0]
            .token_ids
            .clone()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

#[test]
fn zero_turns_is_an_error() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let err = session
        .run(None, "q", &opts(0, 0.0, 1), &mut |_, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("at least 1"));
}

fn all_images() -> Vec<PathBuf> {
    let dir = fixtures().join("images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

#[test]
fn batched_greedy_equals_unbatched_greedy_token_for_token() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let files = all_images();
    let images: Vec<_> = files.iter().take(3).map(|p| load_rgb(p).unwrap()).collect();
    // prompts of different lengths (left padding differs per row), with and without images
    let questions = [
        "How many?",
        "Which color is the largest shape in the picture, and where is it?",
        "What shape is in the top left corner?",
    ];
    let mut items: Vec<(Option<&trainer::data::image::RgbImage>, &str)> = images
        .iter()
        .zip(questions)
        .map(|(im, q)| (Some(im), q))
        .collect();
    items.push((None, "Describe."));
    items.push((None, "Name three colors that appear in the image, please."));
    let o = opts(2, 0.0, 1);
    let batched = session.run_batch(&items, &o, &mut |_, _, _| {}).unwrap();
    assert_eq!(batched.len(), items.len());
    let mut turn0_tokens = Vec::new();
    for (i, (image, q)) in items.iter().enumerate() {
        let alone = session.run(*image, q, &o, &mut |_, _| {}).unwrap();
        for t in 0..2 {
            assert_eq!(
                batched[i][t].token_ids, alone[t].token_ids,
                "item {i} turn {t}"
            );
            assert_eq!(batched[i][t].text, alone[t].text, "item {i} turn {t}");
            assert_eq!(batched[i][t].prompt_tokens, alone[t].prompt_tokens);
        }
        turn0_tokens.push(alone[0].tokens);
        // turn 1's prompt holds turn 0's answer as generated (decoded without clean-up)
        let answer = session.text.decode_exact(&alone[0].token_ids).unwrap();
        let want = session
            .prompt_ids(q, image.is_some(), &[answer], &o)
            .unwrap();
        assert_eq!(alone[1].prompt_tokens, want.len(), "item {i}");
    }
    // The comparison must not be vacuous. A random model's logits are nearly tied, so on another
    // CPU (other SIMD paths, other roundings) a row may pick a stop token early: require only
    // that most of the budget was generated and that some row ran to max_new_tokens.
    let total: usize = turn0_tokens.iter().sum();
    assert!(
        total * 2 >= 12 * items.len() && turn0_tokens.contains(&12),
        "a random model mostly runs to max_new_tokens: {turn0_tokens:?}"
    );
    let lengths: Vec<usize> = batched.iter().map(|t| t[0].prompt_tokens).collect();
    assert!(
        lengths[0] != lengths[1] && lengths[1] != lengths[2],
        "{lengths:?}"
    );
}

#[test]
fn rows_that_stop_early_leave_the_batch_without_changing_the_others() {
    use trainer::infer::{sampling::Sampler, Prompt};
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let o = opts(1, 0.0, 1);
    let processed: Vec<_> = all_images()
        .iter()
        .take(3)
        .map(|p| process(&procs.1, &load_rgb(p).unwrap()))
        .collect();
    let questions = ["How many?", "Which color is the largest shape?", "Where?"];
    let prompts: Vec<Prompt> = processed
        .iter()
        .zip(questions)
        .map(|(im, q)| Prompt {
            ids: session.prompt_ids(q, true, &[], &o).unwrap(),
            image: Some(im),
        })
        .collect();
    let alone = |eos: &[i64], p: &Prompt| {
        let mut s = Sampler::new(0.0, 1.0, 0);
        tch::no_grad(|| session.generate(&p.ids, p.image, eos, &mut s, 16, &mut |_| {})).unwrap()
    };
    // end-of-turn := the token row 1 generates third, so row 1 stops early and the others go on
    let free = alone(&[], &prompts[1]).1;
    let eos = vec![free[2]];
    let mut samplers = vec![Sampler::new(0.0, 1.0, 0); 3];
    let batched =
        tch::no_grad(|| session.generate_batch(&prompts, &eos, &mut samplers, 16, &mut |_, _| {}))
            .unwrap();
    let mut lengths = vec![];
    for (p, b) in prompts.iter().zip(&batched) {
        let (text, ids) = alone(&eos, p);
        assert_eq!(b.token_ids, ids);
        assert_eq!(b.text, text);
        lengths.push(ids.len());
    }
    // (the token may already occur earlier in row 1's free run; it stops at the first occurrence)
    let stop_at = free.iter().position(|&t| t == eos[0]).unwrap();
    assert_eq!(
        lengths[1], stop_at,
        "row 1 stopped at its end-of-turn token"
    );
    assert!(
        lengths.iter().any(|&n| n > stop_at),
        "{lengths:?}: some row outlived row 1"
    );
}

#[test]
fn generation_stops_at_every_llama3_end_token_the_tokenizer_has() {
    let (text, _) = processors();
    // the fixture tokenizer: <|end_of_text|> 456, <|eom_id|> 463, <|eot_id|> 464; the config's eos 2
    let stops = trainer::infer::stop_ids(&[2, 464], &text);
    assert_eq!(stops, vec![2, 456, 463, 464]);
}

#[test]
fn a_literal_image_token_in_the_question_is_refused() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let o = opts(1, 0.0, 1);
    let err = session
        .prompt_ids("what is <|image|> here?", true, &[], &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("question") && err.contains("<|image|>"),
        "{err}"
    );
    assert!(session.prompt_ids("what is here?", true, &[], &o).is_ok());
}

/// One image slot per image, as MllamaProcessor requires: an earlier answer that spells the image
/// token loses it (it would be a second slot), and a chat template that places no image token for
/// the image is an error, not an answer given without seeing the image.
#[test]
fn the_prompt_has_one_image_slot_per_image() {
    let model = model();
    let mut procs = processors();
    let o = opts(2, 0.0, 1);
    let image_id = procs.0.ids.image;
    let literal = procs.0.ids.image_token.clone();
    {
        let session = session(&model, &procs);
        let ids = session
            .prompt_ids("q", true, &[format!("a {literal} b")], &o)
            .unwrap();
        assert_eq!(ids.iter().filter(|&&t| t == image_id).count(), 1);
    }
    procs.0.template = trainer::data::template::ChatTemplate::from_source(
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}".into(),
        Default::default(),
    )
    .unwrap();
    let session = session(&model, &procs);
    let err = session
        .prompt_ids("q", true, &[], &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds 0") && err.contains("chat template"),
        "{err}"
    );
}

/// Training's turns are trimmed (`data::records`): a later turn's prompt holds the earlier answer
/// and the correction prompt without surrounding whitespace (an answer cut off at max_new_tokens
/// often ends in "\n\n", which training never put before `<|eot_id|>`).
#[test]
fn earlier_answers_and_the_correction_prompt_are_trimmed_as_training_trims_turns() {
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let answer = "<CONCLUSION>3</CONCLUSION>".to_string();
    let trimmed = session
        .prompt_ids(
            "How many?",
            true,
            std::slice::from_ref(&answer),
            &opts(2, 0.0, 1),
        )
        .unwrap();
    let padded = InferOptions {
        correction_prompt: format!("  {DEFAULT_CORRECTION_PROMPT}\n"),
        ..opts(2, 0.0, 1)
    };
    let untrimmed = session
        .prompt_ids("How many?", true, &[format!("\n{answer}\n\n")], &padded)
        .unwrap();
    assert_eq!(untrimmed, trimmed);
}

/// A second set of images for a cache that holds an earlier image's cross-attention K/V is an
/// error (transformers appends them; replacing them would drop the first image silently).
#[test]
fn images_for_a_cache_holding_earlier_image_states_are_refused() {
    use trainer::model::KvCache;
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let image = load_rgb(&first_image()).unwrap();
    let ids = session
        .prompt_ids("How many red shapes?", true, &[], &opts(1, 0.0, 1))
        .unwrap();
    let images = session.images(&ids, &process(&procs.1, &image), Device::Cpu);
    let input = Tensor::from_slice(&ids).view([1, -1]);
    let mut cache = KvCache::new(model.text.layers.len());
    let cam = Some(&images.cross_attention_mask);
    let step = |cache: &mut KvCache| {
        model.forward_step(&input, None, None, Some(&images), cam, Some(cache))
    };
    assert!(step(&mut cache).is_ok());
    let err = step(&mut cache).unwrap_err().to_string();
    assert!(err.contains("already holds an earlier image"), "{err}");
}

/// A stop string ends a row once its text holds it (kept), as transformers' stop_strings: the
/// text is the free run's, cut right after the piece that completed the string.
#[test]
fn a_stop_string_ends_the_row() {
    use trainer::infer::{sampling::Sampler, Prompt};
    let model = model();
    let procs = processors();
    let session = session(&model, &procs);
    let o = opts(1, 0.0, 1);
    let image = process(&procs.1, &load_rgb(&first_image()).unwrap());
    let ids = session.prompt_ids("How many?", true, &[], &o).unwrap();
    let run_for = |stops: Vec<String>, max_new: usize| {
        let prompt = Prompt {
            ids: ids.clone(),
            image: Some(&image),
        };
        let mut s = [Sampler::new(0.0, 1.0, 0).with_stop_strings(stops)];
        tch::no_grad(|| session.generate_batch(&[prompt], &[], &mut s, max_new, &mut |_, _| {}))
            .unwrap()
            .remove(0)
    };
    let run = |stops: Vec<String>| run_for(stops, 24);
    let free = run(vec![]);
    assert!(!free.ended, "cut at max_new");
    assert_eq!(free.token_ids.len(), 24, "no end token: {:?}", free.text);
    // a stop string from the middle of the free text
    let chars: Vec<char> = free.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let stopped = run(vec![stop.clone()]);
    assert!(
        stopped.token_ids.len() < 24,
        "{:?} in {:?}",
        stop,
        free.text
    );
    assert!(free.text.starts_with(&stopped.text));
    assert!(
        stopped.text.contains(&stop),
        "{:?} lacks {stop:?}",
        stopped.text
    );
    assert_eq!(
        stopped.token_ids[..],
        free.token_ids[..stopped.token_ids.len()]
    );
    assert!(stopped.ended);
    // a stop string completed by the last token allowed: ended by itself, not cut off (eval
    // counts it finished)
    let n = stopped.token_ids.len();
    assert!(run_for(vec![stop.clone()], n).ended);
    assert!(!run_for(vec![], n).ended);
}
