//! How moectl prints: tables for people, JSON (`--json`) for scripts.

use serde_json::Value;

/// Prints a JSON document over several indented lines.
pub fn print_pretty_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints the outcome of a change: `value` as one line of JSON with
/// `--json`, else the sentence `line`.
pub fn print_outcome(json: bool, value: Value, line: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", line());
    }
}

/// Returns `part` as a percentage of `total`, or 0 when there is no total
/// (an idle window), so tables never show NaN.
pub fn percent_of(part: f64, total: f64) -> f64 {
    if total > 0.0 {
        part / total * 100.0
    } else {
        0.0
    }
}
