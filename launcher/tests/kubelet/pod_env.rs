//! What a container sees: its environment (values, the downward API,
//! Secrets and ConfigMaps, with `$(VAR)` references expanded as Kubernetes
//! expands them), its command line, and its volumes as local directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use super::manifests::{Manifests, Pod, get, sequence, strings, text};

/// The name every pod's `spec.nodeName` reads: one machine.
pub const NODE_NAME: &str = "test-node";

/// Expands `$(NAME)` from `variables` as Kubernetes does: `$$` is a
/// literal `$`, and a reference to an undefined variable stays as written.
pub fn expand(text: &str, variables: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(end) = reference.find(')')
            && let Some(value) = variables.get(&reference[..end])
        {
            out.push_str(value);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A container's environment, in the order it is declared.
pub fn environment(
    manifests: &Manifests,
    pod: &Pod,
    container: &Value,
) -> BTreeMap<String, String> {
    let mut variables = BTreeMap::new();
    for entry in sequence(container, &["env"]) {
        let name = text(entry, &["name"]).to_string();
        let value = if let Some(value) = get(entry, &["value"]).and_then(Value::as_str) {
            expand(value, &variables)
        } else if let Some(field) =
            get(entry, &["valueFrom", "fieldRef", "fieldPath"]).and_then(Value::as_str)
        {
            downward(pod, field)
        } else if let Some(secret) = get(entry, &["valueFrom", "secretKeyRef"]) {
            manifests.secret(text(secret, &["name"]), text(secret, &["key"]))
        } else if let Some(map) = get(entry, &["valueFrom", "configMapKeyRef"]) {
            manifests.config_map(text(map, &["name"]), text(map, &["key"]))
        } else {
            panic!(
                "{}: env {name} has a source this test does not know",
                pod.name
            )
        };
        variables.insert(name, value);
    }
    variables
}

/// A downward-API field of `pod`.
fn downward(pod: &Pod, field: &str) -> String {
    if let Some(label) = field
        .strip_prefix("metadata.labels['")
        .and_then(|rest| rest.strip_suffix("']"))
    {
        // A label the pod does not carry reads as empty.
        return pod.labels.get(label).cloned().unwrap_or_default();
    }
    match field {
        "metadata.name" => pod.name.clone(),
        "metadata.namespace" => "default".into(),
        "spec.nodeName" => NODE_NAME.into(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
        other => panic!("{}: unknown downward-API field {other}", pod.name),
    }
}

/// The command line: `command` (or the image's entrypoint, moemesh) and
/// `args`, with `$(VAR)` expanded from the environment.
pub fn command_line(container: &Value, variables: &BTreeMap<String, String>) -> Vec<String> {
    let mut line = strings(container, &["command"]);
    if line.is_empty() {
        line.push("/usr/local/bin/moemesh".into());
    }
    line.extend(strings(container, &["args"]));
    line.iter().map(|word| expand(word, variables)).collect()
}

/// The pod's volumes as directories under `root`: emptyDir and claims are
/// empty directories, ConfigMaps and Secrets hold their keys as files.
pub fn make_volumes(manifests: &Manifests, pod: &Pod, root: &Path) -> BTreeMap<String, PathBuf> {
    let mut volumes = BTreeMap::new();
    let mut names: Vec<(String, Option<(&str, String)>)> = pod
        .claim_templates
        .iter()
        .map(|claim| (claim.clone(), None))
        .collect();
    for volume in sequence(&pod.spec, &["volumes"]) {
        let name = text(volume, &["name"]).to_string();
        let source = if let Some(map) = get(volume, &["configMap", "name"]).and_then(Value::as_str)
        {
            Some(("ConfigMap", map.to_string()))
        } else if let Some(secret) = get(volume, &["secret", "secretName"]).and_then(Value::as_str)
        {
            Some(("Secret", secret.to_string()))
        } else if get(volume, &["emptyDir"]).is_some()
            || get(volume, &["persistentVolumeClaim"]).is_some()
        {
            None
        } else {
            panic!(
                "{}: volume {name} has a kind this test does not know",
                pod.name
            )
        };
        names.push((name, source));
    }
    for (name, source) in names {
        let directory = root.join("volumes").join(&name);
        std::fs::create_dir_all(&directory).unwrap();
        if let Some((kind, object)) = source {
            for (file, content) in manifests.files_of(kind, &object) {
                std::fs::write(directory.join(file), content).unwrap();
            }
        }
        volumes.insert(name, directory);
    }
    volumes
}

/// A container's mounts: (mount path, local directory), longest path first.
pub fn mounts(container: &Value, volumes: &BTreeMap<String, PathBuf>) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = sequence(container, &["volumeMounts"])
        .iter()
        .map(|mount| {
            let name = text(mount, &["name"]);
            let mut local = volumes
                .get(name)
                .unwrap_or_else(|| panic!("mount of unknown volume {name}"))
                .clone();
            let sub_path = text(mount, &["subPath"]);
            if !sub_path.is_empty() {
                local = local.join(sub_path);
            }
            (text(mount, &["mountPath"]).to_string(), local)
        })
        .collect();
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    mounts
}

/// `word` with a leading mount path (after `=` in a flag, or alone)
/// replaced by its local directory.
pub fn map_paths(word: &str, mounts: &[(String, PathBuf)]) -> String {
    let (prefix, value) = match word.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => (format!("{flag}="), value),
        _ => (String::new(), word),
    };
    for (mount, local) in mounts {
        if let Some(rest) = value.strip_prefix(mount.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{prefix}{}{rest}", local.display());
        }
    }
    word.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_as_kubernetes_expands_them() {
        let variables = BTreeMap::from([
            ("A".to_string(), "x".to_string()),
            ("E".into(), String::new()),
        ]);
        assert_eq!(
            expand("$(A)-$(B)-$$(A)-$(E),y", &variables),
            "x-$(B)-$(A)-,y"
        );
    }
}
