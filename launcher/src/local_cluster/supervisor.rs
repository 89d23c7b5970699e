//! One supervised process of a local cluster, as Kubernetes runs a pod's
//! container: started, watched, reported on stderr when it exits, and
//! (unless restarts are off) started again with the same arguments after a
//! backoff that grows while it keeps crashing.
//!
//! Each process is owned by one task. [`SupervisedProcess`] is the handle:
//! it tells the current pid and asks the task to stop the process
//! gracefully (close its stdin, wait, kill after a grace period). Children
//! run in their own process group, so a Ctrl-C in the terminal reaches only
//! `moemesh up`, which then stops them in order instead of each exiting on
//! its own and being restarted.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::ops::METRICS_LINE_PREFIX;
use crate::roles::READY_LINE_PREFIX;

/// How long a node may take to load its weights and start serving.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long nodes get to finish in-flight work after being asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Everything needed to start one process, again and again.
pub struct MemberSpec {
    /// The subcommand: `coordinator`, `expert` or `router`.
    pub role: &'static str,
    /// Its id in the cluster (`coordinator-1`, `expert-0`, `router-0`).
    pub id: String,
    /// Arguments after the executable: global flags, the role, its flags.
    pub args: Vec<String>,
    /// Extra environment, for values that must not show in `ps`.
    pub env: Vec<(String, String)>,
    /// Variables of this process's environment the child must not inherit.
    pub env_remove: Vec<String>,
}

/// Whether a process that exits on its own is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    Never,
}

/// A running child and the pipe whose closing tells it to exit.
struct RunningChild {
    child: Child,
    /// Dropped to ask the child to shut down.
    stdin: Option<ChildStdin>,
    pid: Option<u32>,
    /// When it printed that it serves.
    serving_since: Instant,
}

/// The handle of one supervised process; dropping it kills the process.
pub struct SupervisedProcess {
    pub role: &'static str,
    /// The URL it serves at, the same across restarts.
    pub url: String,
    /// Its Prometheus metrics URL, when it was given `--metrics-addr`.
    pub metrics_url: Option<String>,
    /// The current process's pid; None while it is not running.
    pid: Arc<Mutex<Option<u32>>>,
    /// Asks the supervising task to stop the process and return.
    stop_tx: Option<oneshot::Sender<()>>,
    supervise_task: Option<JoinHandle<()>>,
}

impl SupervisedProcess {
    /// Starts `spec`, waits until it serves, then supervises it.
    pub async fn start(mut spec: MemberSpec, policy: RestartPolicy) -> anyhow::Result<Self> {
        let (running, Announced { url, metrics_url }) = spawn_until_serving(&spec).await?;
        // A restart must come back where routers, peers and scrapers look for it.
        pin_address(&mut spec.args, "--listen", &url);
        if let Some(metrics_url) = &metrics_url {
            pin_address(&mut spec.args, "--metrics-addr", metrics_url);
        }
        let pid = Arc::new(Mutex::new(running.pid));
        let (stop_tx, stop_rx) = oneshot::channel();
        let role = spec.role;
        let supervisor = Supervisor {
            spec,
            policy,
            pid: pid.clone(),
        };
        let supervise_task = tokio::spawn(supervisor.run(running, stop_rx));
        Ok(Self {
            role,
            url,
            metrics_url,
            pid,
            stop_tx: Some(stop_tx),
            supervise_task: Some(supervise_task),
        })
    }

