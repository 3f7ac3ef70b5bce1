//! Kiln's Grafana dashboard (deploy/grafana/kiln.json) as the monitoring tests read it:
//! its queries (wherever they are: panels, collapsed rows, annotations, variables), its
//! variables and its panels.
#![allow(dead_code)]

use serde_json::Value;

use crate::common::root;
use crate::promql::variable_query;

pub const DASHBOARD: &str = "deploy/grafana/kiln.json";

pub fn dashboard() -> Value {
    let path = root().join(DASHBOARD);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// A query of the dashboard: where it is and its PromQL (Grafana variables left in).
#[derive(Debug, Clone)]
pub struct Query {
    pub place: String,
    pub expr: String,
    /// For a query variable, the label whose values it lists.
    pub label: Option<String>,
}

/// Every PromQL expression of the dashboard: each `expr` anywhere in it (panel targets,
/// panels nested in collapsed rows, annotations), and the query variables' queries.
pub fn queries(dashboard: &Value) -> Vec<Query> {
    fn walk(value: &Value, place: &str, out: &mut Vec<Query>) {
        match value {
            Value::Object(map) => {
                let here = match map.get("title").and_then(Value::as_str) {
                    Some(title) => format!("{place} > {title:?}"),
                    None => place.to_string(),
                };
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", Value::String(expr)) => out.push(Query {
                            place: format!(
                                "{here} {}",
                                map.get("refId").and_then(Value::as_str).unwrap_or("")
                            ),
                            expr: expr.clone(),
                            label: None,
                        }),
                        _ => walk(v, &here, out),
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, place, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (key, value) in dashboard.as_object().expect("the dashboard is an object") {
        if key != "templating" {
            walk(value, key, &mut out);
        }
    }
    for var in variables(dashboard) {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let query = match &var["query"] {
            Value::String(q) => q.clone(),
            Value::Object(q) => q["query"].as_str().unwrap_or_default().to_string(),
            other => panic!("variable {name}: query {other}"),
        };
        let (expr, label) = variable_query(&query);
        let place = format!("variable ${name}");
        if let Some(expr) = expr {
            out.push(Query { place, expr, label });
        } else if let Some(label) = label {
            out.push(Query {
                place,
                expr: String::new(),
                label: Some(label),
            });
        }
    }
    out
}

pub fn variables(dashboard: &Value) -> Vec<Value> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list is an array")
        .clone()
}

/// Every panel, rows' nested ones included.
pub fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel.clone());
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The PromQL of the panel titled `title` (its only query).
pub fn panel_expr(board: &Value, title: &str) -> String {
    let panel = panels(board)
        .into_iter()
        .find(|p| p["title"] == title)
        .unwrap_or_else(|| panic!("{DASHBOARD} has no panel {title:?}"));
    panel["targets"][0]["expr"].as_str().unwrap().to_string()
}
