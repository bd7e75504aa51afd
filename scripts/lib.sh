# Shared by scripts/up, scripts/down, scripts/test, scripts/bench, scripts/drill and deploy/check.
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
# Partitions of the requests topic: each has its own database ($DB_NAME, ${DB_NAME}_p1, ...) and
# its own fenced writer. Fixed for a store once it has SKUs.
export REQUEST_PARTITIONS="${REQUEST_PARTITIONS:-1}"
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

# --- Apache Kafka -------------------------------------------------------------------------------
# The broker is a pinned Apache Kafka server (scripts/kafka/pom.xml) run as a single-node KRaft
# cluster (combined broker and controller). Its jars come from Maven Central through Maven into a
# cache folder shared by every checkout of this repository; its log lives on disk under
# .run/kafka/data, so a broker restart keeps every topic.
KAFKA_DIR="$ROOT/scripts/kafka"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_DIR/pom.xml")"
KAFKA_CACHE="${KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flash-sequencer}"
# Keyed by the pinned version and the pom's content: editing the pom resolves a new folder.
KAFKA_LIBS="${KAFKA_LIBS:-$KAFKA_CACHE/kafka-$KAFKA_VERSION-$(sha256sum "$KAFKA_DIR/pom.xml" | cut -c1-12)/libs}"
KAFKA_HOME="$RUN_DIR/kafka"
KAFKA_DATA="$KAFKA_HOME/data"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((BROKER_PORT + 1))}"
# G1 with a 20 ms pause goal, as Kafka's own start scripts set it. With G1's defaults the broker's
# young collections took 75-113 ms every ~20 s under a 25k/s sale, and each one stalled every
# append and every fetch: the batch timeline's largest gaps were exactly those pauses. With these
# the pauses stay under ~40 ms (docs/BENCHMARKS.md, "The broker's pauses"). ZGC (no pauses)
# was worse on 2 cores: its concurrent threads take CPU the sale needs.
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms1g -Xmx1g}"
KAFKA_GC_OPTS="${KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35}"
BROKER="${BROKER:-kafka}"
if [ "$BROKER" = tansu ]; then
  # tansu 0.6 holds every fetch for the whole fetch.wait.max.ms and slows down with every record
  # batch in a partition: the settings it was tuned with (README, "Configuration").
  export FETCH_WAIT_MAX_MS="${FETCH_WAIT_MAX_MS:-1}" PRODUCE_LINGER_MS="${PRODUCE_LINGER_MS:-20}"
fi

# Java 17 or newer (Kafka 4.x brokers need 17) and Maven, from Debian when missing.
ensure_java() {
  local major=0
  if command -v java >/dev/null; then
    major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    major="${major%%.*}"
  fi
  if [ "${major:-0}" -lt 17 ]; then
    log "no Java 17+ found: installing Debian's openjdk-17-jre-headless"
    apt_ensure openjdk-17-jre-headless
  fi
  command -v mvn >/dev/null || apt_ensure maven
}

# Resolves the Kafka server's jars into $KAFKA_LIBS once (about 15 s with an empty Maven cache).
ensure_kafka_libs() {
  [ -f "$KAFKA_LIBS/.complete" ] && return 0
  ensure_java
  log "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_LIBS"
  local tmp="$KAFKA_LIBS.tmp.$$" out
  rm -rf "$tmp"; mkdir -p "$(dirname "$KAFKA_LIBS")"
  if ! out="$(mvn -q -B -f "$KAFKA_DIR/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" 2>&1)"; then
    rm -rf "$tmp"
    printf '%s\n' "$out" >&2
    die "could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION with Maven (output above)"
  fi
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null || die "Maven resolved no kafka_2.13 jar into $tmp"
  touch "$tmp/.complete"
  rm -rf "$KAFKA_LIBS"; mv "$tmp" "$KAFKA_LIBS"
}

# --- schemathesis ------------------------------------------------------------------------------
# The API fuzzer of systest/tests/schemathesis.rs, pinned, in a venv in the shared cache folder
# (keyed by the version, so a new pin installs beside the old one). Exports FLASH_SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV="${SCHEMATHESIS_VENV:-$KAFKA_CACHE/schemathesis-$SCHEMATHESIS_VERSION}"
ensure_schemathesis() {
  if [ ! -f "$SCHEMATHESIS_VENV/.complete" ]; then
    command -v python3 >/dev/null || apt_ensure python3
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_ensure python3-venv
    log "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
    # Installed in place (a venv's scripts name their interpreter by absolute path, so it cannot
    # be moved); `.complete` marks a finished install, anything else is started over.
    rm -rf "$SCHEMATHESIS_VENV"; mkdir -p "$(dirname "$SCHEMATHESIS_VENV")"
    python3 -m venv "$SCHEMATHESIS_VENV"
    "$SCHEMATHESIS_VENV/bin/pip" install -q --disable-pip-version-check \
      "schemathesis==$SCHEMATHESIS_VERSION" \
      || die "could not install schemathesis $SCHEMATHESIS_VERSION with pip (output above)"
    touch "$SCHEMATHESIS_VENV/.complete"
  fi
  export FLASH_SCHEMATHESIS="$SCHEMATHESIS_VENV/bin/schemathesis"
}

