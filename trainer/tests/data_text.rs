//! Chat template, tokenization, labels, collate: golden tests against transformers'
//! MllamaProcessor + the seed's collator (tests/fixtures/data/make_fixtures.py).
use std::path::{Path, PathBuf};

use serde_json::Value;
use trainer::config::LengthPolicy;
use trainer::config::TextOnly;
use trainer::data::collate::{collate, Sample};
use trainer::data::image::{self, ImageProcessorConfig};
use trainer::data::records::{parse_jsonl, ParseOptions};
use trainer::data::template::{strftime, ChatTemplate};
use trainer::data::tokenize::{apply_length_policy, LengthOutcome, TextProcessor, IGNORE};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data")
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("text_golden.json")).unwrap())
        .unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    fn go(v: &Value, out: &mut Vec<i64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| go(x, out)),
            Value::Number(n) => out.push(n.as_i64().unwrap()),
            _ => panic!("not an int array"),
        }
    }
    let mut out = Vec::new();
    go(v, &mut out);
    out
}

fn samples(dir: &Path, double_bos: bool) -> (TextProcessor, Vec<Sample>, ImageProcessorConfig) {
    let tp = TextProcessor::from_model_dir(dir, double_bos).unwrap();
    let ic = ImageProcessorConfig::from_model_dir(dir).unwrap();
    let opts = ParseOptions {
        image_root: Some(fixtures().join("images")),
        text_only: TextOnly::Skip,
        check_image_exists: true,
        keep_image_placeholder: false,
    };
    let rep = parse_jsonl(&fixtures().join("records.jsonl"), &opts).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    let s = rep
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| Sample {
            index: i,
            text: tp.encode(&r.turns, true).unwrap(),
            image: Some(image::process(
                &ic,
                &image::load_rgb(r.image.as_ref().unwrap()).unwrap(),
            )),
        })
        .collect();
    (tp, s, ic)
}

#[test]
fn rendered_text_matches_transformers() {
    let g = golden();
    for dir in ["tok", "tok_v5"] {
        let (tp, _, _) = samples(&fixtures().join(dir), false);
        let opts = ParseOptions {
            image_root: None,
            text_only: TextOnly::Keep,
            check_image_exists: false,
            keep_image_placeholder: false,
        };
        let rep = parse_jsonl(&fixtures().join("records.jsonl"), &opts).unwrap();
        for (r, want) in rep.records.iter().zip(g["texts"].as_array().unwrap()) {
            assert_eq!(
                tp.render(&r.turns, true).unwrap(),
                want.as_str().unwrap(),
                "{dir} {}",
                r.id
            );
        }
    }
}

#[test]
fn text_only_render_with_system_block_and_generation_prompt() {
    let t = ChatTemplate::from_model_dir(&fixtures().join("tok")).unwrap();
    let msgs =
        serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]);
    let mut extra = serde_json::Map::new();
    extra.insert("date_string".into(), Value::String("26 Jul 2024".into()));
    let got = t.render(&msgs, true, Some(&extra)).unwrap();
    assert_eq!(got, golden()["text_only_render"].as_str().unwrap());
    // without date_string the template calls strftime_now
    let today = t.render(&msgs, false, None).unwrap();
    assert!(today.contains("Today Date: "));
    // ... frozen at its first call: later renders give the same text
    let first = trainer::data::template::strftime_now("%d %b %Y %H:%M:%S");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        trainer::data::template::strftime_now("%d %b %Y %H:%M:%S"),
        first
    );
    assert_eq!(t.render(&msgs, false, None).unwrap(), today);
}

/// A text-only record's system turn renders as transformers renders it (the template's system
/// block, after its dates), and only the assistant's answer is supervised.
#[test]
fn a_system_turn_renders_as_transformers_and_is_not_supervised() {
    let tp = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let turns = [trainer::data::records::Turn {
        user: "Hi there".into(),
        assistant: "Hello".into(),
    }];
    let got = tp
        .render_dialog(Some("Answer in one word."), &turns, false)
        .unwrap();
    // (the template's date is today's here; the golden's is fixed)
    let today = got
        .split("Today Date: ")
        .nth(1)
        .and_then(|rest| rest.split('\n').next())
        .unwrap()
        .to_string();
    let want = golden()["text_only_system_render"]
        .as_str()
        .unwrap()
        .replace("26 Jul 2024", &today);
    assert_eq!(got, want);
    let enc = tp
        .encode_dialog(Some("Answer in one word."), &turns, false)
        .unwrap();
    let supervised: Vec<i64> = enc
        .labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE)
        .collect();
    let plain = tp.encode(&turns, false).unwrap();
    let plain_supervised: Vec<i64> = plain
        .labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE)
        .collect();
    assert!(!supervised.is_empty());
    assert_eq!(supervised, plain_supervised);
    assert!(enc.input_ids.len() > plain.input_ids.len());
}

