//! One role's table of a configuration file, turned into the flags it
//! stands for and checked by the role's own command-line parser, so that
//! every flag a role has is a key of its table, with no list to keep.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command};

/// The id of the `--config` flag itself, which a file cannot set.
pub const CONFIG_ARG: &str = "config";

/// One key of a role's table and the flags it stands for.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The key as the file spells it.
    pub key: String,
    /// The clap id of the flag it sets.
    pub arg_id: String,
    /// `--flag=value` words, one per value; none for a switch set to false.
    pub flags: Vec<String>,
}

/// What checking one role's table found.
#[derive(Debug, Default)]
pub struct RoleReport {
    /// The keys that are valid.
    pub settings: Vec<Setting>,
    /// Required flags the table leaves to the command line or the
    /// environment, as `--id (or MOEMESH_COORDINATOR_ID)`.
    pub left_open: Vec<String>,
    /// One message per mistake, naming the key.
    pub problems: Vec<String>,
}

/// The whole command line's clap command, built twice: as it is, for
/// looking flags up, and with no environment variables behind its flags,
/// for parsing, so that a file's verdict depends on the file alone.
pub struct Commands {
    full: Command,
    file_only: Command,
}

impl Commands {
    pub fn new(command: Command) -> Self {
        let mut file_only = command
            .clone()
            .mut_args(|arg| arg.env(None))
            .mut_subcommands(|subcommand| subcommand.mut_args(|arg| arg.env(None)));
        file_only.build();
        let mut full = command;
        full.build();
        Self { full, file_only }
    }

    /// The subcommand `role`, with the global flags it inherits.
    pub fn role(&self, role: &str) -> &Command {
        self.full
            .find_subcommand(role)
            .unwrap_or_else(|| panic!("{role} is a subcommand of {}", self.full.get_name()))
    }
}

/// Checks `table` against the subcommand `role`.
pub fn check_role(commands: &Commands, role: &str, table: &toml::Table) -> RoleReport {
    let role_command = commands.role(role);
    let mut report = RoleReport::default();
    let mut seen: Vec<(String, String)> = Vec::new();
    for (key, value) in table {
        let Some(arg) = find_settable_arg(role_command, key) else {
            report.problems.push(unknown_key_message(role_command, key));
            continue;
        };
        let arg_id = arg.get_id().as_str().to_string();
        if let Some((earlier, _)) = seen.iter().find(|(_, id)| *id == arg_id) {
            report
                .problems
                .push(format!("{key:?} sets the same flag as {earlier:?}"));
            continue;
        }
        seen.push((key.clone(), arg_id.clone()));
        let flags = match flags_for(arg, value) {
            Ok(flags) => flags,
            Err(reason) => {
                report.problems.push(format!("{key:?}: {reason}"));
                continue;
            }
        };
        // Each key alone first, so that a bad value is blamed on its key.
        if let Err(message) = parse_leniently(&commands.file_only, role, &flags) {
            report.problems.push(format!("{key:?}: {message}"));
            continue;
        }
        report.settings.push(Setting {
            key: key.clone(),
            arg_id,
            flags,
        });
    }
    if report.problems.is_empty() {
        let all_flags: Vec<String> = report
            .settings
            .iter()
            .flat_map(|setting| setting.flags.iter().cloned())
            .collect();
        match parse_leniently(&commands.file_only, role, &all_flags) {
            Ok(missing) => report.left_open = describe_missing(role_command, &missing),
            Err(message) => report.problems.push(message),
        }
    }
    report
}

/// Parses `flags` as the role's command line. Ok holds the required flags
/// that are missing (the file may leave them to the command line); Err
/// any other error, as clap words it.
fn parse_leniently(root: &Command, role: &str, flags: &[String]) -> Result<Vec<String>, String> {
    let argv = [root.get_name(), role]
        .into_iter()
        .map(str::to_string)
        .chain(flags.iter().cloned());
    match root.clone().try_get_matches_from(argv) {
        Ok(_) => Ok(Vec::new()),
        Err(error) if error.kind() == ErrorKind::MissingRequiredArgument => {
            Ok(match error.get(ContextKind::InvalidArg) {
                Some(ContextValue::Strings(missing)) => missing.clone(),
                Some(ContextValue::String(missing)) => vec![missing.clone()],
                _ => Vec::new(),
            })
        }
        Err(error) => Err(first_line_of(&error)),
    }
}

