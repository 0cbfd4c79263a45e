//! A note for a command line that gives a config's keys as flags, as llama-recipes' scripts take
//! them (`launcher CONFIG.yaml --lr 1e-5`, `trainer train CONFIG.yaml --use_peft`): clap's own
//! tips there (`to pass '--lr' as a value, use '-- --lr'`) lead to another error.

/// The note for clap's error `e` on this process's command line: only for a flag clap does not
/// know and that is not a typo of one it does (`--max-restart` keeps clap's `--max-restarts`;
/// `--lr` gets the note, not clap's `--local_ranks_filter`).
pub fn for_clap_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(invalid)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    if let Some(ContextValue::String(near)) = e.get(ContextKind::SuggestedArg) {
        if is_typo(invalid, near) {
            return None;
        }
    }
    let args: Vec<String> = (std::env::args_os().skip(1))
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    config_flag_note(&args, invalid)
}

/// Whether flag `typed` is a typo of flag `meant`: at most two edits, and fewer than a third of
/// the longer one.
fn is_typo(typed: &str, meant: &str) -> bool {
    let d = strsim::osa_distance(typed, meant);
    d <= 2 && 3 * d < typed.len().max(meant.len())
}

/// The note for `args` (the command line after the program's name) when clap refused the flag
/// `invalid` after a YAML config: the same setting as `--set`. None when no config comes before it.
pub fn config_flag_note(args: &[String], invalid: &str) -> Option<String> {
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .take_while(|a| *a != "--")
        .collect();
    let config = args
        .iter()
        .position(|a| !a.starts_with('-') && (a.ends_with(".yaml") || a.ends_with(".yml")))?;
    let at = config
        + 1
        + args[config + 1..]
            .iter()
            .position(|a| *a == invalid || a.starts_with(&format!("{invalid}=")))?;
    let key = invalid.trim_start_matches('-');
    // (a negative number, `--index -1`, is a value, not a setting's name)
    if !key.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = match args[at].split_once('=') {
        Some((_, v)) => v,
        None => match args.get(at + 1) {
            Some(v) if !v.starts_with("--") => v,
            _ => "true",
        },
    };
    Some(format!(
        "note: a config's settings are given after it with --set KEY=VALUE, not as flags: \
         `--set {key}={value}` (the config check then names the key: llama-recipes' names are \
         answered with ours, e.g. lr -> train.lr)"
    ))
}

/// clap's message for `e` with `note` in place of its `tip:` lines.
pub fn with_note(e: &clap::Error, note: &str) -> String {
    format!("{}\n{note}\n", without_tips(&e.render().to_string()))
}

/// clap's message without its `tip:` lines (and the blank line before each).
pub fn without_tips(message: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    for line in message.lines() {
        if line.trim_start().starts_with("tip:") {
            if kept.last().is_some_and(|l| l.trim().is_empty()) {
                kept.pop();
            }
            continue;
        }
        kept.push(line);
    }
    kept.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn typos_of_real_flags_are_told_apart() {
        assert!(is_typo("--max-restart", "--max-restarts"));
        assert!(is_typo("--sett", "--set"));
        assert!(!is_typo("--lr", "--local_ranks_filter"));
        assert!(!is_typo("--use_peft", "--set"));
    }

    #[test]
    fn flags_after_a_config_are_shown_as_set() {
        let note = |a: &str, invalid: &str| config_flag_note(&args(a), invalid);
        assert!(note("--nproc_per_node 2 cfg.yaml --lr 1e-5", "--lr")
            .unwrap()
            .contains("`--set lr=1e-5`"));
        assert!(note("train cfg.yml --use_peft", "--use_peft")
            .unwrap()
            .contains("`--set use_peft=true`"));
        assert!(note("cfg.yaml --num_epochs=3", "--num_epochs")
            .unwrap()
            .contains("`--set num_epochs=3`"));
        // no config before it, or the flag only after `--`: not this case
        assert_eq!(note("--lr 1e-5 cfg.yaml", "--lr"), None);
        assert_eq!(note("--standalone -- python x.py --lr 1", "--lr"), None);
        // a negative number is a value (`data dump CFG --index -1` was told `--set 1=true`)
        assert_eq!(note("data dump cfg.yaml --index -1", "-1"), None);
    }
}