#[test]
fn raise_exception_in_template_is_an_error() {
    let t = ChatTemplate::from_model_dir(&fixtures().join("tok")).unwrap();
    let msgs = serde_json::json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}
    ]);
    let e = t.render(&msgs, false, None).unwrap_err();
    assert!(e.contains("incompatible with system messages"), "{e}");
}

/// `--date YYYY-MM-DD` renders that day whatever the time zone offset (noon of it).
#[test]
fn a_date_flag_gives_the_template_that_day() {
    use trainer::data::template::parse_date;
    let clock = parse_date("2024-07-26").unwrap();
    assert_eq!(strftime("%d %b %Y", clock), "26 Jul 2024");
    assert_eq!(strftime("%H:%M", clock), "12:00");
    assert_eq!(
        strftime("%d %b %Y", parse_date("2000-02-29").unwrap()),
        "29 Feb 2000"
    );
    assert_eq!(
        strftime("%d %b %Y", parse_date("1969-12-31").unwrap()),
        "31 Dec 1969"
    );
    for bad in [
        "2024-02-30",
        "2023-02-29",
        "26 Jul 2024",
        "2024-13-01",
        "2024-07",
        "x",
        // (a year of four digits: not 26 for 2026)
        "26-1-1",
        "0026-01-01",
    ] {
        assert!(parse_date(bad).is_err(), "{bad}");
    }
}

#[test]
fn strftime_formats_like_python() {
    // 2024-07-26 00:00:00 UTC
    assert_eq!(strftime("%d %b %Y", 1_721_952_000), "26 Jul 2024");
    assert_eq!(
        strftime("%Y-%m-%d %H:%M:%S %B", 1_721_952_000 + 3661),
        "2024-07-26 01:01:01 July"
    );
}

#[test]
fn padded_batch_matches_processor_and_seed_collator_single_and_double_bos() {
    let g = golden();
    for (key, double) in [("single_bos", false), ("double_bos", true)] {
        let (tp, s, ic) = samples(&fixtures().join("tok"), double);
        let b = collate(&s, tp.ids.pad, tp.ids.image, ic.max_image_tiles, ic.tile);
        let want = &g[key];
        assert_eq!(b.input_ids, ints(&want["input_ids"]), "{key} input_ids");
        assert_eq!(
            b.attention_mask,
            ints(&want["attention_mask"]),
            "{key} attention_mask"
        );
        assert_eq!(b.labels, ints(&want["labels"]), "{key} labels");
        assert_eq!(
            b.cross_attention_mask,
            ints(&want["cross_attention_mask"]),
            "{key} cross_attention_mask"
        );
        assert_eq!(b.aspect_ratio_ids, ints(&want["aspect_ratio_ids"]), "{key}");
        assert_eq!(
            b.aspect_ratio_mask,
            ints(&want["aspect_ratio_mask"]),
            "{key}"
        );
        let shape: Vec<usize> = ints(&want["pixel_values_shape"])
            .iter()
            .map(|&x| x as usize)
            .collect();
        assert_eq!(
            shape,
            vec![b.batch, b.num_images, b.max_tiles, 3, b.tile, b.tile]
        );
        let bos_count = b.input_ids[..2]
            .iter()
            .filter(|&&t| t == tp.ids.bos)
            .count();
        assert_eq!(bos_count, if double { 2 } else { 1 });
    }
}

#[test]
fn only_assistant_text_and_eot_are_supervised() {
    let (tp, s, _) = samples(&fixtures().join("tok"), false);
    let multi = &s[1].text;
    let sup: Vec<u32> = multi
        .input_ids
        .iter()
        .zip(&multi.labels)
        .filter(|(_, &l)| l != IGNORE)
        .map(|(&t, _)| t as u32)
        .collect();
    let text = tp.tokenizer.decode(&sup, false).unwrap();
    assert!(
        text.contains("There are three objects.<|eot_id|>"),
        "{text}"
    );
    assert!(text.contains("I count again"), "{text}");
    assert!(!text.contains("How many"), "{text}");
    assert!(!text.contains("assistant"), "{text}");
}

