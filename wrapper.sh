#!/usr/bin/env bash
# wrapper.sh: the one entry point of the project: sets up the environment and runs the
# xray CLI and the tests inside it. See `./wrapper.sh help`.
set -euo pipefail

# Work from the repository root (the directory of this script), wherever it is called from,
# so that relative paths in config.yaml resolve against the repo root.
ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
export XRAY_CALLER_CWD="$PWD" # relative --config paths are the caller's
cd "$ROOT"

PROG="wrapper.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" # quiet TensorFlow's C++ logs unless asked

usage() {
    cat <<'EOF'
Usage: ./wrapper.sh [--config PATH] <command> [args...]

Options (before or after the command; for every experiment command):
  --config PATH                the config file (default: config.yaml of this folder; a relative
                               PATH is relative to the current folder). XRAY_CONFIG=PATH does the same.

Environment:
  env-setup [--force]          create or update the Python environment (idempotent):
                               ./.conda-env from environment.yml when conda is on PATH,
                               otherwise ./.venv from requirements.txt; then a class
                               archive of Spark's jars in cache/jvm (Spark's JVM starts sooner)
Experiments (run `python -m xray <command>` inside the environment):
  list                         list the experiments defined in config.yaml
  run <experiment> [--set key=value ...]
                               run one experiment (e.g. `run dataset_resize`)
  sweep [pattern]              run every experiment whose name matches pattern
  predict <experiment-or-model-dir> <image-or-folder>
                               classify one image or every image in a folder
  explain <experiment-or-model-dir> <image-or-folder> [--output DIR] [--class NAME]
                               class activation maps: where the model looks, per image
  cluster start [--workers N] | cluster stop
                               start or stop a local Spark standalone cluster
  mlflow-ui [--port 5000]      open the MLflow UI on the tracking store (tracking.uri), on 127.0.0.1
Tests:
  test [pytest args...]        run the test suite (e.g. `test -m 'not slow'`, `test -k resize`)
Other:
  help, -h, --help             show this help

Variables: XRAY_USE_VENV=1 forces ./.venv even when conda is available; XRAY_PYTHON picks the
interpreter that creates ./.venv (default python3, must be >= 3.11); JAVA_HOME is respected.
The environment is created on first use of any command, if missing or out of date.
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Environment selection
# ---------------------------------------------------------------------------------------------
if [[ -z "${XRAY_USE_VENV:-}" ]] && command -v conda >/dev/null 2>&1; then
    ENV_KIND=conda
    ENV_DIR="$ROOT/.conda-env"
else
    ENV_KIND=venv
    ENV_DIR="$ROOT/.venv"
fi
ENV_PY="$ENV_DIR/bin/python"
STAMP="$ENV_DIR/.xray-env-stamp"

sha256_of_inputs() {
    local files=("$ROOT/requirements.txt")
    [[ -f "$ROOT/environment.yml" ]] && files+=("$ROOT/environment.yml")
    if command -v sha256sum >/dev/null 2>&1; then
        cat "${files[@]}" | sha256sum | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        cat "${files[@]}" | shasum -a 256 | cut -d' ' -f1
    else
        cat "${files[@]}" | python3 -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
    fi
}

env_is_current() {
    [[ -f "$STAMP" && -x "$ENV_PY" ]] || return 1
    [[ "$(cat "$STAMP")" == "$(sha256_of_inputs)" ]] || return 1
    "$ENV_PY" -c 'import sys' >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------
# Java (Spark 4 needs Java 17+)
# ---------------------------------------------------------------------------------------------
# In the conda env, Java comes from conda-forge's openjdk; use it unless JAVA_HOME is set.
use_env_java() {
    if [[ -z "${JAVA_HOME:-}" && "$ENV_KIND" == conda ]]; then
        if [[ -x "$ENV_DIR/lib/jvm/bin/java" ]]; then
            export JAVA_HOME="$ENV_DIR/lib/jvm"
        elif [[ -x "$ENV_DIR/bin/java" ]]; then
            export JAVA_HOME="$ENV_DIR"
        fi
    fi
}

check_java() {
    local hint="Java 17+ is required by Spark 4: install openjdk-17-jre (apt) or set JAVA_HOME"
    local java_bin version major
    if [[ -n "${JAVA_HOME:-}" ]]; then
        java_bin="$JAVA_HOME/bin/java"
        [[ -x "$java_bin" ]] || die "JAVA_HOME=$JAVA_HOME has no bin/java. $hint"
    elif ! java_bin="$(command -v java)"; then
        die "java not found on PATH. $hint"
    fi
    version="$("$java_bin" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)" || true
    [[ -n "$version" ]] || die "cannot read the version of $java_bin. $hint"
    major="${version%%[.+-]*}"
    if [[ "$major" == 1 ]]; then # old scheme: 1.8.0_392
        major="${version#1.}"
        major="${major%%[._]*}"
    fi
    [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]] \
        || die "found Java $version at $java_bin. $hint"
}

