//! `--config FILE` and `moemesh config`, through the binary: the file
//! fills what the command line and the environment leave, and mistakes in
//! it are refused by name.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MOEMESH: &str = env!("CARGO_BIN_EXE_moemesh");
const EXAMPLE: &str = include_str!("../moemesh.example.toml");

/// `moemesh` with none of the caller's MOEMESH_* variables, so that only
/// what a test sets is in its environment.
fn moemesh() -> Command {
    let mut command = Command::new(MOEMESH);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOEMESH_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("moemesh runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn write_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("moemesh.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_check_accepts_the_example_and_says_what_it_leaves_open() {
    let (output, printed, _) = run(moemesh().args(["config", "example"]));
    assert!(output.status.success());
    assert_eq!(printed, EXAMPLE, "`config example` prints the example file");

    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), &printed);
    let (output, stdout, stderr) = run(moemesh().arg("config").arg("check").arg(&path));
    assert!(output.status.success(), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("coordinator: 12 settings ok; --id or --ordinal (env "),
        "{stdout}"
    );
    assert!(
        lines[0].ends_with("must come from the command line or the environment"),
        "{stdout}"
    );
    assert_eq!(lines[1], "expert: 14 settings ok", "{stdout}");
    assert_eq!(lines[2], "router: 8 settings ok", "{stdout}");
}

#[test]
fn config_check_refuses_unknown_keys_and_tables_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "[expert]\nmodel = \"/m\"\nlistn = \"0.0.0.0:1\"\nexit-with-parent = true\n\n[routers]\n",
    );
    let (output, stdout, stderr) = run(moemesh().arg("config").arg("check").arg(&path));
    assert!(!output.status.success(), "{stdout}");
    let file = path.display().to_string();
    assert!(stderr.contains(&file), "{stderr}");
    assert!(
        stderr.contains("unknown table [routers]; did you mean [router]?"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown key \"listn\""), "{stderr}");

    let path = write_file(
        dir.path(),
        "[expert]\nmodel = \"/m\"\nlistn = \"0.0.0.0:1\"\nexit-with-parent = true\n",
    );
    let (output, _, stderr) = run(moemesh().arg("config").arg("check").arg(&path));
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "{file}: [expert] unknown key \"listn\"; did you mean \"listen\"?"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("[expert] unknown key \"exit-with-parent\""),
        "internal flags are not settings: {stderr}"
    );
}

#[test]
fn config_check_refuses_values_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "[router]\nmodel = \"/m\"\nmax_in_flight = \"many\"\ninsecure = \"yes\"\nlisten = [\"a:1\", \"b:2\"]\n",
    );
    let (output, _, stderr) = run(moemesh().arg("config").arg("check").arg(&path));
    assert!(!output.status.success());
    assert!(
        stderr.contains("[router] \"max_in_flight\": invalid value 'many' for '--max-in-flight"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[router] \"insecure\": --insecure is a switch: give true or false"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[router] \"listen\": the argument '--listen"),
        "{stderr}"
    );
}

/// An expert node reads its model first, so the model directory it fails
/// to find shows which of flag, environment and file won.
#[test]
fn flags_beat_environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let model_of = |source: &str| dir.path().join(format!("model-from-{source}"));
    let path = write_file(
        dir.path(),
        &format!(
            "[expert]\nmodel = {:?}\nexperts = [\"*:*\"]\nlisten = \"127.0.0.1:0\"\n\n[coordinator]\nid = 1\n",
            model_of("file").display().to_string()
        ),
    );
    let missing_model = |command: &mut Command| {
        let (output, _, stderr) = run(command);
        assert!(!output.status.success(), "{stderr}");
        ["file", "env", "flag"]
            .into_iter()
            .filter(|source| stderr.contains(&model_of(source).display().to_string()))
            .collect::<Vec<_>>()
    };

    let from_file = missing_model(moemesh().arg("expert").arg("--config").arg(&path));
    assert_eq!(from_file, ["file"]);
    let before_the_role = missing_model(moemesh().arg("--config").arg(&path).arg("expert"));
    assert_eq!(before_the_role, ["file"]);
    let from_environment_variable =
        missing_model(moemesh().arg("expert").env("MOEMESH_CONFIG", &path));
    assert_eq!(from_environment_variable, ["file"]);

    let env_over_file = missing_model(
        moemesh()
            .args(["expert", "--config"])
            .arg(&path)
            .env("MOEMESH_MODEL", model_of("env")),
    );
    assert_eq!(env_over_file, ["env"]);

    let flag_over_both = missing_model(
        moemesh()
            .args(["expert", "--config"])
            .arg(&path)
            .arg("--model")
            .arg(model_of("flag"))
            .env("MOEMESH_MODEL", model_of("env")),
    );
    assert_eq!(flag_over_both, ["flag"]);
}

/// A file's key gives way to a flag it conflicts with: `id = 1` in the
/// file and MOEMESH_ORDINAL=4 in a StatefulSet pod make coordinator 5.
#[test]
fn a_file_setting_gives_way_to_a_conflicting_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("raft");
    let path = write_file(
        dir.path(),
        &format!(
            "[coordinator]\nid = 1\npeers = [\"1=http://127.0.0.1:1\"]\ndata-dir = {:?}\n",
            data_dir.display().to_string()
        ),
    );
    let (output, _, stderr) = run(moemesh()
        .args(["coordinator", "--config"])
        .arg(&path)
        .env("MOEMESH_ORDINAL", "4"));
    assert!(!output.status.success());
    assert!(!stderr.contains("cannot be used with"), "{stderr}");
    assert!(stderr.contains("id 5"), "{stderr}");
}

#[test]
fn a_role_refuses_a_file_with_mistakes_in_its_own_table_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "[expert]\nmodle = \"/m\"\nthreads = \"many\"\n\n[router]\nmodel = \"/m\"\n",
    );
    let (output, _, stderr) = run(moemesh().args(["expert", "--config"]).arg(&path));
    assert!(!output.status.success());
    let file = path.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}: [expert] unknown key \"modle\"; did you mean \"model\"?"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}: [expert] \"threads\": invalid value 'many' for '--threads"
        )),
        "{stderr}"
    );

    // The router's table is fine, and the expert's is not its concern.
    let (output, _, stderr) = run(moemesh()
        .args(["router", "--config"])
        .arg(&path)
        .arg("--placement")
        .arg(dir.path().join("no-placement.json")));
    assert!(!output.status.success());
    assert!(!stderr.contains("modle"), "{stderr}");
    assert!(stderr.contains("no-placement.json"), "{stderr}");
}

#[test]
fn config_is_an_option_of_each_role() {
    let (output, stdout, _) = run(moemesh().args(["expert", "--help"]));
    assert!(output.status.success());
    assert!(stdout.contains("--config <FILE>"), "{stdout}");
    assert!(stdout.contains("MOEMESH_CONFIG"), "{stdout}");
}
