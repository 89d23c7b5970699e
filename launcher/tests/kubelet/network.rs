//! The cluster network on one machine: every (pod, container port) gets a
//! port of its own on 127.0.0.1, and the addresses a manifest names (its
//! own `0.0.0.0:PORT`, a Service, a StatefulSet pod's stable name) are
//! rewritten to those ports.

use std::collections::HashMap;

use super::manifests::{Pod, Service, get, sequence, text};

pub struct Network {
    /// (pod name, container port) to the local port standing for it.
    ports: HashMap<(String, u16), u16>,
    /// Per pod, its named container ports.
    named_ports: HashMap<String, HashMap<String, u16>>,
    pods: Vec<Pod>,
    services: Vec<Service>,
}

impl Network {
    /// Gives every declared container port of every pod a free local port.
    pub fn new(pods: &[Pod], services: Vec<Service>) -> Self {
        let mut ports = HashMap::new();
        let mut named_ports = HashMap::new();
        for pod in pods {
            let mut named = HashMap::new();
            for container in sequence(&pod.spec, &["containers"]) {
                for port in sequence(container, &["ports"]) {
                    let number = get(port, &["containerPort"])
                        .and_then(|v| v.as_u64())
                        .expect("containerPort") as u16;
                    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    ports.insert(
                        (pod.name.clone(), number),
                        probe.local_addr().unwrap().port(),
                    );
                    let name = text(port, &["name"]);
                    if !name.is_empty() {
                        named.insert(name.to_string(), number);
                    }
                }
            }
            named_ports.insert(pod.name.clone(), named);
        }
        Self {
            ports,
            named_ports,
            pods: pods.to_vec(),
            services,
        }
    }

    /// The local port of `pod`'s container port `port` (a number or a name).
    pub fn pod_port(&self, pod: &str, port: &str) -> Option<u16> {
        let number = match port.parse::<u16>() {
            Ok(number) => number,
            Err(_) => *self.named_ports.get(pod)?.get(port)?,
        };
        self.ports.get(&(pod.to_string(), number)).copied()
    }

    /// The local port a Service's `port` reaches: its first selected pod's target.
    pub fn service_port(&self, service: &str, port: u16) -> Option<u16> {
        let service = self
            .services
            .iter()
            .find(|candidate| candidate.name == service)?;
        let (_, target) = service.ports.iter().find(|(number, _)| *number == port)?;
        let mut selected: Vec<&Pod> = self
            .pods
            .iter()
            .filter(|pod| {
                service
                    .selector
                    .iter()
                    .all(|(key, value)| pod.labels.get(key) == Some(value))
            })
            .collect();
        selected.sort_by(|a, b| a.name.cmp(&b.name));
        self.pod_port(&selected.first()?.name, target)
    }

    /// Where `host:port`, as `pod` names it, is on this machine.
    fn resolve(&self, pod: &str, host: &str, port: u16) -> Option<u16> {
        if ["0.0.0.0", "127.0.0.1", "localhost", "[::]", ""].contains(&host) {
            return self.pod_port(pod, &port.to_string());
        }
        let host = host
            .trim_end_matches(".cluster.local")
            .trim_end_matches(".svc")
            .trim_end_matches(".default");
        let labels: Vec<&str> = host.split('.').collect();
        match labels.as_slice() {
            [service] => self.service_port(service, port),
            [member, subdomain] => {
                let known = self.pods.iter().any(|candidate| {
                    candidate.name == *member && candidate.subdomain.as_deref() == Some(*subdomain)
                });
                known
                    .then(|| self.pod_port(member, &port.to_string()))
                    .flatten()
            }
            _ => None,
        }
    }

    /// `text` with every `host:port` it holds rewritten to `127.0.0.1:LOCAL`;
    /// an address that resolves to nothing is an error (a manifest naming a
    /// host no Service or pod provides).
    pub fn rewrite(&self, pod: &str, text: &str) -> Result<String, String> {
        let bytes = text.as_bytes();
        let mut out = String::new();
        let mut copied = 0;
        let mut index = 0;
        while index < bytes.len() {
            if bytes[index] != b':' {
                index += 1;
                continue;
            }
            let digits_end = bytes[index + 1..]
                .iter()
                .position(|byte| !byte.is_ascii_digit())
                .map_or(bytes.len(), |offset| index + 1 + offset);
            let host_start = bytes[..index]
                .iter()
                .rposition(|&byte| !(byte.is_ascii_alphanumeric() || byte == b'.' || byte == b'-'))
                .map_or(0, |position| position + 1);
            let host = &text[host_start..index];
            let is_address =
                digits_end > index + 1 && host.chars().any(|c| c.is_ascii_alphabetic() || c == '.');
            if !is_address {
                index += 1;
                continue;
            }
            let port: u16 = text[index + 1..digits_end]
                .parse()
                .map_err(|_| format!("bad port in {text:?}"))?;
            let local = self
                .resolve(pod, host, port)
                .ok_or_else(|| format!("{pod}: nothing answers at {host}:{port} (in {text:?})"))?;
            out.push_str(&text[copied..host_start]);
            out.push_str(&format!("127.0.0.1:{local}"));
            copied = digits_end;
            index = digits_end;
        }
        out.push_str(&text[copied..]);
        Ok(out)
    }
}
