//! `moemesh up` run as a user runs it: what it prints, its children (from
//! /proc), and stopping it with a signal.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MOEMESH: &str = env!("CARGO_BIN_EXE_moemesh");

/// A running `moemesh up` and what it printed.
pub struct UpProcess {
    pub child: Child,
    pub coordinators: Vec<String>,
    /// (node id, URL) of each expert node.
    pub experts: Vec<(String, String)>,
    pub router: String,
    /// (member id, metrics URL) of each process.
    pub metrics: Vec<(String, String)>,
    /// The `export NAME=VALUE` lines printed after the URLs.
    pub exports: BTreeMap<String, String>,
    /// Everything printed on stderr so far.
    stderr: Arc<Mutex<String>>,
}

/// One child process of `moemesh up`.
#[derive(Debug, Clone)]
pub struct Member {
    pub pid: u32,
    /// `coordinator-N`, `expert-N` or `router-0`.
    pub id: String,
    pub cmdline: Vec<String>,
}

impl UpProcess {
    /// Starts `moemesh <args>` and reads its stdout up to the export of
    /// `last_export`, the last line it prints once the cluster serves.
    pub fn start(args: &[&str], last_export: &str) -> Self {
        Self::start_with_env(args, &[], last_export)
    }

    /// `moemesh up` on the checkpoint in `model`: three coordinators, two
    /// expert nodes of one thread each and a router, all on free ports;
    /// `env` is added to their environment.
    pub fn two_expert_nodes(model: &str, env: &[(&str, &str)]) -> Self {
        let args = [
            "up",
            "--model",
            model,
            "--router-addr",
            "127.0.0.1:0",
            "--expert-nodes",
            "2",
            "--threads-per-node",
            "1",
        ];
        Self::start_with_env(&args, env, "MOEMESH_CLUSTER_SECRET")
    }

    /// [`UpProcess::start`] with `env` added to its environment (and its children's).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)], last_export: &str) -> Self {
        let mut child = Command::new(MOEMESH)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("MOEMESH_CLUSTER_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moemesh starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[moemesh] {line}");
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let (line_tx, line_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut up = Self {
            child,
            coordinators: Vec::new(),
            experts: Vec::new(),
            router: String::new(),
            metrics: Vec::new(),
            exports: BTreeMap::new(),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        while !up.exports.contains_key(last_export) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = line_rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "moemesh up printed no export of {last_export} (it exited or took over 600 s); stderr:\n{}",
                    up.stderr()
                )
            });
            up.read_line(&line);
        }
        up
    }

    fn read_line(&mut self, line: &str) {
        if let Some(url) = line.strip_prefix("coordinator ") {
            self.coordinators.push(url.to_string());
        } else if let Some(rest) = line.strip_prefix("expert ") {
            let (id, url) = rest.split_once(' ').expect("expert ID URL");
            self.experts.push((id.to_string(), url.to_string()));
        } else if let Some(url) = line.strip_prefix("router ") {
            self.router = url.to_string();
        } else if let Some(rest) = line.strip_prefix("metrics ") {
            let (url, id) = rest.split_once(' ').expect("metrics URL ID");
            self.metrics.push((id.to_string(), url.to_string()));
        } else if let Some(export) = line.strip_prefix("export ") {
            let (name, value) = export.split_once('=').expect("export NAME=VALUE");
            self.exports.insert(name.to_string(), value.to_string());
        }
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds every one of `needles`; panics after `timeout`.
    pub fn wait_for_stderr(&self, needles: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stderr();
            if needles.iter().all(|needle| text.contains(needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {timeout:?}, stderr lacks one of {needles:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Its living child processes, from /proc.
    pub fn members(&self) -> Vec<Member> {
        children_of(self.child.id())
            .into_iter()
            .filter_map(|pid| {
                let cmdline = read_cmdline(pid)?;
                let id = member_id(&cmdline)?;
                Some(Member { pid, id, cmdline })
            })
            .collect()
    }

    /// The living child named `id`.
    pub fn member(&self, id: &str) -> Option<Member> {
        self.members().into_iter().find(|member| member.id == id)
    }

    /// Sends SIGTERM and waits (at most `timeout`) for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        signal(self.child.id(), "-TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "moemesh up did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        // Its children exit when their stdin (held by up) closes.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `signal` (`-KILL`, `-TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Whether `pid` is a living process (not gone, not a zombie).
pub fn is_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|(state, _)| state != 'Z')
}

/// The state letter and parent pid of `pid`, from /proc/PID/stat.
fn process_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            process_state(pid).is_some_and(|(state, ppid)| ppid == parent && state != 'Z')
        })
        .collect()
}

fn read_cmdline(pid: u32) -> Option<Vec<String>> {
    read_nul_separated(&format!("/proc/{pid}/cmdline"))
}

/// The environment of `pid`, from /proc/PID/environ.
pub fn read_environment(pid: u32) -> Vec<String> {
    read_nul_separated(&format!("/proc/{pid}/environ")).unwrap_or_default()
}

fn read_nul_separated(path: &str) -> Option<Vec<String>> {
    let bytes = std::fs::read(path).ok()?;
    Some(
        bytes
            .split(|&byte| byte == 0)
            .filter(|item| !item.is_empty())
            .map(|item| String::from_utf8_lossy(item).into_owned())
            .collect(),
    )
}

/// The member a child of `moemesh up` is, from its arguments.
fn member_id(cmdline: &[String]) -> Option<String> {
    let value_of = |flag: &str| {
        let position = cmdline.iter().position(|arg| arg == flag)?;
        cmdline.get(position + 1).cloned()
    };
    let role = cmdline
        .iter()
        .find(|arg| ["coordinator", "expert", "router"].contains(&arg.as_str()))?;
    match role.as_str() {
        "coordinator" => Some(format!("coordinator-{}", value_of("--id")?)),
        "expert" => value_of("--node-id"),
        _ => Some("router-0".into()),
    }
}