# ---------------------------------------------------------------------------------------------
# env-setup
# ---------------------------------------------------------------------------------------------
create_or_update_env() {
    rm -f "$STAMP" # an interrupted or failed install must never look current
    if [[ "$ENV_KIND" == conda ]]; then
        export CONDA_ALWAYS_YES=true
        if [[ -d "$ENV_DIR/conda-meta" ]]; then
            conda env update -p "$ENV_DIR" -f "$ROOT/environment.yml" --prune
        else
            rm -rf "$ENV_DIR"
            conda env create -p "$ENV_DIR" -f "$ROOT/environment.yml"
        fi
    else
        local base_py="${XRAY_PYTHON:-python3}"
        command -v "$base_py" >/dev/null 2>&1 || die "$base_py not found: install Python >= 3.11 (or set XRAY_PYTHON)"
        "$base_py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "$base_py is $("$base_py" -V 2>&1); Python >= 3.11 is required by pyspark 4.3 (set XRAY_PYTHON)"
        if [[ -e "$ENV_DIR" ]] && ! "$ENV_PY" -m pip --version >/dev/null 2>&1; then
            rm -rf "$ENV_DIR" # broken venv (e.g. its base interpreter is gone): start over
        fi
        [[ -x "$ENV_PY" ]] || "$base_py" -m venv "$ENV_DIR"
        "$ENV_PY" -m pip install --disable-pip-version-check -r "$ROOT/requirements.txt"
    fi
    # Quick smoke test of the pinned stack before declaring the env good.
    "$ENV_PY" -c 'import pyspark, numpy, pandas, pyarrow, PIL, yaml, keras, mlflow' \
        || die "the environment in $ENV_DIR installed but its packages do not import"
    sha256_of_inputs >"$STAMP"
}

# Serialize concurrent setups (e.g. two shells starting at once) where flock exists.
lock_setup() {
    if command -v flock >/dev/null 2>&1; then
        exec 9<"$ROOT/wrapper.sh"
        flock 9
    fi
}

unlock_setup() { # so that the exec'd program does not hold the lock while it runs
    exec 9<&-
}

env_setup() { # verbose: for `./wrapper.sh env-setup`
    local force=0
    while (($#)); do
        case "$1" in
            --force) force=1 ;;
            *)
                echo "$PROG: env-setup: unknown argument '$1'" >&2
                usage >&2
                exit 2
                ;;
        esac
        shift
    done
    if [[ "$ENV_KIND" == venv ]]; then
        check_java # fail fast, before a long install
    fi
    lock_setup
    if ((force == 0)) && env_is_current; then
        echo "environment up to date (${ENV_DIR#"$ROOT"/})"
    else
        echo "setting up the $ENV_KIND environment in ${ENV_DIR#"$ROOT"/} ..."
        create_or_update_env
        echo "environment ready (${ENV_DIR#"$ROOT"/})"
    fi
    unlock_setup
    use_env_java
    check_java
    build_class_archive
}

build_class_archive() { # optional: without it Spark starts as before
    PYTHONPATH="$ROOT/code${PYTHONPATH:+:$PYTHONPATH}" "$ENV_PY" -m xray.class_archive \
        || echo "$PROG: warning: no class archive; Spark starts without it" >&2
}

ensure_env() { # quiet: before every other command
    if env_is_current; then return 0; fi
    lock_setup
    if env_is_current; then
        unlock_setup
        return 0
    fi
    local log rc
    log="$(mktemp "${TMPDIR:-/tmp}/xray-env-setup.XXXXXX")"
    echo "$PROG: setting up the $ENV_KIND environment in ${ENV_DIR#"$ROOT"/} (first use or requirements changed; log: $log) ..." >&2
    # Not `if ! (...)`: errexit is ignored inside a tested command, and a failed step must stop it.
    set +e
    (
        set -e
        create_or_update_env
    ) >"$log" 2>&1
    rc=$?
    set -e
    if ((rc != 0)); then
        tail -n 20 "$log" >&2
        die "environment setup failed; full log: $log (retry with ./wrapper.sh env-setup)"
    fi
    rm -f "$log"
    unlock_setup
    echo "$PROG: environment ready" >&2
}

prepare_exec() {
    ensure_env
    use_env_java
    [[ "${1:-}" == nojava ]] || check_java
    export PATH="$ENV_DIR/bin:$PATH"
    export PYTHONPATH="$ROOT/code${PYTHONPATH:+:$PYTHONPATH}"
    export PYSPARK_PYTHON="$ENV_PY"
    export PYSPARK_DRIVER_PYTHON="$ENV_PY"
}

# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
# Options before the command, for every xray command (python -m xray reads XRAY_CONFIG; after
# the command, --config goes to it as it is).
usage_error() {
    echo "$PROG: $*" >&2
    usage >&2
    exit 2
}

set_config() {
    [[ -n "$1" ]] || usage_error "--config needs a path"
    if [[ "$1" == /* ]]; then
        export XRAY_CONFIG="$1"
    else
        export XRAY_CONFIG="$XRAY_CALLER_CWD/$1"
    fi
}

config_option=0
while (($#)); do
    case "$1" in
        --config)
            (($# >= 2)) || usage_error "--config needs a path"
            set_config "$2"
            shift 2
            ;;
        --config=*)
            set_config "${1#--config=}"
            shift
            ;;
        *) break ;;
    esac
    config_option=1
done

if (($# == 0)); then
    usage >&2
    exit 2
fi

cmd="$1"
shift
if ((config_option)) && [[ "$cmd" =~ ^(env-setup|test)$ ]]; then
    usage_error "--config is for the experiment commands, not '$cmd'"
fi
case "$cmd" in
    -h | --help | help)
        usage
        ;;
    env-setup)
        env_setup "$@"
        ;;
    list)
        prepare_exec nojava
        exec "$ENV_PY" -m xray list "$@"
        ;;
    mlflow-ui)
        prepare_exec nojava
        exec "$ENV_PY" -m xray mlflow-ui "$@"
        ;;
    run | sweep | predict | explain | cluster)
        prepare_exec
        exec "$ENV_PY" -m xray "$cmd" "$@"
        ;;
    test)
        prepare_exec
        exec "$ENV_PY" -m pytest "$@"
        ;;
    *)
        echo "$PROG: unknown command '$cmd'" >&2
        usage >&2
        exit 2
        ;;
esac
