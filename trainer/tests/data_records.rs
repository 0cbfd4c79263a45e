//! JSONL records: every bad-input case gives `FILE:LINE: reason`; SCo conversion.
use std::path::{Path, PathBuf};

use trainer::config::TextOnly;
use trainer::data::records::{
    build_sco, parse_jsonl_str, resolve_image, strip_placeholder, ParseOptions,
    DEFAULT_CORRECTION_PROMPT,
};

fn opts(text_only: TextOnly) -> ParseOptions {
    ParseOptions {
        image_root: Some(PathBuf::from("/data/imgs")),
        text_only,
        check_image_exists: false,
        keep_image_placeholder: false,
    }
}

#[test]
fn good_multi_turn_record() {
    let line = r#"{"id": 7, "image": "a/b.jpg", "conversations": [{"from": "human", "value": "<image>\n Q1 "}, {"from": "gpt", "value": " A1\n"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}"#;
    let r = parse_jsonl_str(Path::new("d.jsonl"), line, &opts(TextOnly::Skip));
    assert!(r.problems.is_empty());
    let rec = &r.records[0];
    assert_eq!((rec.id.as_str(), rec.line), ("7", 1));
    assert_eq!(rec.image.as_deref(), Some(Path::new("/data/imgs/a/b.jpg")));
    assert_eq!(rec.turns.len(), 2);
    assert_eq!(
        (rec.turns[0].user.as_str(), rec.turns[0].assistant.as_str()),
        ("Q1", "A1")
    );
    // data.image_placeholder: keep: the seed's cot_dataset.py only strips whitespace
    let keep = ParseOptions {
        keep_image_placeholder: true,
        ..opts(TextOnly::Skip)
    };
    let r = parse_jsonl_str(Path::new("d.jsonl"), line, &keep);
    assert_eq!(r.records[0].turns[0].user, "<image>\n Q1");
}

/// Values are stripped as Python's `str.strip()` strips them (the seed's), the ASCII separators
/// U+001C..U+001F included, which Rust's `trim` keeps (they became supervised tokens).
#[test]
fn values_are_stripped_as_python_strips_them() {
    let line = r#"{"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "\u001c Q \u001f"}, {"from": "gpt", "value": "A \u001d\u00a0"}]}"#;
    let r = parse_jsonl_str(Path::new("d.jsonl"), line, &opts(TextOnly::Skip));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let t = &r.records[0].turns[0];
    assert_eq!((t.user.as_str(), t.assistant.as_str()), ("Q", "A"));
}

/// LLaVA's `.json` layout (one list of records) is one problem saying how to convert it, not one
/// per line; LLaMA-Factory's `images` key is a problem, not a text-only record.
#[test]
fn a_json_list_file_and_an_images_key_say_what_to_write() {
    let list = "[\n  {\"image\": \"a.jpg\", \"conversations\": []},\n  {\"image\": \"b.jpg\"}\n]\n";
    let r = parse_jsonl_str(Path::new("d.json"), list, &opts(TextOnly::Skip));
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].line, 1);
    assert!(
        r.problems[0]
            .reason
            .contains("one JSON list of records (LLaVA's .json layout), not JSON Lines"),
        "{}",
        r.problems[0].reason
    );
    assert!(r.records.is_empty());
    let images = r#"{"images": ["a.jpg"], "conversations": [{"from":"human","value":"<image>q"},{"from":"gpt","value":"a"}]}"#;
    for text_only in [TextOnly::Skip, TextOnly::Keep] {
        let r = parse_jsonl_str(Path::new("d.jsonl"), images, &opts(text_only));
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(
            r.problems[0]
                .reason
                .contains("field \"images\" is not read"),
            "{}",
            r.problems[0].reason
        );
    }
}

