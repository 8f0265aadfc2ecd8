#!/usr/bin/env bash
# Prepares a fresh Debian machine (as root) for wagg's tests. Idempotent, and
# fast (well under 5 s) when everything is already in place.
#
#   1. the wasm32-wasip2 Rust target (guests are built for it);
#   2. VictoriaMetrics (the OpenTSDB-compatible sink of the end-to-end tests,
#      started per test by wagg-tests; the package does not start it);
#   3. RabbitMQ, running, with the consistent-hash exchange plugin enabled.
set -euo pipefail

step() { printf 'setup: %s\n' "$*"; }

export DEBIAN_FRONTEND=noninteractive
apt_updated=0

# Installs Debian packages; runs `apt-get update` only if the first try fails
# (a fresh machine's package lists may be missing or stale).
apt_install() {
    if ! apt-get install -y -q "$@" >/dev/null 2>&1; then
        if [ "$apt_updated" = 0 ]; then
            step "apt-get update (needed to install $*)"
            apt-get update -q >/dev/null
            apt_updated=1
        fi
        apt-get install -y -q "$@" >/dev/null
    fi
}

# 1. Rust target for the guests.
if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    step "rust target wasm32-wasip2 already installed"
else
    step "installing rust target wasm32-wasip2"
    rustup target add wasm32-wasip2
fi

# 2. VictoriaMetrics.
if [ -x /usr/bin/victoria-metrics ]; then
    step "victoria-metrics already installed"
else
    step "installing victoria-metrics with apt-get"
    apt_install victoria-metrics
fi

# 3. RabbitMQ.
if command -v rabbitmq-server >/dev/null 2>&1; then
    step "rabbitmq-server already installed"
else
    step "installing rabbitmq-server with apt-get"
    apt_install rabbitmq-server
fi

if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    step "rabbitmq already running"
else
    step "starting rabbitmq-server"
    rabbitmq-server -detached
    # await_startup exits 69 until the node has registered with epmd: retry.
    for _ in $(seq 1 60); do
        if rabbitmqctl -q await_startup >/dev/null 2>&1; then
            break
        fi
        sleep 1
    done
    rabbitmqctl -q await_startup >/dev/null
    step "rabbitmq started"
fi

plugin=rabbitmq_consistent_hash_exchange
# `rabbitmq-plugins enable` also writes the enabled-plugins file: reading it is
# the fast path (an Erlang CLI call costs ~2 s); ask the node when in doubt.
plugins_file=${RABBITMQ_ENABLED_PLUGINS_FILE:-/etc/rabbitmq/enabled_plugins}
if grep -qw "$plugin" "$plugins_file" 2>/dev/null \
    || rabbitmq-plugins -q list -e -m "^${plugin}\$" 2>/dev/null | grep -qx "$plugin"; then
    step "rabbitmq plugin $plugin already enabled"
else
    step "enabling rabbitmq plugin $plugin"
    rabbitmq-plugins -q enable "$plugin" >/dev/null
fi

step "done"
