//! Rendered manifests, read as Kubernetes reads them: workloads become
//! pods (StatefulSet pods named by ordinal, a Deployment's and a Job's by
//! a suffix), with the labels, env, volumes and ports their templates give.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;
use serde_yaml_ng::Value;

/// Every object of a multi-document YAML file.
pub struct Manifests {
    objects: Vec<Value>,
}

/// One pod a workload asks for.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// `StatefulSet`, `Deployment` or `Job`.
    pub owner_kind: String,
    pub labels: BTreeMap<String, String>,
    /// A StatefulSet pod's headless Service: it resolves as `NAME.SUBDOMAIN`.
    pub subdomain: Option<String>,
    /// The pod template's spec.
    pub spec: Value,
    /// Claims from a StatefulSet's volumeClaimTemplates: one volume each.
    pub claim_templates: Vec<String>,
}

/// A Service: the pods it selects and its ports (port to target).
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub selector: BTreeMap<String, String>,
    /// (port, targetPort: a number or a container port's name).
    pub ports: Vec<(u16, String)>,
}

impl Manifests {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        let objects = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|document| Value::deserialize(document).expect("valid YAML"))
            .filter(|object| !object.is_null())
            .collect();
        Self { objects }
    }

    pub fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + use<'a> {
        let kind = kind.to_string();
        self.objects
            .iter()
            .filter(move |object| text(object, &["kind"]) == kind)
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .find(|object| text(object, &["metadata", "name"]) == name)
            .unwrap_or_else(|| panic!("the manifests have no {kind} {name}"))
    }

    /// A Secret's value for `key` (from `data`, base64, or `stringData`).
    pub fn secret(&self, name: &str, key: &str) -> String {
        let secret = self.named("Secret", name);
        if let Some(value) = get(secret, &["stringData", key]).and_then(Value::as_str) {
            return value.to_string();
        }
        let encoded = text(secret, &["data", key]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_else(|error| panic!("Secret {name} key {key}: {error}"));
        String::from_utf8(bytes).expect("a text secret")
    }

    /// The value for `key` of the Secret named `prefix`, or `prefix-HASH`
    /// as a kustomize secretGenerator names it.
    pub fn secret_named_like(&self, prefix: &str, key: &str) -> String {
        let name = self
            .of_kind("Secret")
            .map(|secret| text(secret, &["metadata", "name"]))
            .find(|name| {
                *name == prefix
                    || name
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
            .unwrap_or_else(|| panic!("no Secret named {prefix}"));
        self.secret(name, key)
    }

    /// A ConfigMap's value for `key`.
    pub fn config_map(&self, name: &str, key: &str) -> String {
        text(self.named("ConfigMap", name), &["data", key]).to_string()
    }

    /// Every key of a ConfigMap (`data`) or Secret (`data`, `stringData`), decoded.
    pub fn files_of(&self, kind: &str, name: &str) -> BTreeMap<String, String> {
        let object = self.named(kind, name);
        let mut files = BTreeMap::new();
        for field in ["data", "stringData"] {
            for (key, _) in mapping(object, &[field]) {
                let value = match (kind, field) {
                    ("Secret", "data") => self.secret(name, &key),
                    _ => text(object, &[field, &key]).to_string(),
                };
                files.insert(key, value);
            }
        }
        files
    }

    /// The pods of every StatefulSet, Deployment and Job.
    pub fn pods(&self) -> Vec<Pod> {
        let mut pods = Vec::new();
        for kind in ["StatefulSet", "Deployment", "Job"] {
            for workload in self.of_kind(kind) {
                let name = text(workload, &["metadata", "name"]);
                let replicas = match kind {
                    "Job" => 1,
                    _ => get(workload, &["spec", "replicas"])
                        .and_then(Value::as_u64)
                        .unwrap_or(1),
                };
                let template = get(workload, &["spec", "template"]).expect("a pod template");
                let claim_templates: Vec<String> =
                    sequence(workload, &["spec", "volumeClaimTemplates"])
                        .iter()
                        .map(|claim| text(claim, &["metadata", "name"]).to_string())
                        .collect();
                for ordinal in 0..replicas {
                    let mut labels: BTreeMap<String, String> =
                        mapping(template, &["metadata", "labels"])
                            .into_iter()
                            .map(|(key, value)| {
                                (key, value.as_str().unwrap_or_default().to_string())
                            })
                            .collect();
                    let (pod_name, subdomain) = match kind {
                        "StatefulSet" => {
                            labels
                                .insert("apps.kubernetes.io/pod-index".into(), ordinal.to_string());
                            let service = text(workload, &["spec", "serviceName"]).to_string();
                            (format!("{name}-{ordinal}"), Some(service))
                        }
                        _ => (format!("{name}-{ordinal}x7k2q"), None),
                    };
                    pods.push(Pod {
                        name: pod_name,
                        owner_kind: kind.to_string(),
                        labels,
                        subdomain,
                        spec: get(template, &["spec"]).expect("a pod spec").clone(),
                        claim_templates: claim_templates.clone(),
                    });
                }
            }
        }
        pods
    }

    pub fn services(&self) -> Vec<Service> {
        self.of_kind("Service")
            .map(|service| Service {
                name: text(service, &["metadata", "name"]).to_string(),
                selector: mapping(service, &["spec", "selector"])
                    .into_iter()
                    .map(|(key, value)| (key, value.as_str().unwrap_or_default().to_string()))
                    .collect(),
                ports: sequence(service, &["spec", "ports"])
                    .iter()
                    .map(|port| {
                        let number = get(port, &["port"])
                            .and_then(Value::as_u64)
                            .expect("a port") as u16;
                        let target = match get(port, &["targetPort"]) {
                            Some(Value::Number(target)) => target.to_string(),
                            Some(Value::String(target)) => target.clone(),
                            _ => number.to_string(),
                        };
                        (number, target)
                    })
                    .collect(),
            })
            .collect()
    }
}

/// The value at `path`, if any.
pub fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(*key))
}

/// The string at `path`, or "" when absent.
pub fn text<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    get(value, path).and_then(Value::as_str).unwrap_or_default()
}

/// The sequence at `path`, or an empty one.
pub fn sequence<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    get(value, path)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

/// The mapping at `path` as (key, value) pairs, or none.
pub fn mapping(value: &Value, path: &[&str]) -> Vec<(String, Value)> {
    get(value, path)
        .and_then(Value::as_mapping)
        .map(|entries| {
            entries
                .iter()
                .filter_map(|(key, value)| Some((key.as_str()?.to_string(), value.clone())))
                .collect()
        })
        .unwrap_or_default()
}

/// A list of strings (a container's command or args).
pub fn strings(value: &Value, path: &[&str]) -> Vec<String> {
    sequence(value, path)
        .iter()
        .map(|item| match item {
            Value::String(text) => text.clone(),
            other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
        })
        .collect()
}