/// Clap's message without its `error: ` prefix, usage and help hint.
pub fn first_line_of(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// `--id <ID>` becomes `--id or --ordinal (env MOEMESH_COORDINATOR_ID or
/// MOEMESH_ORDINAL)`: a required flag and those it conflicts with are, in
/// practice, the ways to say one thing.
fn describe_missing(role_command: &Command, missing: &[String]) -> Vec<String> {
    missing
        .iter()
        .map(|usage| {
            let flag = usage.split_whitespace().next().unwrap_or(usage);
            let Some(arg) = flag
                .strip_prefix("--")
                .and_then(|long| find_settable_arg(role_command, long))
            else {
                return usage.clone();
            };
            let choices: Vec<&Arg> = std::iter::once(arg)
                .chain(conflicting_args(role_command, arg))
                .collect();
            let flags: Vec<String> = choices
                .iter()
                .filter_map(|choice| choice.get_long())
                .map(|long| format!("--{long}"))
                .collect();
            let variables: Vec<String> = choices
                .iter()
                .filter_map(|choice| choice.get_env())
                .map(|name| name.to_string_lossy().into_owned())
                .collect();
            if variables.is_empty() {
                flags.join(" or ")
            } else {
                format!("{} (env {})", flags.join(" or "), variables.join(" or "))
            }
        })
        .collect()
}

/// The flags that cannot be given with `arg`, whichever of the two
/// declares the conflict.
pub fn conflicting_args<'a>(role_command: &'a Command, arg: &Arg) -> Vec<&'a Arg> {
    let mut conflicting = role_command.get_arg_conflicts_with(arg);
    for other in role_command.get_arguments() {
        let declares = role_command
            .get_arg_conflicts_with(other)
            .iter()
            .any(|conflict| conflict.get_id() == arg.get_id());
        if declares
            && !conflicting
                .iter()
                .any(|known| known.get_id() == other.get_id())
        {
            conflicting.push(other);
        }
    }
    conflicting
}

/// The flags a file may set for this role: every long flag except help,
/// version, hidden ones (internal) and `--config`.
pub fn settable_args(role_command: &Command) -> impl Iterator<Item = &Arg> {
    role_command.get_arguments().filter(|arg| {
        arg.get_long().is_some()
            && !arg.is_hide_set()
            && arg.get_id() != CONFIG_ARG
            && !matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

/// The flag a key names: its long name or an alias, kebab-case or snake_case.
pub fn find_settable_arg<'a>(role_command: &'a Command, key: &str) -> Option<&'a Arg> {
    let long = key.replace('_', "-");
    settable_args(role_command).find(|arg| {
        arg.get_long() == Some(long.as_str())
            || arg
                .get_all_aliases()
                .is_some_and(|aliases| aliases.contains(&long.as_str()))
    })
}

fn unknown_key_message(role_command: &Command, key: &str) -> String {
    let normalized = key.replace('_', "-");
    if normalized == CONFIG_ARG {
        return format!("{key:?}: a configuration file cannot name another one");
    }
    let valid: Vec<&str> = settable_args(role_command)
        .filter_map(Arg::get_long)
        .collect();
    match nearest(&normalized, valid.iter().copied()) {
        Some(candidate) => format!("unknown key {key:?}; did you mean {candidate:?}?"),
        None => format!("unknown key {key:?}; valid keys: {}", valid.join(", ")),
    }
}

/// The candidate closest to `word`, when close enough to be a misspelling.
pub fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let (distance, candidate) = candidates
        .map(|candidate| {
            // A shortened name (`coord`, `metrics`) is as near as a typo.
            let distance = if candidate.starts_with(word) {
                1
            } else {
                edit_distance(word, candidate)
            };
            (distance, candidate)
        })
        .min()?;
    (distance <= 2.max(word.len() / 3)).then_some(candidate)
}

/// Levenshtein distance, for suggestions.
fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (row, left_char) in left.chars().enumerate() {
        let mut current = vec![row + 1];
        for (column, right_char) in right.iter().enumerate() {
            let substitution = previous[column] + usize::from(left_char != *right_char);
            current.push(
                substitution
                    .min(previous[column + 1] + 1)
                    .min(current[column] + 1),
            );
        }
        previous = current;
    }
    previous[right.len()]
}