/// A record whose human turn holds `<image>` but which has no `image` (a misspelt key, or
/// build-sco's input's `image_path`) is a bad record naming its fields, under either text_only
/// policy: it was skipped as text-only, or trained as text, without a word. A text-only record
/// without the marker stays one.
#[test]
fn an_image_marker_without_an_image_names_the_fields() {
    let turns =
        r#""conversations": [{"from":"human","value":"<image>\nq"},{"from":"gpt","value":"a"}]"#;
    for key in ["imgae", "image_path"] {
        let line = format!(r#"{{"id": "x", "{key}": "a.jpg", {turns}}}"#);
        for text_only in [TextOnly::Skip, TextOnly::Keep] {
            let r = parse_jsonl_str(Path::new("d.jsonl"), &line, &opts(text_only));
            assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
            let want = format!("a human turn has an <image> marker but the record has no \"image\" (its fields: conversations, id, {key})");
            assert!(
                r.problems[0].reason.contains(&want),
                "{}",
                r.problems[0].reason
            );
        }
    }
    // text-only records, one that mentions the marker inside its text too (it is text there)
    for value in ["q", "what does <image> mean in LLaVA data?"] {
        let text = format!(
            r#"{{"id": "t", "conversations": [{{"from":"human","value":"{value}"}},{{"from":"gpt","value":"a"}}]}}"#
        );
        let r = parse_jsonl_str(Path::new("d.jsonl"), &text, &opts(TextOnly::Skip));
        assert!(
            r.problems.is_empty() && r.records.is_empty(),
            "{:?}",
            r.problems
        );
        assert_eq!(r.skipped_text_only, 1);
    }
}

/// A missing image's message says where a relative path was looked for when data.image_root is
/// unset, and shows spaces around a path (printed bare, they could not be seen).
#[test]
fn a_missing_image_says_where_it_was_looked_for() {
    let turns = r#""conversations": [{"from":"human","value":"q"},{"from":"gpt","value":"a"}]"#;
    let reason = |image: &str, root: Option<&str>| {
        let line = format!(r#"{{"image": "{image}", {turns}}}"#);
        let o = ParseOptions {
            image_root: root.map(PathBuf::from),
            check_image_exists: true,
            ..opts(TextOnly::Skip)
        };
        let r = parse_jsonl_str(Path::new("d.jsonl"), &line, &o);
        r.problems[0].reason.clone()
    };
    let cwd = std::env::current_dir().unwrap();
    let unset = reason("no-such.png", None);
    assert!(
        unset.contains(&format!("data.image_root is not set, so relative image paths are read from the working folder, {}", cwd.display())),
        "{unset}"
    );
    assert!(!reason("no-such.png", Some("/no/such/root")).contains("image_root is not set"));
    let spaced = reason("no-such.png ", Some("/no/such/root"));
    assert!(
        spaced.contains("(the record's path, \"no-such.png \", has spaces around it)"),
        "{spaced}"
    );
}

#[test]
fn every_bad_case_is_file_line_reason() {
    let cases = [
        ("{not json", "malformed JSON"),
        ("[1,2]", "must be a JSON object"),
        (r#"{"image": "x.jpg"}"#, "missing field \"conversations\""),
        (
            r#"{"image": "x.jpg", "conversations": {}}"#,
            "must be a list",
        ),
        (
            r#"{"image": "x.jpg", "conversations": []}"#,
            "empty conversation",
        ),
        (
            r#"{"image": 5, "conversations": [{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
            "field \"image\" must be a string",
        ),
        (
            r#"{"image": ["a","b"], "conversations": [{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
            "only one image",
        ),
        (
            r#"{"id": [1], "image": "x", "conversations": [{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
            "field \"id\"",
        ),
        (
            r#"{"image": "x.jpg", "conversations": [{"from":"robot","value":"q"}]}"#,
            "unknown role \"robot\"",
        ),
        (
            r#"{"image": "x.jpg", "conversations": [{"from":"system","value":"s"},{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
            "conversations[0] is a \"system\" turn in a record with an image",
        ),
        (
            r#"{"image": "x.jpg", "conversations": [{"from":"gpt","value":"a"},{"from":"human","value":"q"}]}"#,
            "roles out of order",
        ),
        (
            r#"{"image": "x.jpg", "conversations": [{"from":"human","value":"q"},{"from":"human","value":"q"}]}"#,
            "roles out of order",
        ),
        (
            r#"{"image": "x.jpg", "conversations": [{"from":"human","value":"q"}]}"#,
            "no \"gpt\" answer",
        ),
        (
            r#"{"image": "x.jpg", "conversations": [{"from":"human","value":3},{"from":"gpt","value":"a"}]}"#,
            "value must be a string",
        ),
        (
            r#"{"image": "x.jpg", "conversations": ["hi"]}"#,
            "must be an object",
        ),
        (
            r#"{"image": "../../etc/passwd", "conversations": [{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
            "escapes image_root",
        ),
    ];
    let text: String = cases.iter().map(|(l, _)| format!("{l}\n")).collect();
    let r = parse_jsonl_str(Path::new("train.jsonl"), &text, &opts(TextOnly::Skip));
    assert_eq!(r.problems.len(), cases.len(), "{:#?}", r.problems);
    for (i, (p, (_, want))) in r.problems.iter().zip(cases.iter()).enumerate() {
        let s = p.to_string();
        assert!(s.starts_with(&format!("train.jsonl:{}: ", i + 1)), "{s}");
        assert!(s.contains(want), "line {}: {s:?} lacks {want:?}", i + 1);
    }
}

#[test]
fn missing_image_is_reported_by_the_prescan() {
    let o = ParseOptions {
        image_root: Some(std::env::temp_dir()),
        text_only: TextOnly::Skip,
        check_image_exists: true,
        keep_image_placeholder: false,
    };
    let line = r#"{"image": "surely-missing-8731.jpg", "conversations": [{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#;
    let r = parse_jsonl_str(Path::new("t.jsonl"), line, &o);
    assert!(
        r.problems[0].to_string().contains("cannot be read"),
        "{}",
        r.problems[0]
    );
}

#[test]
fn text_only_skip_or_keep_is_counted() {
    let line = "{\"conversations\": [{\"from\":\"human\",\"value\":\"q\"},{\"from\":\"gpt\",\"value\":\"a\"}]}\n\n";
    let r = parse_jsonl_str(Path::new("t.jsonl"), line, &opts(TextOnly::Skip));
    assert_eq!(
        (r.records.len(), r.skipped_text_only, r.blank_lines),
        (0, 1, 1)
    );
    let r = parse_jsonl_str(Path::new("t.jsonl"), line, &opts(TextOnly::Keep));
    assert_eq!((r.records.len(), r.kept_text_only), (1, 1));
    assert!(r.records[0].image.is_none());
}

#[test]
fn placeholder_and_paths() {
    assert_eq!(strip_placeholder("<image>\nWhat?"), "What?");
    assert_eq!(strip_placeholder("What?\n<image>"), "What?");
    assert_eq!(strip_placeholder("a <image> b"), "a <image> b");
    assert_eq!(
        resolve_image("a/../b.jpg", Some(Path::new("/r"))).unwrap(),
        Path::new("/r/a/../b.jpg")
    );
    assert!(resolve_image("a/../../b.jpg", Some(Path::new("/r"))).is_err());
    assert_eq!(resolve_image("/x.jpg", None).unwrap(), Path::new("/x.jpg"));
    // absolute beside a root: as written, as the seed's os.path.join(root, path) gives it
    assert_eq!(
        resolve_image("/data/x.jpg", Some(Path::new("/r"))).unwrap(),
        Path::new("/data/x.jpg")
    );
}

/// Text-only records of mixed data are dropped under `text_only: skip` before their
/// conversation is looked at (the seed's loader drops them first), whatever its shape; a UTF-8
/// byte-order mark does not spoil the first record.
#[test]
fn text_only_records_are_skipped_before_their_shape_is_checked() {
    let text = "\u{feff}{\"id\": \"t\", \"conversations\": [{\"from\": \"system\", \"value\": \"s\"}, {\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n\
        {\"id\": \"u\", \"conversations\": [{\"from\": \"gpt\", \"value\": \"a\"}]}\n\
        {\"id\": \"i\", \"image\": \"x.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n";
    let opts = ParseOptions {
        image_root: None,
        text_only: TextOnly::Skip,
        check_image_exists: false,
        keep_image_placeholder: false,
    };
    let r = parse_jsonl_str(Path::new("mixed.jsonl"), text, &opts);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!((r.records.len(), r.skipped_text_only), (1, 2));
    assert_eq!(r.records[0].id, "i");
    assert_eq!(r.records[0].line, 3);
}

/// A text-only record kept under `text_only: keep` may open with a system turn (the chat
/// template takes one without an image); a later one, or one alone, is refused.
#[test]
fn a_text_only_record_takes_a_leading_system_turn() {
    let text = "{\"id\": \"s\", \"conversations\": [{\"from\": \"system\", \"value\": \" Be brief. \"}, {\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n\
        {\"id\": \"late\", \"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"system\", \"value\": \"s\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n\
        {\"id\": \"alone\", \"conversations\": [{\"from\": \"system\", \"value\": \"s\"}]}\n\
        {\"id\": \"plain\", \"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n";
    let opts = ParseOptions {
        image_root: None,
        text_only: TextOnly::Keep,
        check_image_exists: false,
        keep_image_placeholder: false,
    };
    let r = parse_jsonl_str(Path::new("mixed.jsonl"), text, &opts);
    let ids: Vec<&str> = r.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["s", "plain"]);
    assert_eq!(r.records[0].system.as_deref(), Some("Be brief."));
    assert_eq!(r.records[0].turns.len(), 1);
    assert_eq!(r.records[1].system, None);
    let reasons: Vec<(usize, &str)> = r
        .problems
        .iter()
        .map(|p| (p.line, p.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, 2);
    assert!(reasons[0]
        .1
        .contains("conversations[1] is a \"system\" turn after the first"));
    assert_eq!(reasons[1].0, 3);
    assert!(reasons[1].1.contains("no \"human\" / \"gpt\" turns"));
}

#[test]
fn build_sco_makes_two_turn_records_and_counts_failures() {
    let refined = r#"[
        {"question": "Q?", "original_answer": "<SUMMARY> s </SUMMARY>", "refined_answer": "<SUMMARY> better </SUMMARY>", "image_path": "i/1.jpg"},
        {"question": "Q2", "original_answer": "A", "refined_answer": "", "image_path": "i/2.jpg"},
        {"question": 3, "original_answer": "A", "refined_answer": "B", "image_path": "i/3.jpg"}
    ]"#;
    let rep = build_sco(refined, DEFAULT_CORRECTION_PROMPT).unwrap();
    assert_eq!(
        (
            rep.lines.len(),
            rep.skipped_empty_refined,
            rep.problems.len()
        ),
        (1, 1, 1)
    );
    let r = parse_jsonl_str(Path::new("sco.jsonl"), &rep.lines[0], &opts(TextOnly::Skip));
    let rec = &r.records[0];
    assert_eq!(rec.turns.len(), 2);
    assert_eq!(rec.turns[0].user, "Q?");
    assert_eq!(rec.turns[1].user, DEFAULT_CORRECTION_PROMPT);
    assert_eq!(rec.turns[1].assistant, "<SUMMARY> better </SUMMARY>");
    assert!(build_sco("{}", "x").is_err());
    // a question that already starts with the placeholder (LLaVA-CoT's first human value) gets
    // it once, not twice
    let with = r#"[{"question": "<image>\nQ?", "original_answer": "A", "refined_answer": "B", "image_path": "i/1.jpg"}]"#;
    let rep = build_sco(with, DEFAULT_CORRECTION_PROMPT).unwrap();
    let r = parse_jsonl_str(Path::new("sco.jsonl"), &rep.lines[0], &opts(TextOnly::Skip));
    assert_eq!(r.records[0].turns[0].user, "Q?");
    assert_eq!(
        rep.lines[0].matches("<image>").count(),
        1,
        "{}",
        rep.lines[0]
    );
    // an entry's own id is kept; one without an image_path is a text-only record, counted, its
    // question without the placeholder; an empty correction prompt is refused
    let ids = r#"[{"id": "keepme", "question": "Q?", "original_answer": "A", "refined_answer": "B", "image_path": "i/1.jpg"},
        {"question": "<image>\nWhat color?", "original_answer": "A", "refined_answer": "B", "image_path": null}]"#;
    let rep = build_sco(ids, DEFAULT_CORRECTION_PROMPT).unwrap();
    assert_eq!((rep.lines.len(), rep.without_image), (2, 1));
    assert!(
        rep.lines[0].contains(r#""id":"keepme""#),
        "{}",
        rep.lines[0]
    );
    assert!(rep.lines[1].contains(r#""id":"sco-1""#), "{}", rep.lines[1]);
    assert!(!rep.lines[1].contains("<image>"), "{}", rep.lines[1]);
    let r = parse_jsonl_str(Path::new("sco.jsonl"), &rep.lines[1], &opts(TextOnly::Keep));
    assert_eq!(r.records[0].turns[0].user, "What color?");
    assert!(build_sco(ids, " ")
        .unwrap_err()
        .contains("correction prompt is empty"));
    // ids stay one per record: an entry without one is not named as another entry's own id
    // (both were sco-1), a repeated own id is a malformed entry; a byte-order mark is read past
    let entry = |id: &str| {
        format!(
            r#"{{{id}"question": "Q", "original_answer": "A", "refined_answer": "B", "image_path": "i.jpg"}}"#
        )
    };
    let clash = format!(
        "\u{feff}[{}, {}, {}]",
        entry(r#""id": "sco-1", "#),
        entry(""),
        entry(r#""id": "sco-1", "#)
    );
    let rep = build_sco(&clash, DEFAULT_CORRECTION_PROMPT).unwrap();
    assert_eq!(rep.lines.len(), 2);
    assert!(
        rep.lines[1].contains(r#""id":"sco-1-1""#),
        "{}",
        rep.lines[1]
    );
    assert_eq!(
        rep.problems,
        ["entry 2: id \"sco-1\" repeats entry 0's (records are named by id)"]
    );
    // JSON Lines given for the JSON list: said so
    let jsonl = format!("{}\n{}\n", entry(""), entry(""));
    let e = build_sco(&jsonl, DEFAULT_CORRECTION_PROMPT).unwrap_err();
    assert!(
        e.contains("the file is JSON Lines (one object per line), not one JSON list"),
        "{e}"
    );
}

#[test]
fn a_line_that_is_not_utf8_is_a_bad_record_of_its_own() {
    let dir = std::env::temp_dir().join(format!("trainer-data-records-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("latin1.jsonl");
    let good = r#"{"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(good.as_bytes());
    bytes.extend_from_slice(b"\n{\"id\": \"caf\xe9\"}\r\n");
    bytes.extend_from_slice(good.as_bytes());
    bytes.push(b'\n');
    std::fs::write(&p, &bytes).unwrap();
    let rep = trainer::data::records::parse_jsonl(&p, &opts(TextOnly::Skip)).unwrap();
    assert_eq!(rep.records.len(), 2);
    assert_eq!(rep.records[1].line, 3);
    assert_eq!(rep.problems.len(), 1);
    assert_eq!(rep.problems[0].line, 2);
    assert!(
        rep.problems[0].reason.contains("not UTF-8"),
        "{:?}",
        rep.problems
    );
    assert_eq!(rep.blank_lines, 0);
    // a UTF-16 file (Windows' "Unicode") is one problem saying so
    let utf16 = dir.join("utf16.jsonl");
    let mut bytes = vec![0xff, 0xfe];
    bytes.extend(good.encode_utf16().flat_map(|u| u.to_le_bytes()));
    std::fs::write(&utf16, &bytes).unwrap();
    let rep = trainer::data::records::parse_jsonl(&utf16, &opts(TextOnly::Skip)).unwrap();
    assert_eq!((rep.records.len(), rep.problems.len()), (0, 1));
    assert!(
        rep.problems[0].reason.contains("UTF-16"),
        "{:?}",
        rep.problems
    );
    // a gzipped file too (it was "not UTF-8" on each of its lines, with a fix that did not fit)
    let gz = dir.join("train.jsonl.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 0x08, 0x00, 0xff, 0x0a, 0x9c, 0x0a, 0xe9]).unwrap();
    let rep = trainer::data::records::parse_jsonl(&gz, &opts(TextOnly::Skip)).unwrap();
    assert_eq!((rep.records.len(), rep.problems.len()), (0, 1));
    assert!(
        rep.problems[0]
            .reason
            .contains("gzip-compressed: decompress it first"),
        "{:?}",
        rep.problems
    );
}
