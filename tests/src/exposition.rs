//! A strict reader of the Prometheus / OpenMetrics text exposition format,
//! so that tests can check what a scraper would accept: every line is a
//! `# HELP`, `# TYPE` or `# UNIT` comment, a sample of a declared family, or
//! the final `# EOF`; names, labels and values are well formed.

use std::collections::BTreeMap;

/// One sample: its full name (`moemesh_router_tokens_total`), labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: its samples in order.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The sum of every sample named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|sample| sample.value).sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|sample| sample.name == name)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
    }
}

/// Suffixes a family's samples may add to its name, by type.
fn sample_suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" | "gaugehistogram" => {
            &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
        }
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

/// Parses `text`; the error names the first line that is not well formed.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut exposition = Exposition::default();
    let mut ended = false;
    for (number, line) in text.lines().enumerate() {
        let fail = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
        if ended {
            return Err(fail("text after # EOF"));
        }
        if line == "# EOF" {
            ended = true;
        } else if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (keyword, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if !is_metric_name(name) {
                return Err(fail("bad metric name"));
            }
            match keyword {
                "TYPE" => {
                    let kind = words.next().unwrap_or("");
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                        "untyped",
                    ];
                    if !known.contains(&kind) {
                        return Err(fail("unknown metric type"));
                    }
                    families.insert(name.to_string(), kind.to_string());
                }
                "HELP" | "UNIT" => {}
                _ => return Err(fail("unknown comment")),
            }
        } else {
            let sample = parse_sample(line).map_err(|why| fail(&why))?;
            let declared = families.iter().any(|(family, kind)| {
                sample_suffixes(kind)
                    .iter()
                    .any(|suffix| sample.name == format!("{family}{suffix}"))
            });
            if !declared {
                return Err(fail("sample of no declared family"));
            }
            exposition.samples.push(sample);
        }
    }
    Ok(exposition)
}

fn is_metric_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && characters.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("bad metric name".into());
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    let mut fields = rest.trim_start_matches(' ').split(' ');
    let value = match fields.next().ok_or("no value")? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse().map_err(|_| "bad value")?,
    };
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<f64>().map_err(|_| "bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `key="value",...}` and returns the labels and what follows `}`.
fn parse_labels(mut text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (key, rest) = text.split_once("=\"").ok_or("bad label")?;
        if !is_metric_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut value = String::new();
        let mut characters = rest.char_indices();
        let end = loop {
            match characters.next().ok_or("unterminated label value")? {
                (index, '"') => break index,
                (_, '\\') => match characters.next().ok_or("bad escape")?.1 {
                    'n' => value.push('\n'),
                    escaped @ ('\\' | '"') => value.push(escaped),
                    _ => return Err("bad escape".into()),
                },
                (_, character) => value.push(character),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key:?} twice"));
        }
        text = &rest[end + 1..];
        text = text.strip_prefix(',').unwrap_or(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_text_parses_and_sums() {
        let text = "# HELP moemesh_tokens Tokens.\n# TYPE moemesh_tokens counter\nmoemesh_tokens_total{layer=\"1\"} 3\nmoemesh_tokens_total{layer=\"2\",code=\"a\\\"b\"} 4\n# TYPE moemesh_seconds histogram\nmoemesh_seconds_bucket{le=\"+Inf\"} 1\nmoemesh_seconds_count 1\n# EOF\n";
        let exposition = parse(text).unwrap();
        assert_eq!(exposition.sum("moemesh_tokens_total", &[]), 7.0);
        assert_eq!(
            exposition.sum("moemesh_tokens_total", &[("layer", "2")]),
            4.0
        );
        assert_eq!(exposition.samples[1].labels["code"], "a\"b");
    }

    #[test]
    fn malformed_text_is_refused() {
        for text in [
            "moemesh_undeclared 1\n",
            "# TYPE m counter\nm_total\n",
            "# TYPE m counter\nm_total{a=\"1} 2\n",
            "# TYPE m counter\nm_total x\n",
            "# TYPE m gauge\nm 1\n# EOF\nm 2\n",
            "# TYPE 9m gauge\n",
            "# TYPE m flavour\n",
        ] {
            assert!(parse(text).is_err(), "{text:?} parsed");
        }
    }
}
