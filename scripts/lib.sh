# Shared by scripts/up, scripts/down, scripts/test, scripts/bench, scripts/drill.
# Every step is idempotent: it checks before it installs or starts anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR"

PGHOST_ADDR="${PGHOST_ADDR:-127.0.0.1}"
PGPORT_NUM="${PGPORT_NUM:-5432}"
PG_SUPERUSER="${PG_SUPERUSER:-postgres}"
DB_NAME="${DB_NAME:-flash}"
export DATABASE_URL="${DATABASE_URL:-postgres://$PG_SUPERUSER@$PGHOST_ADDR:$PGPORT_NUM/$DB_NAME}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export REQUESTS_TOPIC="${REQUESTS_TOPIC:-reservation-requests}"
export OUTCOMES_TOPIC="${OUTCOMES_TOPIC:-reservation-outcomes}"
BROKER_PORT="${KAFKA_BROKERS##*:}"

log() { printf '\033[1m[%s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Debian packages the build needs (librdkafka is built from source by the rdkafka crate).
BUILD_PACKAGES=(build-essential pkg-config cmake libcurl4-openssl-dev libssl-dev zlib1g-dev libzstd-dev curl ca-certificates openssl)

apt_ensure() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_toolchain() {
  apt_ensure "${BUILD_PACKAGES[@]}"
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
}

ensure_tansu() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v tansu >/dev/null; then
    log "installing the tansu broker (cargo install; about 10 minutes, once)"
    cargo install tansu --locked --features dynostore,postgres
  fi
}

pg_up() { pg_isready -q -h "$PGHOST_ADDR" -p "$PGPORT_NUM" 2>/dev/null; }

# Uses the Postgres on 127.0.0.1:5432 when one answers; otherwise starts the machine's cluster,
# or installs Debian's Postgres and creates one with trust auth on loopback.
ensure_postgres() {
  apt_ensure postgresql-client
  if pg_up; then return 0; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "no Postgres reachable and none installed: installing Debian's postgresql"
    apt_ensure postgresql
  fi
  local ver; ver="$(ls /etc/postgresql | sort -V | tail -n1)"
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if ! grep -q "flash-sale: trust loopback" "$hba"; then
    # Local development only: trust connections from this machine's loopback.
    sed -i '1i # flash-sale: trust loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting Postgres $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 50); do pg_up && return 0; sleep 0.2; done
  die "Postgres did not come up on $PGHOST_ADDR:$PGPORT_NUM"
}

# Creates database $1 if it does not exist.
ensure_database() {
  local db="$1"
  if ! psql -h "$PGHOST_ADDR" -p "$PGPORT_NUM" -U "$PG_SUPERUSER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    log "creating database $db"
    psql -h "$PGHOST_ADDR" -p "$PGPORT_NUM" -U "$PG_SUPERUSER" -d postgres -qc "CREATE DATABASE \"$db\""
  fi
}

broker_up() { (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null; }

# Starts tansu (memory storage) unless something already answers on the broker port.
ensure_broker() {
  if broker_up; then return 0; fi
  ensure_tansu
  log "starting tansu on 127.0.0.1:$BROKER_PORT (memory storage: topics are lost when it stops)"
  nohup tansu broker \
    --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --storage-engine memory://tansu/ >"$RUN_DIR/tansu.log" 2>&1 &
  echo $! >"$RUN_DIR/tansu.pid"
  for _ in $(seq 1 100); do broker_up && return 0; sleep 0.1; done
  die "tansu did not start; see $RUN_DIR/tansu.log"
}

# Creates both topics with one partition through the Kafka admin API (the sequencer's own
# create-topics command, which works against any Kafka-API broker); existing topics are kept.
ensure_topics() {
  "$1/sequencer" create-topics --brokers "$KAFKA_BROKERS" \
    --requests-topic "$REQUESTS_TOPIC" --outcomes-topic "$OUTCOMES_TOPIC" >/dev/null
}

# Waits until URL answers 200, or dies after $2 seconds.
wait_http() {
  local url="$1" secs="${2:-60}"
  for _ in $(seq 1 $((secs * 10))); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  die "$url did not become ready within ${secs}s"
}

# Runs "$@" in the background under a restart loop (a crashed or deposed sequencer comes back as
# a standby), logging to $RUN_DIR/$name.log; records the loop's pid in $RUN_DIR/$name.pid.
supervise() {
  local name="$1"; shift
  nohup bash -c '
    trap "kill -TERM \$child 2>/dev/null; wait \$child; exit 0" TERM INT
    while true; do
      "$@" & child=$!; echo $child > "'"$RUN_DIR/$name"'.child"
      wait $child; code=$?
      echo "[supervisor] '"$name"' exited with $code; restarting in 0.5s"
      sleep 0.5
    done' supervise "$@" >>"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}

stop_pidfile() {
  local f="$1"
  [ -f "$f" ] || return 0
  local pid; pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
