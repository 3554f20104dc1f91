# Helpers shared by the service scripts (sourced, not run): messages, ports, pid files.
# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
SERVICES_ROOT="${CHATPROOF_SERVICES_DIR:-/tmp/chatproof-services}"

# Progress goes to stderr so that a script's stdout carries only its result (an address).
say() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }

# True when something on 127.0.0.1 accepts TCP connections on port $1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints the pid in pid file $1 when that process is alive and its command line
# contains $2 (so a recycled pid is never taken for ours); prints nothing otherwise.
live_pid() {
  local pid_file="$1" pattern="$2" pid
  [[ -f "$pid_file" ]] || return 0
  pid="$(<"$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  [[ -r "/proc/$pid/cmdline" ]] || return 0
  if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern"; then
    printf '%s\n' "$pid"
  fi
}

# Sends TERM to pid $1, waits up to $2 seconds for it to exit, then sends KILL.
stop_pid() {
  local pid="$1" wait_s_max="$2" waited_ds=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited_ds >= wait_s_max * 10)); then
      say "pid $pid still alive after ${wait_s_max}s; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      return 0
    fi
    sleep 0.1
    waited_ds=$((waited_ds + 1))
  done
}

# Fails with a clear message when 127.0.0.1:$1 (named $2) is taken by another process.
require_port_free() {
  if port_open "$1"; then
    die "port $1 ($2) is already in use by another process"
  fi
}

# The `stop` subcommand: says what it stops, then calls the script's own
# `stop_quietly` (which knows what to delete). Needs PID_FILE and PID_PATTERN.
stop() {
  if [[ -n "$(live_pid "$PID_FILE" "$PID_PATTERN")" ]]; then
    say "stopping pid $(<"$PID_FILE")"
  else
    say "not running"
  fi
  stop_quietly
}

# Installs Debian package $1 with apt-get (as root, or through sudo). A fresh machine may
# have no package lists yet: the lists are updated only when the first try fails.
apt_install() {
  local package="$1" sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || die "$package is not installed, and installing it needs root or sudo"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null || die "$package is not installed and apt-get is not available to install it"
  say "installing the Debian package $package"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -q "$package" >&2; then
    "${sudo[@]}" apt-get update -q >&2 || die "apt-get update failed"
    "${sudo[@]}" apt-get install -y -q "$package" >&2 || die "apt-get could not install $package"
  fi
}