# --- the browser test ---------------------------------------------------------------------------
# systest/tests/ops_console.rs drives the ops console (/ops) in Debian's chromium, headless, with
# playwright-core from npm (pinned in systest/browser/package.json and package-lock.json).
# playwright never downloads a browser here: it runs Debian's (FLASH_CHROMIUM).
ensure_chromium() {
  export FLASH_CHROMIUM="${FLASH_CHROMIUM:-/usr/bin/chromium}"
  [ -x "$FLASH_CHROMIUM" ] || apt_ensure chromium
  [ -x "$FLASH_CHROMIUM" ] || die "no browser at $FLASH_CHROMIUM after installing Debian's chromium"
}

BROWSER_TEST_DIR="$ROOT/systest/browser"
# node (20 or newer, as playwright-core needs) and `npm ci` in systest/browser, once per lockfile
# (node_modules/.lock-sha256 records the lockfile it was installed from).
ensure_browser_test() {
  export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
  command -v node >/dev/null && command -v npm >/dev/null || apt_ensure nodejs npm
  local major; major="$(node -p 'process.versions.node.split(".")[0]')"
  [ "$major" -ge 20 ] || die "node $(node --version) is too old for playwright-core (20 or newer needed)"
  local want have=""
  want="$(sha256sum "$BROWSER_TEST_DIR/package-lock.json" | cut -c1-64)"
  [ -f "$BROWSER_TEST_DIR/node_modules/.lock-sha256" ] && have="$(cat "$BROWSER_TEST_DIR/node_modules/.lock-sha256")"
  [ "$want" = "$have" ] && [ -f "$BROWSER_TEST_DIR/node_modules/playwright-core/package.json" ] && return 0
  log "installing the browser test's npm packages (npm ci in systest/browser)"
  (cd "$BROWSER_TEST_DIR" && npm ci --no-audit --no-fund --loglevel=error) \
    || die "npm ci in $BROWSER_TEST_DIR failed (output above)"
  printf '%s' "$want" >"$BROWSER_TEST_DIR/node_modules/.lock-sha256"
}

kafka_tool() { java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.yaml" "$@"; }

# Starts Apache Kafka on 127.0.0.1:$BROKER_PORT unless something already answers there. The
# storage directory is formatted once; later starts (and scripts/up run twice) reuse its data.
ensure_kafka() {
  if broker_up; then return 0; fi
  ensure_kafka_libs
  mkdir -p "$KAFKA_HOME"
  sed -e "s|@LOG_DIR@|$KAFKA_DATA|" -e "s|@PORT@|$BROKER_PORT|" \
      -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|" \
      "$KAFKA_DIR/server.properties.in" >"$KAFKA_HOME/server.properties"
  if [ ! -f "$KAFKA_DATA/meta.properties" ]; then
    log "formatting the Kafka storage directory $KAFKA_DATA (once)"
    local cluster_id
    cluster_id="$(kafka_tool kafka.tools.StorageTool random-uuid)"
    kafka_tool kafka.tools.StorageTool format \
      --standalone -t "$cluster_id" -c "$KAFKA_HOME/server.properties" >>"$RUN_DIR/kafka.log" 2>&1 \
      || die "formatting Kafka storage failed; see $RUN_DIR/kafka.log"
  fi
  log "starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$BROKER_PORT (data in $KAFKA_DATA)"
  # A GC log, so that a latency spike can be matched against the broker's pauses.
  nohup java $KAFKA_HEAP_OPTS $KAFKA_GC_OPTS \
    "-Xlog:gc:file=$KAFKA_HOME/gc.log:time,uptime:filecount=3,filesize=10M" \
    -cp "$KAFKA_LIBS/*" \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.yaml" \
    kafka.Kafka "$KAFKA_HOME/server.properties" >>"$RUN_DIR/kafka.log" 2>&1 &
  echo $! >"$RUN_DIR/kafka.pid"
  for _ in $(seq 1 600); do
    broker_up && return 0
    kill -0 "$(cat "$RUN_DIR/kafka.pid")" 2>/dev/null || { tail -n 30 "$RUN_DIR/kafka.log" >&2; die "Kafka exited; see $RUN_DIR/kafka.log"; }
    sleep 0.1
  done
  die "Kafka did not open 127.0.0.1:$BROKER_PORT within 60 s; see $RUN_DIR/kafka.log"
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

redis_up() { (exec 3<>"/dev/tcp/127.0.0.1/6379") 2>/dev/null; }

# Redis for the Redis+Lua baseline of the benchmark only: Debian's redis-server, started without
# persistence (each run's keys are deleted at its end) unless something answers on 6379.
ensure_redis() {
  if redis_up; then return 0; fi
  command -v redis-server >/dev/null || apt_ensure redis-server
  # Debian's package may have started its own service on install.
  for _ in $(seq 1 20); do redis_up && return 0; sleep 0.1; done
  log "starting Redis on 127.0.0.1:6379 (no persistence)"
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes \
    --dir "$RUN_DIR" --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log"
  for _ in $(seq 1 50); do redis_up && return 0; sleep 0.1; done
  die "Redis did not start; see $RUN_DIR/redis.log"
}

# promtool, for deploy/check (the alert rules and scrape config in deploy/prometheus/), from
# Debian's prometheus package. Only the tool is wanted, never the package's server (it would
# listen on :9090 with Debian's own config and keep running): while apt runs, a policy-rc.d
# refuses every service start (one already in place that refuses is kept as it is; one that
# allows is set aside and put back), its Recommends (the node exporter, another server) are left
# out, the service is disabled for the next boot, and a prometheus process that appears anyway
# stops the run.
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  log "installing Debian's prometheus package for promtool (its server is not started)"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  local policy=/usr/sbin/policy-rc.d set_aside="" ours="" verdict=0 rc=0 running_before=0
  pgrep -x prometheus >/dev/null && running_before=1
  if [ -e "$policy" ]; then
    "$policy" prometheus start >/dev/null 2>&1 || verdict=$?
    if [ "$verdict" -ne 101 ]; then set_aside="$policy.flash-sequencer.$$"; $sudo mv "$policy" "$set_aside"; fi
  fi
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/lib.sh ensure_promtool: no service starts while apt runs\nexit 101\n' \
      | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"; ours=1
  fi
  { $sudo apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || rc=$?
  [ -z "$ours" ] || $sudo rm -f "$policy"
  [ -z "$set_aside" ] || $sudo mv "$set_aside" "$policy"
  [ "$rc" -eq 0 ] || die "could not install Debian's prometheus package (apt-get output above)"
  if [ -d /run/systemd/system ]; then
    $sudo systemctl disable prometheus.service >/dev/null 2>&1 || true
  else
    $sudo update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  if [ "$running_before" -eq 0 ] && pgrep -x prometheus >/dev/null; then
    die "installing Debian's prometheus package started a Prometheus server (pid $(pgrep -x prometheus | tr '\n' ' ')); stop it with: service prometheus stop"
  fi
  command -v promtool >/dev/null || die "Debian's prometheus package installed no promtool"
}

# Creates the database of every partition ($1, then $1_p1 ... for REQUEST_PARTITIONS > 1).
ensure_partition_databases() {
  ensure_database "$1"
  local p
  for ((p = 1; p < REQUEST_PARTITIONS; p++)); do ensure_database "${1}_p$p"; done
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

# Starts the broker unless something already answers on the broker port (then it is reused,
# whoever started it): Apache Kafka by default, tansu (memory storage) with BROKER=tansu.
ensure_broker() {
  if broker_up; then return 0; fi
  case "$BROKER" in
    kafka) ensure_kafka ;;
    tansu) ensure_tansu_broker ;;
    *) die "BROKER must be kafka or tansu, not $BROKER" ;;
  esac
}

