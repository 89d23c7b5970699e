//! A small kubelet for tests: it reads rendered manifests, makes the pods
//! their workloads ask for and runs each container as a local process,
//! with the command, args and env the manifest gives (downward API,
//! Secrets and `$(VAR)` expansion included), Service and pod names mapped
//! to ports on 127.0.0.1, volumes as directories, init containers first,
//! restarts by the pod's restart policy, gRPC probes and preStop hooks.

#![allow(dead_code)]

pub mod manifests;
pub mod network;
pub mod pod_env;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use manifests::{Manifests, Pod, get, sequence, strings, text};
use network::Network;
use serde_yaml_ng::Value;

/// The binaries of the image, as the manifests name them.
const IMAGE_BINARIES: [(&str, &str); 2] = [
    ("/usr/local/bin/moemesh", "moemesh"),
    ("/usr/local/bin/moectl", "moectl"),
];

/// A container ready to run: its program, arguments and environment, all
/// mapped onto this machine.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub pod: String,
    pub container: String,
    pub line: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub log: PathBuf,
}

/// Every pod of the manifests, running.
pub struct Cluster {
    pub manifests: Manifests,
    pub network: Network,
    pub pods: Vec<Pod>,
    root: tempfile::TempDir,
    volumes: BTreeMap<String, BTreeMap<String, PathBuf>>,
    stopping: Arc<AtomicBool>,
    /// Pid of each running main container, by (pod, container).
    pids: Arc<Mutex<BTreeMap<(String, String), u32>>>,
    /// Set once a Job's pod has succeeded.
    succeeded: Arc<Mutex<BTreeMap<String, bool>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Cluster {
    /// Starts every pod of `path` at once, as a scheduler with room for all would.
    pub fn start(path: &Path) -> Self {
        let manifests = Manifests::read(path);
        let pods = manifests.pods();
        let network = Network::new(&pods, manifests.services());
        let root = tempfile::tempdir().unwrap();
        let mut volumes = BTreeMap::new();
        for pod in &pods {
            let pod_root = root.path().join(&pod.name);
            volumes.insert(
                pod.name.clone(),
                pod_env::make_volumes(&manifests, pod, &pod_root),
            );
        }
        let mut cluster = Self {
            manifests,
            network,
            pods,
            root,
            volumes,
            stopping: Arc::new(AtomicBool::new(false)),
            pids: Arc::default(),
            succeeded: Arc::default(),
            threads: Vec::new(),
        };
        for pod in cluster.pods.clone() {
            cluster.run_pod(&pod);
        }
        cluster
    }

    /// A container of `pod` prepared to run (`init` picks initContainers).
    pub fn prepare(&self, pod: &Pod, container: &Value) -> Prepared {
        let name = text(container, &["name"]).to_string();
        let variables = pod_env::environment(&self.manifests, pod, container);
        let mounts = pod_env::mounts(container, &self.volumes[&pod.name]);
        let map = |word: &str| {
            let word = pod_env::map_paths(word, &mounts);
            self.network
                .rewrite(&pod.name, &word)
                .unwrap_or_else(|error| panic!("{error}"))
        };
        let line = pod_env::command_line(container, &variables)
            .iter()
            .map(|word| map(word))
            .collect();
        let env = variables
            .iter()
            .map(|(key, value)| (key.clone(), map(value)))
            .collect();
        let log = self.root.path().join(format!("{}-{name}.log", pod.name));
        Prepared {
            pod: pod.name.clone(),
            container: name,
            line,
            env,
            log,
        }
    }

    fn run_pod(&mut self, pod: &Pod) {
        let inits: Vec<Prepared> = sequence(&pod.spec, &["initContainers"])
            .iter()
            .map(|container| self.prepare(pod, container))
            .collect();
        let mains: Vec<Prepared> = sequence(&pod.spec, &["containers"])
            .iter()
            .map(|container| self.prepare(pod, container))
            .collect();
        let default_policy = if pod.owner_kind == "Job" {
            "Never"
        } else {
            "Always"
        };
        let policy = match text(&pod.spec, &["restartPolicy"]) {
            "" => default_policy.to_string(),
            policy => policy.to_string(),
        };
        let (stopping, pids, succeeded) = (
            self.stopping.clone(),
            self.pids.clone(),
            self.succeeded.clone(),
        );
        let pod_name = pod.name.clone();
        self.threads.push(std::thread::spawn(move || {
            for init in &inits {
                let status = spawn(init).wait().unwrap();
                assert!(
                    status.success(),
                    "init container {}/{} failed ({status}):\n{}",
                    init.pod,
                    init.container,
                    read_log(&init.log)
                );
            }
            let handles: Vec<_> = mains
                .into_iter()
                .map(|main| {
                    let (stopping, pids, succeeded, policy, pod_name) = (
                        stopping.clone(),
                        pids.clone(),
                        succeeded.clone(),
                        policy.clone(),
                        pod_name.clone(),
                    );
                    std::thread::spawn(move || {
                        supervise(main, &policy, &stopping, &pids, &succeeded, &pod_name)
                    })
                })
                .collect();
            for handle in handles {
                let _ = handle.join();
            }
        }));
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The pods whose names start with `prefix`.
    pub fn pods_named(&self, prefix: &str) -> Vec<&Pod> {
        self.pods
            .iter()
            .filter(|pod| pod.name.starts_with(prefix))
            .collect()
    }

    /// Waits until every container of `pod` with a gRPC readiness (or
    /// startup) probe answers SERVING on the probe's port.
    pub async fn wait_ready(&self, pod: &Pod, timeout: Duration) {
        for container in sequence(&pod.spec, &["containers"]) {
            for probe_kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let Some(probe) = get(container, &[probe_kind]) else {
                    continue;
                };
                let grpc = get(probe, &["grpc"])
                    .unwrap_or_else(|| panic!("{}: {probe_kind} is not a gRPC probe", pod.name));
                let port = match get(grpc, &["port"]) {
                    Some(Value::Number(port)) => port.to_string(),
                    Some(Value::String(name)) => name.clone(),
                    _ => panic!("a gRPC probe needs a port"),
                };
                let local = self.network.pod_port(&pod.name, &port).unwrap_or_else(|| {
                    panic!("{}: probe port {port} is not a container port", pod.name)
                });
                let service = text(grpc, &["service"]).to_string();
                let deadline = Instant::now() + timeout;
                while !serving(local, &service).await {
                    if Instant::now() > deadline {
                        panic!(
                            "{} not ready after {timeout:?} ({probe_kind} on {port}); logs:\n{}",
                            pod.name,
                            self.logs(&pod.name)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Waits until the Job pod `pod` has succeeded.
    pub async fn wait_succeeded(&self, pod: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self
            .succeeded
            .lock()
            .unwrap()
            .get(pod)
            .copied()
            .unwrap_or(false)
        {
            assert!(
                Instant::now() < deadline,
                "{pod} did not succeed within {timeout:?}; logs:\n{}",
                self.logs(pod)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs the preStop exec hook of `pod`'s containers, as the kubelet does
    /// before it stops them: the command as written (the kubelet expands no
    /// `$(VAR)` there), in the container's environment. Returns its output.
    pub fn run_pre_stop(&self, pod: &Pod) -> std::process::Output {
        let container = sequence(&pod.spec, &["containers"])
            .iter()
            .find(|container| get(container, &["lifecycle", "preStop", "exec"]).is_some())
            .unwrap_or_else(|| panic!("{} has no preStop exec hook", pod.name));
        let prepared = self.prepare(pod, container);
        let line = strings(container, &["lifecycle", "preStop", "exec", "command"]);
        let mut command = Command::new(program(&line[0]));
        command
            .args(&line[1..])
            .env_clear()
            .envs(&prepared.env)
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        command.output().unwrap()
    }

    /// Stops `pod`'s containers (SIGTERM) and does not restart them.
    pub fn stop_pod(&self, pod: &str) {
        let mut pids = self.pids.lock().unwrap();
        // Taken out first, so that supervision sees a stop, not a crash.
        let stopped: Vec<u32> = pids
            .extract_if(.., |(owner, _), _| owner == pod)
            .map(|(_, pid)| pid)
            .collect();
        for pid in stopped {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Everything `pod`'s containers printed.
    pub fn logs(&self, pod: &str) -> String {
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.root.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(pod) && name.ends_with(".log") {
                logs.push_str(&format!("--- {name}\n{}\n", read_log(&entry.path())));
            }
        }
        logs
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for pid in self.pids.lock().unwrap().values() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Runs `main` by `policy` (`Always`, `OnFailure`, `Never`) until the cluster stops.
fn supervise(
    main: Prepared,
    policy: &str,
    stopping: &AtomicBool,
    pids: &Mutex<BTreeMap<(String, String), u32>>,
    succeeded: &Mutex<BTreeMap<String, bool>>,
    pod: &str,
) {
    let key = (main.pod.clone(), main.container.clone());
    let mut backoff = Duration::from_millis(500);
    while !stopping.load(Ordering::SeqCst) {
        let mut child: Child = spawn(&main);
        pids.lock().unwrap().insert(key.clone(), child.id());
        let status = child.wait().unwrap();
        let terminated = pids.lock().unwrap().remove(&key).is_none();
        if status.success() && policy != "Always" {
            succeeded.lock().unwrap().insert(pod.to_string(), true);
            return;
        }
        if policy == "Never" || terminated || stopping.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The local binary standing for an image path.
fn program(path: &str) -> PathBuf {
    let (_, binary) = IMAGE_BINARIES
        .iter()
        .find(|(image_path, _)| *image_path == path)
        .unwrap_or_else(|| panic!("the image has no {path}"));
    let moemesh = PathBuf::from(env!("CARGO_BIN_EXE_moemesh"));
    let local = moemesh.with_file_name(binary);
    assert!(
        local.exists(),
        "{} is missing: build it first (cargo build -p {binary})",
        local.display()
    );
    local
}

/// Starts a container's process, its output appended to its log.
fn spawn(prepared: &Prepared) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&prepared.log)
        .unwrap();
    Command::new(program(&prepared.line[0]))
        .args(&prepared.line[1..])
        .env_clear()
        .envs(&prepared.env)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot start {}/{}: {error}",
                prepared.pod, prepared.container
            )
        })
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Whether the gRPC health service on local `port` reports `service` SERVING.
async fn serving(port: u16, service: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_string(),
    };
    matches!(client.check(request).await, Ok(answer) if answer.get_ref().status() == ServingStatus::Serving)
}