    /// The pid of the process now serving, None while it is down.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().expect("pid lock")
    }

    /// Stops the process gracefully and ends its supervision.
    pub async fn stop(&mut self) {
        if let Some(stop_tx) = self.stop_tx.take() {
            let _ = stop_tx.send(());
        }
        if let Some(task) = self.supervise_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SupervisedProcess {
    fn drop(&mut self) {
        // Dropping the task drops its child, which kills it (kill_on_drop).
        if let Some(task) = &self.supervise_task {
            task.abort();
        }
    }
}

/// Replaces the value of `flag` (`--listen`, `--metrics-addr`, which may
/// ask for port 0) with the address of `url`, where the process serves.
fn pin_address(args: &mut [String], flag: &str, url: &str) {
    let address = url.split_once("://").map_or(url, |(_, address)| address);
    let address = address
        .split_once('/')
        .map_or(address, |(address, _)| address);
    let position = args.iter().position(|arg| arg == flag);
    if let Some(value) = position.and_then(|position| args.get_mut(position + 1)) {
        *value = address.to_string();
    }
}

/// What a child prints on stdout as it starts.
struct Announced {
    url: String,
    metrics_url: Option<String>,
}

/// Starts `moemesh <spec.args>` and waits until it prints its URL.
async fn spawn_until_serving(spec: &MemberSpec) -> anyhow::Result<(RunningChild, Announced)> {
    let (role, id) = (spec.role, &spec.id);
    let executable = std::env::current_exe().context("cannot find the moemesh executable")?;
    let mut command = Command::new(executable);
    for name in &spec.env_remove {
        command.env_remove(name);
    }
    // up gives its children every setting on their command line; a
    // configuration file meant for a role must not change them.
    command.env_remove("MOEMESH_CONFIG");
    command
        .args(&spec.args)
        .arg("--exit-with-parent")
        .envs(spec.env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start the {role} process {id}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let ready = async {
        let mut metrics_url = None;
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix(METRICS_LINE_PREFIX) {
                metrics_url = Some(url.to_string());
            }
            if let Some(url) = line.strip_prefix(READY_LINE_PREFIX) {
                let url = url.to_string();
                return Ok::<_, std::io::Error>(Some(Announced { url, metrics_url }));
            }
        }
        Ok(None)
    };
    let announced = match tokio::time::timeout(START_TIMEOUT, ready).await {
        Ok(Ok(Some(announced))) => announced,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await?;
            bail!("the {role} process {id} exited before serving ({status}); its errors are above");
        }
        Err(_) => bail!("the {role} process {id} did not start serving within {START_TIMEOUT:?}"),
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let running = RunningChild {
        pid: child.id(),
        stdin: child.stdin.take(),
        child,
        serving_since: Instant::now(),
    };
    Ok((running, announced))
}

/// The delay before a restart: 0.5 s, doubling on each crash up to 10 s,
/// back to 0.5 s once a process has served for 30 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);
    /// A process that served this long is healthy again.
    const RESET_AFTER: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The delay before restarting a process that ran for `ran_for`.
    pub fn after_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= Self::RESET_AFTER {
            self.next = Self::FIRST;
        }
        self.delay_and_grow()
    }

    /// The delay before trying again after a start that failed.
    pub fn after_failed_start(&mut self) -> Duration {
        self.delay_and_grow()
    }

    fn delay_and_grow(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

/// The task that owns one process.
struct Supervisor {
    spec: MemberSpec,
    policy: RestartPolicy,
    /// Shared with the handle, so `LocalCluster::processes` stays true.
    pid: Arc<Mutex<Option<u32>>>,
}

impl Supervisor {
    fn name(&self) -> String {
        format!("{} {}", self.spec.role, self.spec.id)
    }

    fn set_pid(&self, pid: Option<u32>) {
        *self.pid.lock().expect("pid lock") = pid;
    }

    async fn run(self, mut running: RunningChild, mut stop_rx: oneshot::Receiver<()>) {
        let mut backoff = Backoff::new();
        loop {
            let status = tokio::select! {
                status = running.child.wait() => status,
                _ = &mut stop_rx => {
                    self.stop_gracefully(running).await;
                    self.set_pid(None);
                    return;
                }
            };
            self.set_pid(None);
            let status = describe_status(status);
            let pid = running.pid.map_or("?".into(), |pid| pid.to_string());
            let name = self.name();
            if self.policy == RestartPolicy::Never {
                eprintln!(
                    "moemesh: {name} (pid {pid}) exited ({status}); not restarting it (restarts are off); the rest keeps serving"
                );
                let _ = stop_rx.await;
                return;
            }
            let delay = backoff.after_exit(running.serving_since.elapsed());
            eprintln!("moemesh: {name} (pid {pid}) exited ({status}); restarting it in {delay:?}");
            match self.restart(delay, &mut backoff, &mut stop_rx).await {
                Some(restarted) => running = restarted,
                None => return,
            }
        }
    }

    /// Starts the process again after `delay`, retrying with backoff until
    /// it serves; None when asked to stop first.
    async fn restart(
        &self,
        mut delay: Duration,
        backoff: &mut Backoff,
        stop_rx: &mut oneshot::Receiver<()>,
    ) -> Option<RunningChild> {
        let name = self.name();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut *stop_rx => return None,
            }
            // A stop while it starts drops the child, which kills it.
            let started = tokio::select! {
                started = spawn_until_serving(&self.spec) => started,
                _ = &mut *stop_rx => return None,
            };
            match started {
                Ok((running, Announced { url, .. })) => {
                    let pid = running.pid.map_or("?".into(), |pid| pid.to_string());
                    eprintln!("moemesh: {name} restarted (pid {pid}), serving at {url}");
                    self.set_pid(running.pid);
                    return Some(running);
                }
                Err(error) => {
                    delay = backoff.after_failed_start();
                    eprintln!(
                        "moemesh: {name} did not restart: {error:#}; trying again in {delay:?}"
                    );
                }
            }
        }
    }

    /// Closes the child's stdin, waits, and kills it after the grace period.
    async fn stop_gracefully(&self, mut running: RunningChild) {
        let name = self.name();
        running.stdin.take();
        match tokio::time::timeout(STOP_GRACE, running.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(status) => eprintln!("{name} exited with {}", describe_status(status)),
            Err(_) => {
                eprintln!("{name} did not stop within {STOP_GRACE:?}; killing it");
                if let Err(error) = running.child.kill().await {
                    eprintln!("cannot kill {name}: {error}");
                }
            }
        }
    }
}

fn describe_status(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(error) => format!("its status is unknown: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_seconds_and_resets_after_a_healthy_run() {
        let mut backoff = Backoff::new();
        let crash = Duration::from_secs(1);
        let delays: Vec<_> = (0..7).map(|_| backoff.after_exit(crash)).collect();
        let millis: Vec<_> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
        assert_eq!(
            backoff.after_exit(Duration::from_secs(30)),
            Duration::from_millis(500)
        );
        assert_eq!(backoff.after_failed_start(), Duration::from_secs(1));
    }

    #[test]
    fn a_restart_listens_where_the_first_start_did() {
        let mut args: Vec<String> = [
            "expert",
            "--listen",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        pin_address(&mut args, "--listen", "https://127.0.0.1:40123");
        pin_address(
            &mut args,
            "--metrics-addr",
            "http://127.0.0.1:40124/metrics",
        );
        assert_eq!(args[2], "127.0.0.1:40123");
        assert_eq!(args[4], "127.0.0.1:40124");
    }
}
