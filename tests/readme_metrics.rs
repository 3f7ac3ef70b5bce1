//! README.md lists every metric Kiln exports (telemetry/src/names.rs).

mod common;

use common::*;
use kiln_telemetry::names;

/// Whether `text` has `word` standing alone: not inside a longer dotted or snake_case name.
fn mentions(text: &str, word: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let mut after = text[i + word.len()..].chars();
        let next = after.next();
        let next_is_part = match next {
            Some('.') => after.next().is_some_and(part),
            Some(c) => part(c),
            None => false,
        };
        !before.is_some_and(|c| part(c) || c == '.') && !next_is_part
    })
}

#[test]
fn mentions_matches_whole_names() {
    assert!(mentions("| `kiln.train.step` | gauge |", "kiln.train.step"));
    assert!(mentions("ends with kiln.train.step.", "kiln.train.step"));
    assert!(!mentions(
        "`kiln.train.steps` and `kiln.train.step.duration`",
        "kiln.train.step"
    ));
    assert!(!mentions("xkiln.train.step", "kiln.train.step"));
}

#[test]
fn readme_lists_every_metric() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let missing: Vec<&str> = names::METRICS
        .iter()
        .map(|m| m.name)
        .filter(|name| !mentions(&readme, name))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not list these metrics (telemetry/src/names.rs METRICS): {missing:?}"
    );
}
