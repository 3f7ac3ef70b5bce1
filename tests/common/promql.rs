//! PromQL and Prometheus for the monitoring tests: which identifiers of an expression are
//! metric names and which are label names, the series and labels Kiln's metrics
//! (telemetry/src/names.rs) have once in Prometheus, and where `promtool` is.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use kiln_telemetry::names::{self, Kind, Metric, Source};

/// The metric and label names an expression uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub metrics: BTreeSet<String>,
    pub labels: BTreeSet<String>,
}

/// Words of PromQL that stand where a metric name could: aggregations (`sum by (l) (...)`),
/// binary operators and modifiers, and literals.
pub const KEYWORDS: &str = "sum min max avg group stddev stdvar count count_values bottomk topk \
    quantile limitk limit_ratio by without on ignoring group_left group_right bool and or unless \
    atan2 offset inf nan start end";

/// Keywords whose parenthesized list holds label names.
pub const GROUPING: &str = "by without on ignoring group_left group_right";

/// Splits a PromQL expression (Grafana variables allowed) into the metric names and label
/// names it uses. Label names are the identifiers inside `{...}` and inside the lists of
/// `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`; a metric name is any
/// other identifier that is not a keyword nor a function being called. Strings, ranges
/// (`[5m]`, `[$__rate_interval]`), numbers and `$variables` are skipped; `__name__="x"`
/// inside braces names metric `x`.
pub fn promql_names(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let mut i = 0;
    let mut braces = 0usize;
    let mut parens = 0usize;
    // The paren depth at which a grouping keyword's label list opened.
    let mut label_list: Option<usize> = None;
    // The previous token when it was an identifier.
    let mut prev_ident: Option<String> = None;
    // Inside braces: the label name of the matcher being read.
    let mut matcher_label: Option<String> = None;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let mut ident = None;
        match c {
            '"' | '\'' | '`' => {
                let start = i + 1;
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                let value: String = chars[start..i.min(chars.len())].iter().collect();
                if braces > 0 && matcher_label.as_deref() == Some("__name__") {
                    names.metrics.insert(value);
                }
                matcher_label = None;
                i += 1;
            }
            '[' => {
                let mut depth = 0;
                while i < chars.len() {
                    match chars[i] {
                        '[' => depth += 1,
                        ']' => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            '(' => {
                parens += 1;
                if label_list.is_none()
                    && prev_ident
                        .as_deref()
                        .is_some_and(|p| GROUPING.split_whitespace().any(|g| g == p))
                {
                    label_list = Some(parens);
                }
                i += 1;
            }
            ')' => {
                if label_list == Some(parens) {
                    label_list = None;
                }
                parens = parens.saturating_sub(1);
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration: 0.95, 1e3, 0x1f, 5m.
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                ident = Some(chars[start..i].iter().collect::<String>());
            }
            _ => i += 1,
        }
        if let Some(word) = &ident {
            if braces > 0 {
                names.labels.insert(word.clone());
                matcher_label = Some(word.clone());
            } else if label_list.is_some() {
                names.labels.insert(word.clone());
            } else {
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let called = chars.get(j) == Some(&'(');
                if !called
                    && !KEYWORDS
                        .split_whitespace()
                        .any(|k| k == word.to_ascii_lowercase())
                {
                    names.metrics.insert(word.clone());
                }
            }
        }
        prev_ident = ident;
    }
    names
}

/// What a Grafana query variable asks Prometheus: the PromQL in it and the label it lists.
/// `label_values(EXPR, LABEL)`, `label_values(LABEL)`, `query_result(EXPR)`; anything else
/// is taken as PromQL.
pub fn variable_query(query: &str) -> (Option<String>, Option<String>) {
    let query = query.trim();
    let inner = |prefix: &str| {
        query
            .strip_prefix(prefix)
            .and_then(|rest| rest.trim_start().strip_prefix('('))
            .and_then(|rest| rest.trim_end().strip_suffix(')'))
            .map(str::trim)
    };
    if let Some(args) = inner("label_values") {
        // The label is after the last comma outside braces and strings.
        let mut split = None;
        let (mut depth, mut quote) = (0i32, None);
        for (k, c) in args.char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'' | '`') => quote = Some(c),
                (None, '{' | '(' | '[') => depth += 1,
                (None, '}' | ')' | ']') => depth -= 1,
                (None, ',') if depth == 0 => split = Some(k),
                _ => {}
            }
        }
        return match split {
            Some(k) => (
                Some(args[..k].trim().to_string()),
                Some(args[k + 1..].trim().to_string()),
            ),
            None => (None, Some(args.to_string())),
        };
    }
    if let Some(expr) = inner("query_result") {
        return (Some(expr.to_string()), None);
    }
    (Some(query.to_string()), None)
}

/// The series names among `used` that Kiln does not export.
pub fn unknown_metrics<'a>(used: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let known: HashSet<String> = names::prometheus_series().into_iter().collect();
    used.into_iter()
        .filter(|m| !known.contains(*m))
        .cloned()
        .collect()
}

pub fn prom_label(attribute: &str) -> String {
    attribute.replace(['.', '-'], "_")
}

/// The resource attributes every training rank's series carries through the collector.
pub const RANK_RESOURCE: &[&str] = &[
    names::JOB_ID,
    names::RANK,
    names::GENERATION,
    names::HOST,
    names::DEVICE,
    "service.name",
];

/// Every label a query may name: the metrics' attributes, the ranks' resource attributes,
/// `le` of histograms, and Prometheus's `job` and `instance`.
pub fn known_labels() -> HashSet<String> {
    let mut labels: HashSet<String> = ["le", "job", "instance", "__name__"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for metric in names::METRICS {
        labels.extend(metric.attributes.iter().map(|a| prom_label(a)));
        if metric.source == Source::Rank {
            labels.extend(RANK_RESOURCE.iter().map(|a| prom_label(a)));
        }
    }
    labels
}

/// The labels `metric`'s series carry.
pub fn labels_of(metric: &Metric) -> HashSet<String> {
    let mut labels: HashSet<String> = metric.attributes.iter().map(|a| prom_label(a)).collect();
    if metric.source == Source::Rank {
        labels.extend(RANK_RESOURCE.iter().map(|a| prom_label(a)));
    }
    labels
}

/// The metric a series name belongs to (histograms' `_bucket`, `_sum`, `_count` included).
pub fn metric_of(series: &str) -> Option<&'static Metric> {
    names::METRICS.iter().find(|m| {
        let name = m.prometheus_name();
        series == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| series == format!("{name}{s}")))
    })
}

pub fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found
        .or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("promtool is missing: run scripts/test-deps.sh (Debian package prometheus)")
        })
}