ensure_tansu_broker() {
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

# Stops the broker these scripts started (never one they found running).
stop_broker() {
  stop_pidfile "$RUN_DIR/kafka.pid" 30
  stop_pidfile "$RUN_DIR/tansu.pid"
}

# Creates the requests topic with REQUEST_PARTITIONS partitions and the outcomes topic with one
# through the Kafka admin API (the sequencer's own create-topics command, which works against any
# Kafka-API broker); existing topics are kept (one with another partition count is an error).
# A broker that has just opened its port may still be electing its controller: retry a while.
ensure_topics() {
  for _ in $(seq 1 30); do
    "$1/sequencer" create-topics --brokers "$KAFKA_BROKERS" \
      --requests-topic "$REQUESTS_TOPIC" --outcomes-topic "$OUTCOMES_TOPIC" >/dev/null 2>&1 && return 0
    sleep 1
  done
  "$1/sequencer" create-topics --brokers "$KAFKA_BROKERS" \
    --requests-topic "$REQUESTS_TOPIC" --outcomes-topic "$OUTCOMES_TOPIC" >/dev/null \
    || die "could not create the topics on $KAFKA_BROKERS"
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
# a standby; one that exits 5, fatal, stays down for an operator), logging to $RUN_DIR/$name.log;
# records the loop's pid in $RUN_DIR/$name.pid.
supervise() {
  local name="$1"; shift
  nohup bash -c '
    trap "kill -TERM \$child 2>/dev/null; wait \$child; exit 0" TERM INT
    while true; do
      "$@" & child=$!; echo $child > "'"$RUN_DIR/$name"'.child"
      wait $child; code=$?
      if [ "$code" -eq 5 ]; then
        # Exit code 5: Postgres and the engine disagree about an invariant. Restarting into the
        # same state would not help; an operator audits first (docs/OPERATIONS.md).
        echo "[supervisor] '"$name"' exited with 5 (FATAL): not restarting; run sequencer audit"
        exit 5
      fi
      echo "[supervisor] '"$name"' exited with $code; restarting in 0.5s"
      sleep 0.5
    done' supervise "$@" >>"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}

# Stops the process in pid file $1: SIGTERM, then SIGKILL after $2 seconds (default 5).
stop_pidfile() {
  local f="$1" secs="${2:-5}"
  [ -f "$f" ] || return 0
  local pid; pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
