//! How moectl prints: tables for people, JSON (`--output json`) for scripts.

use serde_json::Value;

/// What a command prints on standard output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Tables and sentences, for people.
    #[default]
    Table,
    /// JSON documents, for scripts (`jq`); progress bars stay hidden.
    Json,
}

/// `--output FORMAT` given after the subcommand. The same flag before the
/// subcommand (or MOEMESH_OUTPUT) sets it for every command; this one
/// wins over both.
#[derive(clap::Args, Debug, Default)]
pub struct OutputArg {
    /// How to print: `table` for people, `json` for scripts. Also accepted
    /// before the subcommand, or from MOEMESH_OUTPUT.
    #[arg(long = "output", value_enum, value_name = "FORMAT")]
    pub format: Option<OutputFormat>,
}

/// Prints a JSON document over several indented lines.
pub fn print_pretty_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints the outcome of a change: `value` as one line of JSON when
/// `json`, else the sentence `line`.
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

/// Returns a byte count in binary units, for example `512 B` or `1.5 GiB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_in_binary_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * (1u64 << 30) as f64), "3.0 GiB");
        assert_eq!(human_bytes(2048.0 * (1u64 << 40) as f64), "2048.0 TiB");
    }
}
