//! `--config FILE`: one TOML file that configures the coordinator, expert
//! and router roles, a table each (`[coordinator]`, `[expert]`, `[router]`).
//!
//! A table's keys are its role's long flags, found by asking the role's
//! clap command, so a new flag is a new key with nothing to update here.
//! Precedence: a flag on the command line, then its environment variable,
//! then the file, then the default. The file's settings become flags
//! appended to the command line for those flags the command line and the
//! environment leave unset (nor set a flag that conflicts with), and the
//! command line is parsed once more; every value therefore goes through
//! the same parser, and errors, as a flag would.
//!
//! `moemesh config check FILE` checks every table without starting
//! anything; `moemesh config example` prints a commented example.

mod settings;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command, Parser, value_parser};

use settings::{CONFIG_ARG, Commands, RoleReport, Setting, check_role, conflicting_args, nearest};

/// The environment variable that names the configuration file.
pub const CONFIG_ENV: &str = "MOEMESH_CONFIG";

/// The subcommands a configuration file configures; each reads the table
/// of its name.
pub const ROLES: [&str; 3] = ["coordinator", "expert", "router"];

/// A commented example file, every key in it checked by the tests.
pub const EXAMPLE: &str = include_str!("../moemesh.example.toml");

#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand)]
enum ConfigCommand {
    /// Checks a configuration file without starting anything: every key of
    /// every role's table must be a flag of that role and every value must
    /// parse as that flag would. Lists the required flags the file leaves
    /// to the command line or the environment; exits non-zero on a mistake.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Prints a commented example configuration file.
    Example,
}

/// Runs `moemesh config`; `cli` is the whole command line's clap command.
pub fn run_config(args: ConfigArgs, cli: Command) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Example => {
            print!("{EXAMPLE}");
            Ok(())
        }
        ConfigCommand::Check { file } => check_file(&file, with_config_flag(cli)),
    }
}

fn check_file(path: &Path, cli: Command) -> anyhow::Result<()> {
    let file = ConfigFile::read(path)?;
    let commands = Commands::new(cli);
    for problem in &file.problems {
        eprintln!("error: {problem}");
    }
    let mut mistakes = file.problems.len();
    for role in ROLES {
        let Some(table) = file.table(role) else {
            println!("{role}: not configured");
            continue;
        };
        let report = check_role(&commands, role, table);
        for problem in &report.problems {
            eprintln!("error: {}: [{role}] {problem}", path.display());
        }
        mistakes += report.problems.len();
        if report.problems.is_empty() {
            println!("{}", summary(role, &report));
        }
    }
    if mistakes > 0 {
        bail!("{}: {mistakes} mistake(s)", path.display());
    }
    Ok(())
}

fn summary(role: &str, report: &RoleReport) -> String {
    let count = report.settings.len();
    let noun = if count == 1 { "setting" } else { "settings" };
    let mut line = format!("{role}: {count} {noun} ok");
    if !report.left_open.is_empty() {
        line.push_str(&format!(
            "; {} must come from the command line or the environment",
            report.left_open.join(", ")
        ));
    }
    line
}

/// Adds `--config FILE` to the command: before the subcommand, and on each
/// role (there also from MOEMESH_CONFIG).
pub fn with_config_flag(command: Command) -> Command {
    let before_role = Arg::new(CONFIG_ARG)
        .long("config")
        .value_name("FILE")
        .value_parser(value_parser!(PathBuf))
        .help("Configuration file for coordinator, expert and router (see their --config)");
    command.arg(before_role).mut_subcommands(|subcommand| {
        if !ROLES.contains(&subcommand.get_name()) {
            return subcommand;
        }
        let role = subcommand.get_name().to_string();
        subcommand.arg(
            Arg::new(CONFIG_ARG)
                .long("config")
                .env(CONFIG_ENV)
                .value_name("FILE")
                .value_parser(value_parser!(PathBuf))
                .help(format!(
                    "TOML file whose [{role}] table sets this role's flags: keys are the long \
                     flag names (`metrics-addr = \"0.0.0.0:9090\"`, arrays for repeated flags). \
                     Flags and their environment variables override it; check it with \
                     `moemesh config check FILE`"
                )),
        )
    })
}