/// The command-line words a value stands for: a switch appears when true
/// (a counted one as many times as the integer says); a flag with values
/// gets `--flag=value` once per value, an array giving several.
fn flags_for(arg: &Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    let long = arg.get_long().expect("settable args have a long name");
    if !arg.get_action().takes_values() {
        let times = match (arg.get_action(), value) {
            (ArgAction::Count, toml::Value::Integer(count)) => usize::try_from(*count)
                .map_err(|_| format!("expected a count of 0 or more, found {count}"))?,
            (_, toml::Value::Boolean(set)) => usize::from(*set),
            (_, other) => {
                return Err(format!(
                    "--{long} is a switch: give true or false, not {}",
                    describe(other)
                ));
            }
        };
        return Ok(vec![format!("--{long}"); times]);
    }
    let values = match value {
        toml::Value::Array(items) => items.iter().collect(),
        single => vec![single],
    };
    values
        .into_iter()
        .map(|value| scalar_text(value).map(|text| format!("--{long}={text}")))
        .collect()
}

fn scalar_text(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        toml::Value::Datetime(datetime) => Ok(datetime.to_string()),
        other => Err(format!(
            "expected a string, number, boolean or an array of them, found {}",
            describe(other)
        )),
    }
}

fn describe(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands() -> Commands {
        let role = Command::new("expert")
            .arg(Arg::new("model").long("model").required(true).env("MODEL"))
            .arg(
                Arg::new("threads")
                    .long("threads")
                    .value_parser(clap::value_parser!(u32)),
            )
            .arg(
                Arg::new("peers")
                    .long("peers")
                    .action(ArgAction::Append)
                    .value_delimiter(','),
            )
            .arg(
                Arg::new("insecure")
                    .long("insecure")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("verbose").long("verbose").action(ArgAction::Count))
            .arg(Arg::new("dead_after").long("dead-after"))
            .arg(
                Arg::new("internal")
                    .long("internal")
                    .action(ArgAction::SetTrue)
                    .hide(true),
            );
        Commands::new(Command::new("moemesh").subcommand(role))
    }

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn values_become_flags_and_missing_required_flags_are_listed() {
        let report = check_role(
            &commands(),
            "expert",
            &table("threads = 4\npeers = ['a', 'b']\ninsecure = true\nverbose = 2"),
        );
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let mut flags: Vec<&str> = report
            .settings
            .iter()
            .flat_map(|setting| setting.flags.iter().map(String::as_str))
            .collect();
        flags.sort();
        assert_eq!(
            flags,
            [
                "--insecure",
                "--peers=a",
                "--peers=b",
                "--threads=4",
                "--verbose",
                "--verbose"
            ]
        );
        assert_eq!(report.left_open, ["--model (env MODEL)"]);
    }

    #[test]
    fn mistakes_name_their_key() {
        let report = check_role(
            &commands(),
            "expert",
            &table("modle = 'x'\nthreads = 'many'\ninsecure = 'yes'\ninternal = true\nmodel = {}"),
        );
        let problems = report.problems.join("\n");
        assert!(
            problems.contains("unknown key \"modle\"; did you mean \"model\"?"),
            "{problems}"
        );
        assert!(
            problems.contains("\"threads\": invalid value 'many'"),
            "{problems}"
        );
        assert!(problems.contains("--insecure is a switch"), "{problems}");
        assert!(problems.contains("unknown key \"internal\""), "{problems}");
        assert!(
            problems.contains("\"model\": expected a string"),
            "{problems}"
        );
    }

    #[test]
    fn snake_case_keys_and_duplicates() {
        let report = check_role(
            &commands(),
            "expert",
            &table("dead_after = 1\ndead-after = 2"),
        );
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].contains("sets the same flag as"));
        assert_eq!(report.settings.len(), 1);
        assert_eq!(edit_distance("metrics_addr", "metrics-addr"), 1);
        assert_eq!(
            nearest("coord", ["expert", "coordinator"].into_iter()),
            Some("coordinator")
        );
        assert_eq!(nearest("verbosity", ["model", "listen"].into_iter()), None);
    }
}