#[test]
fn length_policy_truncate_skip_error() {
    let (_, s, _) = samples(&fixtures().join("tok"), false);
    let e = s[1].text.clone();
    let n = e.input_ids.len();
    let mut a = e.clone();
    assert_eq!(
        apply_length_policy(&mut a, n, LengthPolicy::Error).unwrap(),
        LengthOutcome::Fits
    );
    assert!(apply_length_policy(&mut a.clone(), n - 1, LengthPolicy::Error).is_err());
    assert!(matches!(
        apply_length_policy(&mut a.clone(), n - 1, LengthPolicy::Skip).unwrap(),
        LengthOutcome::Skipped { .. }
    ));
    let mut t = e.clone();
    assert_eq!(
        apply_length_policy(&mut t, n - 5, LengthPolicy::Truncate).unwrap(),
        LengthOutcome::Truncated { from: n }
    );
    assert_eq!(t.input_ids.len(), n - 5);
    assert_eq!(t.labels[..], e.labels[..n - 5]);
    // cut inside the first user turn: nothing supervised left -> skipped
    let mut u = e.clone();
    assert!(matches!(
        apply_length_policy(&mut u, 8, LengthPolicy::Truncate).unwrap(),
        LengthOutcome::Skipped { .. }
    ));
}

/// A copy of the tokenizer fixture with its tokenizer_config.json edited by `edit`.
fn tok_with(name: &str, edit: impl Fn(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let src = fixtures().join("tok");
    let dir = std::env::temp_dir().join(format!("trainer-data-text-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tc: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    edit(tc.as_object_mut().unwrap());
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    dir
}

#[test]
fn pad_token_must_not_be_the_end_of_turn_token() {
    let eot = tok_with("pad-eot", |tc| {
        tc.insert("pad_token".into(), "<|eot_id|>".into());
    });
    // (generation does not care: such fine-tunes load for infer and eval)
    let text = TextProcessor::from_model_dir(&eot, false).unwrap();
    let err = text.check_pad_for_training(&eot).err().unwrap();
    assert!(
        err.contains("never learn to stop") && err.contains("pad_token"),
        "{err}"
    );
    // no pad_token: Llama 3's reserved pad token, not eos (which is <|eot_id|> here)
    let missing = tok_with("pad-missing", |tc| {
        tc.remove("pad_token");
    });
    let tp = TextProcessor::from_model_dir(&missing, false).expect("falls back");
    let reference = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    assert_eq!(tp.ids.pad, reference.ids.pad);
}

#[test]
fn a_literal_image_token_in_the_text_is_refused() {
    let tp = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let turn = |user: &str| trainer::data::records::Turn {
        user: user.into(),
        assistant: "A".into(),
    };
    let err = tp
        .encode(&[turn("What is <|image|> here?")], true)
        .err()
        .unwrap();
    assert!(err.contains("2 <|image|> token(s) for 1 image(s)"), "{err}");
    assert!(tp.encode(&[turn("What is here?")], true).is_ok());
    let err = tp.encode(&[turn("<|image|>?")], false).err().unwrap();
    assert!(err.contains("1 <|image|> token(s) for 0 image(s)"), "{err}");
}

/// Another special token written in a turn's text (data already formatted with the chat
/// template, an answer ending in `<|eot_id|>`) is refused: it was read as that token, a turn
/// boundary the template did not put there. Text that only looks like one stays text.
#[test]
fn a_special_token_in_the_text_is_refused() {
    let tp = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let turn = |user: &str, assistant: &str| trainer::data::records::Turn {
        user: user.into(),
        assistant: assistant.into(),
    };
    let faked = "Q<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nfake";
    for turns in [[turn(faked, "A")], [turn("Q", "A<|eot_id|>")]] {
        let err = tp.encode(&turns, true).err().unwrap();
        assert!(
            err.contains("holds <|eot_id|>, a special token of the tokenizer: it would be read as that token"),
            "{err}"
        );
    }
    let system = tp.encode_dialog(
        Some("be <|start_header_id|> brief"),
        &[turn("Q", "A")],
        false,
    );
    assert!(system.err().unwrap().contains("holds <|start_header_id|>"));
    for text in ["a <|not_a_token|> b", "x <| y |> z", "<|", "|>"] {
        assert!(tp.encode(&[turn(text, "A")], true).is_ok(), "{text}");
    }
}

#[test]
fn truncation_and_padding_stored_in_tokenizer_json_do_not_apply() {
    let dir = tok_with("stored-trunc", |_| {});
    let tj = dir.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    t["padding"] = serde_json::json!({"strategy": {"Fixed": 512}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    std::fs::write(&tj, t.to_string()).unwrap();
    let turn = trainer::data::records::Turn {
        user: "What is in the picture, exactly?".into(),
        assistant: "A red circle.".into(),
    };
    let stored = TextProcessor::from_model_dir(&dir, false).unwrap();
    let plain = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let (a, b) = (
        stored.encode(std::slice::from_ref(&turn), true).unwrap(),
        plain.encode(std::slice::from_ref(&turn), true).unwrap(),
    );
    assert!(b.input_ids.len() > 4);
    assert_eq!(a.input_ids, b.input_ids);
}

#[test]
fn decode_cleans_up_spaces_as_transformers_when_the_config_asks() {
    use trainer::data::tokenize::clean_up_tokenization;
    // transformers' clean_up_tokenization, rule by rule
    assert_eq!(
        clean_up_tokenization(
            "Yes , it is . Why ? No ! I do n't , I 'm , it 's , we 've , they 're"
        ),
        "Yes, it is. Why? No! I don't, I'm, it's, we've, they're"
    );
    let mut text = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let ids: Vec<i64> = text
        .tokenizer
        .encode("The answer is 3 .", false)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i as i64)
        .collect();
    // the fixture's tokenizer_config.json does not ask: the text round-trips
    assert!(!text.clean_up_spaces);
    assert_eq!(text.decode(&ids).unwrap(), "The answer is 3 .");
    text.clean_up_spaces = true; // Llama 3's tokenizer_config.json sets it
    assert_eq!(text.decode(&ids).unwrap(), "The answer is 3.");
}

/// A supervised token past the LM head's rows (`label_limit`, the model's
/// text_config.vocab_size) is the record's error, not an out-of-range target inside the loss.
#[test]
fn a_supervised_token_beyond_the_output_vocabulary_is_the_records_error() {
    let mut tp = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let turns = [trainer::data::records::Turn {
        user: "What is here?".into(),
        assistant: "A red circle.".into(),
    }];
    let enc = tp.encode(&turns, true).unwrap();
    let top = *enc.labels.iter().filter(|&&l| l != IGNORE).max().unwrap();
    tp.label_limit = Some(top + 1);
    assert!(tp.encode(&turns, true).is_ok());
    tp.label_limit = Some(top);
    let err = tp.encode(&turns, true).err().unwrap();
    assert!(
        err.contains(&format!(
            "(id {top}), beyond the model's output vocabulary (text_config.vocab_size {top})"
        )),
        "{err}"
    );
}

/// `data.supervise: last` keeps the loss on the last assistant turn (the correction) only; the
/// first answer, supervised by the seed's masking, is ignored.
#[test]
fn supervise_last_covers_the_last_answer_only() {
    let mut tp = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    let turn = |user: &str, assistant: &str| trainer::data::records::Turn {
        user: user.into(),
        assistant: assistant.into(),
    };
    let turns = [
        turn("What is here?", "A red circle."),
        turn("Check again.", "A blue square."),
    ];
    let all = tp.encode(&turns, true).unwrap();
    tp.last_turn_only = true;
    let last = tp.encode(&turns, true).unwrap();
    assert_eq!(all.input_ids, last.input_ids);
    let kept = |labels: &[i64]| -> Vec<usize> {
        (0..labels.len()).filter(|&i| labels[i] != IGNORE).collect()
    };
    let (k_all, k_last) = (kept(&all.labels), kept(&last.labels));
    assert!(
        !k_last.is_empty() && k_last.len() < k_all.len(),
        "{k_all:?} {k_last:?}"
    );
    // the kept positions are the tail of the seed's: the last answer and its <|eot_id|>
    assert_eq!(k_all[k_all.len() - k_last.len()..], k_last[..]);
    let text = |k: &[usize]| {
        let ids: Vec<i64> = k.iter().map(|&i| all.input_ids[i]).collect();
        tp.decode_exact(&ids).unwrap()
    };
    assert!(text(&k_last).contains("blue square") && !text(&k_last).contains("red circle"));
    assert!(text(&k_all).contains("red circle"));
}

#[test]
fn a_stream_cut_inside_a_character_is_flushed_as_the_whole_decode_has_it() {
    let tp = TextProcessor::from_model_dir(&fixtures().join("tok"), false).unwrap();
    // three bytes, and in the fixture's small byte-level vocabulary more than one token
    let ids: Vec<i64> = tp
        .tokenizer
        .encode("ab 日", false)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i as i64)
        .collect();
    let cut = &ids[..ids.len() - 1]; // generation stopped inside the character
    let mut stream = tp.tokenizer.decode_stream(true);
    let mut streamed = String::new();
    for &id in cut {
        if let Some(piece) = stream.step(id as u32).unwrap() {
            streamed.push_str(&piece);
        }
    }
    let whole = tp.decode_exact(cut).unwrap();
    assert!(whole.ends_with('\u{FFFD}'), "{whole:?}");
    assert_ne!(
        streamed, whole,
        "the stream holds the unfinished bytes back"
    );
    let rest = tp.stream_rest(cut, &streamed).unwrap().expect("held back");
    assert_eq!(streamed + &rest, whole);

    // a stream that ends on a whole character holds nothing back
    let done = tp.decode_exact(&ids).unwrap();
    assert_eq!(done, "ab 日");
    assert_eq!(tp.stream_rest(&ids, &done).unwrap(), None);
}