/// Parses the command line of `P`, with the settings of a configuration
/// file (`--config` or MOEMESH_CONFIG) under those of the command line and
/// the environment. Exits as clap does on a usage error or `--help`; a
/// mistake in the file is an error naming the file, table and key.
pub fn parse_with_config<P: Parser>(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<P> {
    let mut command = with_config_flag(P::command());
    let merged = merge_file_settings(&command, args.into_iter().collect())?;
    let mut matches = match command.try_get_matches_from_mut(&merged.argv) {
        Ok(matches) => matches,
        Err(error) => {
            let _ = error.print();
            if error.use_stderr()
                && let Some(note) = merged.note()
            {
                eprintln!("{note}");
            }
            std::process::exit(error.exit_code());
        }
    };
    Ok(P::from_arg_matches_mut(&mut matches)
        .map_err(|error| error.format(&mut command))
        .unwrap_or_else(|error| error.exit()))
}

/// A command line with a configuration file's settings added.
struct Merged {
    argv: Vec<OsString>,
    /// The file, its role, and the keys taken from it.
    applied: Option<(PathBuf, String, Vec<String>)>,
}

impl Merged {
    /// Says which flags came from the file, for a usage error that may
    /// concern one of them (names only: values may be secrets).
    fn note(&self) -> Option<String> {
        let (path, role, keys) = self.applied.as_ref()?;
        (!keys.is_empty()).then(|| {
            format!(
                "note: {} [{role}] set {}",
                path.display(),
                keys.iter()
                    .map(|key| format!("--{}", key.replace('_', "-")))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

fn merge_file_settings(command: &Command, argv: Vec<OsString>) -> anyhow::Result<Merged> {
    let unchanged = |argv| {
        Ok(Merged {
            argv,
            applied: None,
        })
    };
    // A lenient first pass: the file may supply required flags, and any
    // other mistake is reported by the final parse.
    let Ok(matches) = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
    else {
        return unchanged(argv);
    };
    let before_role = matches.get_one::<PathBuf>(CONFIG_ARG).cloned();
    let Some((role, role_matches)) = matches.subcommand() else {
        return unchanged(argv);
    };
    if !ROLES.contains(&role) {
        if before_role.is_some() {
            bail!(
                "--config configures {}; `moemesh {role}` reads no configuration file",
                ROLES.join(", ")
            );
        }
        return unchanged(argv);
    }
    let after_role = role_matches.get_one::<PathBuf>(CONFIG_ARG).cloned();
    let path = match (before_role, after_role) {
        (Some(_), Some(_))
            if role_matches.value_source(CONFIG_ARG) == Some(ValueSource::CommandLine) =>
        {
            bail!("--config is given twice, before and after `{role}`")
        }
        (Some(path), _) | (None, Some(path)) => path,
        (None, None) => return unchanged(argv),
    };
    let file = ConfigFile::read(&path)?;
    if !file.problems.is_empty() {
        bail!("{}", file.problems.join("\n"));
    }
    let Some(table) = file.table(role) else {
        return unchanged(argv);
    };
    let commands = Commands::new(command.clone());
    let report = check_role(&commands, role, table);
    if !report.problems.is_empty() {
        let lines: Vec<String> = report
            .problems
            .iter()
            .map(|problem| format!("{}: [{role}] {problem}", path.display()))
            .collect();
        bail!("{}", lines.join("\n"));
    }
    let role_command = commands.role(role);
    let applied: Vec<Setting> = report
        .settings
        .into_iter()
        .filter(|setting| !set_outside_file(role_command, role_matches, &setting.arg_id))
        .collect();
    let mut argv = argv;
    // Before a `--`, after which words are no longer flags.
    let at = argv
        .iter()
        .skip(1)
        .position(|word| word == "--")
        .map_or(argv.len(), |index| index + 1);
    let flags = applied
        .iter()
        .flat_map(|setting| setting.flags.iter().map(OsString::from));
    argv.splice(at..at, flags);
    let keys = applied.into_iter().map(|setting| setting.key).collect();
    Ok(Merged {
        argv,
        applied: Some((path, role.to_string(), keys)),
    })
}

/// Whether the command line or the environment set the flag `arg_id`, or
/// a flag that conflicts with it (the file's `id` gives way to `--ordinal`).
fn set_outside_file(role_command: &Command, matches: &ArgMatches, arg_id: &str) -> bool {
    let outside = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    if outside(arg_id) {
        return true;
    }
    role_command
        .get_arguments()
        .find(|arg| arg.get_id() == arg_id)
        .is_some_and(|arg| {
            conflicting_args(role_command, arg)
                .iter()
                .any(|other| outside(other.get_id().as_str()))
        })
}

/// A parsed configuration file.
struct ConfigFile {
    tables: toml::Table,
    /// What is wrong at the top level (unknown tables, keys outside a
    /// table), each naming the file.
    problems: Vec<String>,
}

impl ConfigFile {
    /// Reads the file; a TOML syntax error is an error, the rest is
    /// collected in `problems`.
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let tables: toml::Table = text
            .parse()
            .map_err(|error| anyhow!("{}: {error}", path.display()))?;
        let problems = tables
            .iter()
            .filter_map(|(key, value)| top_level_problem(key, value))
            .map(|problem| format!("{}: {problem}", path.display()))
            .collect();
        Ok(Self { tables, problems })
    }

    fn table(&self, role: &str) -> Option<&toml::Table> {
        self.tables.get(role).and_then(toml::Value::as_table)
    }
}

/// The top level holds only role tables.
fn top_level_problem(key: &str, value: &toml::Value) -> Option<String> {
    let tables = format!("[{}]", ROLES.join("], ["));
    Some(match (ROLES.contains(&key), value.is_table()) {
        (true, true) => return None,
        (true, false) => format!("{key:?} must be a table: [{key}]"),
        (false, true) => match nearest(key, ROLES.iter().copied()) {
            Some(role) => format!("unknown table [{key}]; did you mean [{role}]?"),
            None => format!("unknown table [{key}]; the tables are {tables}"),
        },
        (false, false) => format!("{key:?} is outside any table: settings go in {tables}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> Command {
        let role = Command::new("router")
            .arg(Arg::new("model").long("model").required(true))
            .arg(
                Arg::new("listen")
                    .long("listen")
                    .default_value("127.0.0.1:1"),
            )
            .arg(
                Arg::new("placement")
                    .long("placement")
                    .conflicts_with("coordinators"),
            )
            .arg(
                Arg::new("coordinators")
                    .long("coordinator")
                    .action(clap::ArgAction::Append),
            );
        with_config_flag(
            Command::new("moemesh")
                .subcommand(role)
                .subcommand(Command::new("up")),
        )
    }

    fn merged(file: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moemesh.toml");
        std::fs::write(&path, file).unwrap();
        let argv = args
            .iter()
            .map(|arg| arg.replace("FILE", path.to_str().unwrap()).into())
            .collect();
        let merged = merge_file_settings(&command(), argv)?;
        Ok(merged
            .argv
            .iter()
            .map(|word| word.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn the_file_fills_what_the_command_line_leaves() {
        let file = "[router]\nlisten = '0.0.0.0:2'\nmodel = 'm'\nplacement = 'p.json'\n";
        let argv = merged(
            file,
            &["moemesh", "router", "--config", "FILE", "--listen", "x:3"],
        )
        .unwrap();
        assert_eq!(
            argv[4..],
            ["--listen", "x:3", "--model=m", "--placement=p.json"]
        );
        let argv = merged(
            file,
            &["moemesh", "--config=FILE", "router", "--coordinator=c"],
        )
        .unwrap();
        assert_eq!(
            argv[3..],
            ["--coordinator=c", "--listen=0.0.0.0:2", "--model=m"],
            "the file's placement gives way to a conflicting flag"
        );
    }

    #[test]
    fn mistakes_are_refused_with_the_file_and_table() {
        let error = merged(
            "[router]\nmodle = 'm'\n",
            &["moemesh", "router", "--config=FILE"],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("moemesh.toml: [router] unknown key \"modle\"; did you mean \"model\"?"),
            "{error}"
        );
        let error = merged("[routr]\n", &["moemesh", "router", "--config=FILE"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown table [routr]; did you mean [router]?"),
            "{error}"
        );
        let error = merged("[router]\n", &["moemesh", "--config=FILE", "up"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("reads no configuration file"), "{error}");
    }
}
