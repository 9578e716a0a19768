//! Cross-checks the metric names used by the chart's dashboards and alert
//! rules against what the binaries really export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Families in a Prometheus text exposition, with the series names a
/// histogram or summary expands to.
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        out.insert(name.to_owned());
        if kind == "histogram" || kind == "summary" {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
    }
    out
}

/// Every `pingmesh_*` identifier in a PromQL expression.
pub fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("pingmesh_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// PromQL expressions in the chart: every `"expr"` string of every dashboard
/// JSON and every `expr:` line of the templates. Returns (file, expr) pairs.
pub fn chart_expressions(chart: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for file in files_under(&chart.join("dashboards")) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        collect_exprs(&json, &mut |e| out.push((file.clone(), e.to_owned())));
    }
    for file in files_under(&chart.join("templates")) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some((head, expr)) = line.split_once("expr:") else {
                continue;
            };
            let expr = expr.trim();
            if !(expr.is_empty() || expr.starts_with('|') || expr.starts_with('>')) {
                out.push((file.clone(), expr.to_owned()));
                continue;
            }
            // A YAML block scalar: the lines indented deeper than the key.
            let indent = head.len() - head.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push((file.clone(), block.join(" ")));
        }
    }
    out
}

fn collect_exprs(v: &serde_json::Value, f: &mut impl FnMut(&str)) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "expr" {
                    if let Some(s) = v.as_str() {
                        f(s);
                    }
                } else {
                    collect_exprs(v, f);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, f)),
        _ => {}
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_metric_names_but_not_substrings_of_other_words() {
        let names = metric_names_in(
            r#"histogram_quantile(0.99, sum by (le) (rate(pingmesh_network_rtt_seconds_bucket{src_tor="$src"}[5m]))) / my_pingmesh_x"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["pingmesh_network_rtt_seconds_bucket"]
        );
    }

    #[test]
    fn histograms_expand_to_their_series_names() {
        let names =
            exported_names("# HELP a x\n# TYPE pingmesh_rtt histogram\n# TYPE pingmesh_up gauge\n");
        assert!(names.contains("pingmesh_rtt_bucket") && names.contains("pingmesh_up"));
    }
}
