#!/usr/bin/env bash
# local-slurm.sh - a real single-node SLURM cluster on this machine, for ablate's tests.
#
#   scripts/local-slurm.sh up      install what is missing (apt), write the config, start the
#                                  daemons, wait until the node is idle. Idempotent: with the
#                                  cluster already up it only checks and returns (~50 ms).
#   scripts/local-slurm.sh down    stop the daemons that this script started (nothing else).
#   scripts/local-slurm.sh status  exit 0 and print one line if the cluster is up, else exit 1.
#   scripts/local-slurm.sh env     print the `export VAR=...` lines a client needs (none when
#                                  /etc/slurm/slurm.conf is ours, see "Config" below).
#   scripts/local-slurm.sh check   exit 0 if this machine can run the cluster, else exit 3 with
#                                  a one-line reason (for a pytest skip).
#   scripts/local-slurm.sh purge   `down`, then delete the state folder and our /etc link.
#
# What runs (Debian 12 packages: Slurm 22.05, munge, MariaDB 10.11):
#   munged     the system one (/etc/munge/munge.key, /run/munge). Used as-is if it already
#              answers; otherwise started here, as the munge user (munged refuses root).
#   mariadbd   a private instance: data in $STATE/mariadb, 127.0.0.1:$DB_PORT (default 6820),
#              own socket. Never touches a system MariaDB on 3306.
#   slurmdbd   accounting on 127.0.0.1:6819. submitit reads job states only from `sacct`,
#              so without it cancelled/killed jobs are never seen as finished.
#   slurmctld  controller on 6817;  slurmd  the only node, on 6818.
# All run as root (SlurmUser=root) so the state folder needs no chown dance.
#
# State folder: $ABLATE_SLURM_DIR, default /tmp/ablate-slurm:
#   etc/  slurm.conf, slurmdbd.conf (0600), mariadb-init.sql (0600), db password
#   run/  pid files (and the MariaDB socket); log/  one log per daemon + apt.log
#   slurmctld/ (StateSaveLocation), slurmd/ (SlurmdSpoolDir), mariadb/ (datadir)
# Ownership: a daemon whose pid file lies in run/ was started by this script; `down` stops
# exactly those. munged gets run/munged.pid only when this script started it.
#
# Config: Slurm clients find their config through $SLURM_CONF or /etc/slurm/slurm.conf. To
# make sbatch/squeue/sacct/scontrol/srun work for every process (including a job's own
# `scontrol requeue`, and processes that never saw our environment), `up` makes
# /etc/slurm/slurm.conf a symlink to $STATE/etc/slurm.conf - only when that path is free
# (absent, or a dangling symlink). If a foreign slurm.conf is there it is left alone and
# `env` prints `export SLURM_CONF=...`, which clients then need. The daemons are always
# started with SLURM_CONF (slurmdbd finds slurmdbd.conf next to it).
#
# Cluster settings worth knowing: partition `debug` (Default, MaxTime=INFINITE); the node
# advertises max(4, nproc) CPUs (ABLATE_SLURM_CPUS overrides) via
# SlurmdParameters=config_overrides, so ~4 one-CPU jobs run at once on 2 cores; no memory or
# CPU enforcement; AuthInfo=cred_expire=10 + sched_interval=2,bf_interval=2 bring a requeued
# job back in ~15 s (default ~2.5 min); KillWait=5 (submitit ignores SIGTERM, so a requeued
# or cancelled job lingers until the SIGKILL); MinJobAge=3600 keeps finished jobs in squeue/scontrol.
#
# Output: nothing but one line on success; on failure exit 1 with ONE line on stderr naming
# the step or daemon and the reason (usually the last error line of its log).
# Concurrent callers (e.g. pytest-xdist workers) are serialised with flock.
set -Eeuo pipefail

# ----------------------------------------------------------------------------- settings
STATE_DIR=${ABLATE_SLURM_DIR:-/tmp/ablate-slurm}
[[ $STATE_DIR == /* ]] || STATE_DIR=$PWD/$STATE_DIR
STATE_DIR=${STATE_DIR%/}
ETC=$STATE_DIR/etc
RUN=$STATE_DIR/run
LOGS=$STATE_DIR/log
CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
SYSTEM_CONF=/etc/slurm/slurm.conf

CLUSTER=ablate
PARTITION=debug
NODE=${HOSTNAME%%.*}
DB_PORT=${ABLATE_SLURM_DB_PORT:-6820}
DB_SOCK=$RUN/mariadb.sock
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
APT_LOCK_WAIT=${ABLATE_APT_LOCK_WAIT:-600}  # seconds to wait for another apt-get or dpkg to finish

# executable -> Debian package providing it
declare -A NEEDED=(
  [/usr/sbin/munged]=munge
  [/usr/sbin/slurmctld]=slurmctld
  [/usr/sbin/slurmd]=slurmd
  [/usr/sbin/slurmdbd]=slurmdbd
  [/usr/bin/sbatch]=slurm-client
  [/usr/sbin/mariadbd]=mariadb-server-core
  [/usr/bin/mariadb-install-db]=mariadb-server-core
  [/usr/bin/mariadb]=mariadb-client-core
)

# Our own client calls never depend on /etc/slurm or on the caller's SLURM_CONF.
export SLURM_CONF=$CONF

STEP=""      # what `up`/`down` is doing now, for the one-line error message
STEP_LOG=""  # the log whose last error line explains a failure of STEP

# ----------------------------------------------------------------------------- helpers
say() { printf 'local slurm: %s\n' "$*"; }

# Log lines that look like errors but never explain a failure.
LOG_NOISE='\[ERROR\] Aborting$|pmix|MPI: Cannot create context|Trying backup state save|Could not open .* state file|No fed_mgr state|not recommended values'

# The last error-ish line of a log file (or its last line), trimmed.
log_reason() {
  local file=$1 line=""
  [[ -r $file ]] || { printf 'no log at %s' "$file"; return; }
  line=$(grep -aiE 'fatal|error|abort|cannot|can.t|failed|denied|refused|in use' "$file" |
    grep -avE "$LOG_NOISE" | tail -n 1 || true)
  [[ -n $line ]] || line=$(grep -av '^[[:space:]]*$' "$file" | tail -n 1 || true)
  line=${line//$'\r'/}
  printf '%s (%s)' "${line:0:400}" "$file"
}

# die MESSAGE: the one error line, then exit 1. Inside a subshell it exits 86 instead, which
# tells the parent's ERR trap that the line was already printed.
die() {
  trap - ERR
  local msg=$1
  [[ -n $STEP_LOG ]] && msg+=": $(log_reason "$STEP_LOG")"
  printf 'local slurm: %s failed: %s\n' "${STEP:-setup}" "$msg" >&2
  [[ $BASHPID == "$$" ]] || exit 86
  exit 1
}

on_err() {
  local rc=$1 line=$2 cmd=$3
  trap - ERR
  ((rc != 86)) || exit 1                    # a subshell already printed the line
  [[ $BASHPID == "$$" ]] || exit "$rc"      # let the parent report it, once
  die "'$cmd' exited $rc (line $line)"
}
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

now_us() { printf '%s' "${EPOCHREALTIME/./}"; }

# pid_alive PID COMM: the process exists, is not a zombie (PID 1 here may reap late)
# and is named COMM (guards against a recycled pid).
pid_alive() {
  local pid=$1 comm=$2 stat rest name
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # `read`, not `$(<file)`: bash 5.2 under `set -e` exits the whole script, silently, when
  # the file of a `$(<file)` cannot be opened (a stale pid file after a reboot).
  { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
  rest=${stat##*) }
  [[ ${rest%% *} != Z ]] || return 1
  { read -r name <"/proc/$pid/comm"; } 2>/dev/null || return 1
  [[ $name == "$comm" ]]
}

# pidfile_alive FILE COMM: the pid in FILE is a live COMM.
pidfile_alive() {
  local pid
  [[ -r $1 ]] || return 1
  read -r pid <"$1" 2>/dev/null || return 1
  pid_alive "$pid" "$2"
}

# Write CONTENT to FILE (mode MODE) only if it differs; returns 0 if it changed.
write_if_changed() {
  local file=$1 mode=$2 content=$3
  if [[ -f $file ]] && [[ $(<"$file") == "$content" ]]; then
    return 1
  fi
  (umask 077 && printf '%s\n' "$content" >"$file.tmp")
  chmod "$mode" "$file.tmp"
  mv -f "$file.tmp" "$file"
}

# wait_ready NAME SECONDS PIDFILE COMM CHECK...: poll CHECK until it succeeds; fail fast
# if the daemon behind PIDFILE dies (or never writes its pid file).
wait_ready() {
  local name=$1 secs=$2 pidfile=$3 comm=$4
  shift 4
  local start deadline
  start=$(now_us)
  deadline=$((start + secs * 1000000))
  until "$@" >/dev/null 2>&1; do
    if ! pidfile_alive "$pidfile" "$comm"; then
      # give a daemonising process a moment to write its pid file
      if [[ -e $pidfile ]] || (($(now_us) - start > 5000000)); then
        die "$name exited during startup"
      fi
    fi
    (($(now_us) < deadline)) || die "$name not ready after ${secs}s"
    sleep 0.1
  done
}

# port_listening PORT: some process listens on TCP PORT (read from /proc, no connection made,
# so a foreign daemon on that port neither sees us nor answers our readiness probes).
port_listening() {
  local hex f sl local_addr rem st _
  printf -v hex '%04X' "$1"
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r sl local_addr rem st _; do
      [[ $st == 0A && ${local_addr##*:} == "$hex" ]] && return 0
    done <"$f"
  done
  return 1
}

# need_free_port NAME PORT: before starting NAME, make sure nobody else holds its port.
need_free_port() {
  if port_listening "$2"; then
    STEP_LOG=""
    die "port $2 is already in use by another process (a second cluster or a foreign $1?)"
  fi
}

# The node's state and CPU count as sinfo reports them, e.g. "idle 4".
node_state() { sinfo -h -N -n "$NODE" -p "$PARTITION" -o '%T %c' 2>/dev/null | head -n 1; }

node_usable() {
  local state
  state=$(node_state) || return 1
  [[ ${state%% *} =~ ^(idle|mixed|allocated|completing|planned)$ ]]
}

# ----------------------------------------------------------------------------- check
missing_packages() {
  local exe
  local -A pkgs=()
  for exe in "${!NEEDED[@]}"; do
    [[ -x $exe ]] || pkgs[${NEEDED[$exe]}]=1
  done
  ((${#pkgs[@]} == 0)) || printf '%s\n' "${!pkgs[@]}" | sort
}

cmd_check() {
  local missing
  if ((EUID != 0)); then
    say "cannot run here: not root (uid $EUID)" >&2
    exit 3
  fi
  missing=$(missing_packages)
  if [[ -n $missing ]] && ! command -v apt-get >/dev/null; then
    say "cannot run here: no apt-get and missing packages: ${missing//$'\n'/ }" >&2
    exit 3
  fi
  if [[ -n $missing ]]; then
    say "can run here (will apt-get install: ${missing//$'\n'/ })"
  else
    say "can run here (packages installed)"
  fi
}

# ----------------------------------------------------------------------------- install
# apt_get ARGS: apt-get ARGS, waiting up to APT_LOCK_WAIT seconds while another apt-get or dpkg holds
# its lock: dpkg's through apt's own DPkg::Lock::Timeout; the lists lock of `apt-get update`, which apt
# does not wait for, by trying again.
apt_get() {
  local deadline=$((SECONDS + APT_LOCK_WAIT)) rc out
  while :; do
    rc=0
    out=$(apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" 2>&1) || rc=$?
    printf '%s\n' "$out"
    if ((rc == 0)) || ! grep -qE 'Could not get lock|Unable to lock' <<<"$out" || ((SECONDS >= deadline)); then
      return "$rc"
    fi
    sleep 2
  done
}

install_packages() {
  STEP="apt install"
  STEP_LOG=$LOGS/apt.log
  local missing made_policy=0 rc=0
  missing=$(missing_packages)
  [[ -n $missing ]] || return 0
  command -v apt-get >/dev/null || die "no apt-get to install: ${missing//$'\n'/ }"
  # Keep the packages' maintainer scripts from starting services (no systemd here).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  {
    apt_get update -q &&
      apt_get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        $missing
  } >>"$STEP_LOG" 2>&1 || rc=$?
  ((made_policy == 0)) || rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get exited $rc"
  missing=$(missing_packages)
  [[ -z $missing ]] || die "still missing after install: ${missing//$'\n'/ }"
}

# ----------------------------------------------------------------------------- config
node_cpus() {
  local n
  n=$(getconf _NPROCESSORS_ONLN)
  printf '%s' "${ABLATE_SLURM_CPUS:-$((n > 4 ? n : 4))}"
}

node_mem_mb() {
  local key kb _
  while read -r key kb _; do
    [[ $key == MemTotal: ]] && { printf '%s' $((kb / 1024 * 9 / 10)); return; }
  done </proc/meminfo
  printf '1024'
}

db_password() {
  local f=$ETC/db.pass
  if [[ ! -s $f ]]; then
    (umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$f")
  fi
  printf '%s' "$(<"$f")"
}

# Writes the config files; sets CONF_CHANGED=1 if slurm.conf changed.
write_config() {
  STEP="write config"
  STEP_LOG=""
  local cpus mem pass
  cpus=$(node_cpus)
  mem=$(node_mem_mb)
  pass=$(db_password)
  CONF_CHANGED=0

  write_if_changed "$CONF" 644 "# Written by scripts/local-slurm.sh - edits are overwritten by 'up'.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential lifetime: a requeued job may start again only once it has expired.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MinJobAge=3600
# submitit ignores SIGTERM: a requeued/cancelled job dies only at SIGKILL, KillWait later.
KillWait=5
InactiveLimit=0
Waittime=0
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Let the node advertise more CPUs than it has (several one-CPU jobs at once).
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP" && CONF_CHANGED=1

  write_if_changed "$DBD_CONF" 600 "# Written by scripts/local-slurm.sh - edits are overwritten by 'up'.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db" || true

  # Run by mariadbd at every start: the slurmdbd login, idempotently.
  write_if_changed "$ETC/mariadb-init.sql" 600 "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || true

  link_system_conf
}

# /etc/slurm/slurm.conf -> our slurm.conf, unless a foreign config is there.
link_system_conf() {
  STEP="link $SYSTEM_CONF"
  if [[ -L $SYSTEM_CONF ]]; then
    [[ $(readlink "$SYSTEM_CONF") == "$CONF" ]] && return 0
    [[ -e $SYSTEM_CONF ]] && return 0   # points at a live foreign config: keep it
    rm -f "$SYSTEM_CONF"                # dangling (e.g. a purged state folder)
  elif [[ -e $SYSTEM_CONF ]]; then
    return 0                            # a real foreign config: clients need SLURM_CONF
  fi
  mkdir -p "${SYSTEM_CONF%/*}"
  ln -s "$CONF" "$SYSTEM_CONF"
}

system_conf_is_ours() { [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; }

# ----------------------------------------------------------------------------- munged
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  STEP="munged"
  STEP_LOG=/var/log/munge/munged.log
  munge_works && return 0
  if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    runuser -u munge -- mungekey --create >>"$LOGS/munged.start.log" 2>&1 ||
      die "mungekey --create failed"
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  STEP_LOG=$LOGS/munged.start.log
  start-stop-daemon --start --quiet --chuid munge:munge --exec /usr/sbin/munged \
    </dev/null >>"$STEP_LOG" 2>&1 9>&- || die "munged did not start"
  STEP_LOG=/var/log/munge/munged.log
  local pid=""
  [[ -r /run/munge/munged.pid ]] && read -r pid </run/munge/munged.pid
  [[ -n $pid ]] && printf '%s\n' "$pid" >"$RUN/munged.pid"
  wait_ready munged 10 "$RUN/munged.pid" munged munge_works
}

# ----------------------------------------------------------------------------- mariadb
db_query() {
  mariadb --no-defaults --protocol=socket -S "$DB_SOCK" -u root -N -B -e "$1"
}

init_mariadb() {
  local datadir=$STATE_DIR/mariadb
  [[ -e $datadir/.ablate-initialized ]] && return 0
  STEP="mariadb init"
  STEP_LOG=$LOGS/mariadb-install-db.log
  rm -rf "$datadir"
  mkdir -p "$datadir"
  mariadb-install-db --no-defaults --user=root --datadir="$datadir" \
    --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve \
    </dev/null >"$STEP_LOG" 2>&1 9>&- || die "mariadb-install-db failed"
  touch "$datadir/.ablate-initialized"
}

start_mariadb() {
  if pidfile_alive "$RUN/mariadb.pid" mariadbd; then return 0; fi
  init_mariadb
  STEP="mariadb"
  STEP_LOG=$LOGS/mariadb.log
  rm -f "$RUN/mariadb.pid" "$DB_SOCK"
  need_free_port mariadb "$DB_PORT"
  setsid -f /usr/sbin/mariadbd --no-defaults --user=root \
    --datadir="$STATE_DIR/mariadb" --pid-file="$RUN/mariadb.pid" --socket="$DB_SOCK" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --skip-log-bin \
    --log-error="$STEP_LOG" --init-file="$ETC/mariadb-init.sql" \
    --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$STEP_LOG" 2>&1 9>&- || die "mariadbd did not start"
  wait_ready mariadb 60 "$RUN/mariadb.pid" mariadbd db_query 'SELECT 1'
  chmod 644 "$RUN/mariadb.pid"   # mariadbd writes it 0660; let `status` work for any user
}

# ----------------------------------------------------------------------------- slurmdbd
dbd_works() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
  STEP="slurmdbd"
  STEP_LOG=$LOGS/slurmdbd.log
  if ! pidfile_alive "$RUN/slurmdbd.pid" slurmdbd; then
    rm -f "$RUN/slurmdbd.pid"
    need_free_port slurmdbd "$DBD_PORT"
    /usr/sbin/slurmdbd </dev/null >>"$STEP_LOG" 2>&1 9>&- || die "slurmdbd did not start"
  fi
  wait_ready slurmdbd 60 "$RUN/slurmdbd.pid" slurmdbd dbd_works
  STEP="register cluster $CLUSTER"
  local clusters
  clusters=$(dbd_works 2>/dev/null) || die "sacctmgr list cluster failed"
  if [[ $'\n'$clusters$'\n' != *$'\n'$CLUSTER$'\n'* ]]; then
    STEP_LOG=$LOGS/sacctmgr.log
    sacctmgr -i add cluster "$CLUSTER" >>"$STEP_LOG" 2>&1 || die "sacctmgr add cluster failed"
  fi
}

# ----------------------------------------------------------------------------- slurmctld
ctld_works() {
  local out
  out=$(scontrol ping 2>/dev/null) && [[ $out == *'is UP'* ]]
}

start_slurmctld() {
  STEP="slurmctld"
  STEP_LOG=$LOGS/slurmctld.log
  if pidfile_alive "$RUN/slurmctld.pid" slurmctld; then
    if ((CONF_CHANGED)); then
      scontrol reconfigure >/dev/null 2>&1 || die "scontrol reconfigure failed"
    fi
  else
    rm -f "$RUN/slurmctld.pid"
    need_free_port slurmctld "$CTLD_PORT"
    /usr/sbin/slurmctld </dev/null >>"$STEP_LOG" 2>&1 9>&- || die "slurmctld did not start"
  fi
  wait_ready slurmctld 60 "$RUN/slurmctld.pid" slurmctld ctld_works
}

# ----------------------------------------------------------------------------- slurmd
start_slurmd() {
  STEP="slurmd"
  STEP_LOG=$LOGS/slurmd.log
  if ! pidfile_alive "$RUN/slurmd.pid" slurmd; then
    rm -f "$RUN/slurmd.pid"
    need_free_port slurmd "$SLURMD_PORT"
    /usr/sbin/slurmd </dev/null >>"$STEP_LOG" 2>&1 9>&- || die "slurmd did not start"
  fi
  # Wait for the node to register; resume it once if an earlier run left it drained/down.
  local start resumed=0 state
  start=$(now_us)
  until node_usable; do
    pidfile_alive "$RUN/slurmd.pid" slurmd || die "slurmd exited during startup"
    if ((!resumed && $(now_us) - start > 3000000)); then
      state=$(node_state || true)
      if [[ $state =~ (drain|down|fail) && $state != *'*'* ]]; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        resumed=1
      fi
    fi
    if (($(now_us) - start > 60000000)); then
      state=$(node_state || true)
      STEP_LOG=""
      die "node $NODE still '${state%% *}' after 60s: $(scontrol show node "$NODE" 2>&1 | grep -o 'Reason=.*' || echo "see $LOGS/slurmd.log")"
    fi
    sleep 0.1
  done
}

# ----------------------------------------------------------------------------- up/down
# One cheap probe (pid files + one sinfo call): is everything up and the node usable?
# Sets UP_REASON when not.
cluster_up() {
  local d state
  UP_REASON=""
  for d in mariadbd:mariadb slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd; do
    if ! pidfile_alive "$RUN/${d#*:}.pid" "${d%%:*}"; then
      UP_REASON="${d%%:*} not running"
      return 1
    fi
  done
  state=$(node_state) || true
  if [[ ! ${state%% *} =~ ^(idle|mixed|allocated|completing|planned)$ ]]; then
    UP_REASON="node $NODE is '${state%% *}'"
    return 1
  fi
  UP_STATE=$state
}

summary() {
  local cpus=${UP_STATE#* }
  printf 'partition %s, %s cpus' "$PARTITION" "$cpus"
}

take_lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/lock"
  flock -w 900 9 || { STEP="lock"; die "could not lock $STATE_DIR/lock within 900s"; }
}

cmd_up() {
  local t0
  t0=$(now_us)
  ((EUID == 0)) || { STEP="up"; die "must run as root (uid $EUID)"; }
  if cluster_up; then
    say "up ($(summary)) already"
    return 0
  fi
  take_lock
  if cluster_up; then   # another caller brought it up while we waited
    say "up ($(summary)) already"
    return 0
  fi
  mkdir -p "$ETC" "$RUN" "$LOGS" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  chmod 755 "$STATE_DIR" "$ETC"
  install_packages
  write_config
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  cluster_up || { STEP="up"; STEP_LOG=""; die "$UP_REASON"; }
  local dt=$(($(now_us) - t0))
  say "up ($(summary)) in $((dt / 1000000)).$(printf '%01d' $((dt / 100000 % 10))) s"
}

# stop_daemon NAME COMM PIDFILE: TERM, wait up to 30 s, then KILL. Echoes NAME if stopped.
stop_daemon() {
  local name=$1 comm=$2 pidfile=$3 pid i
  if ! pidfile_alive "$pidfile" "$comm"; then
    rm -f "$pidfile"
    return 0
  fi
  read -r pid <"$pidfile"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    pid_alive "$pid" "$comm" || break
    sleep 0.1
  done
  if pid_alive "$pid" "$comm"; then
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$pidfile"
  printf '%s ' "$name"
}

cmd_down() {
  ((EUID == 0)) || { STEP="down"; die "must run as root (uid $EUID)"; }
  if [[ ! -d $RUN ]]; then
    say "down (nothing to stop)"
    return 0
  fi
  take_lock
  STEP="down"
  local stopped=""
  stopped+=$(stop_daemon slurmd slurmd "$RUN/slurmd.pid")
  stopped+=$(stop_daemon slurmctld slurmctld "$RUN/slurmctld.pid")
  stopped+=$(stop_daemon slurmdbd slurmdbd "$RUN/slurmdbd.pid")
  stopped+=$(stop_daemon mariadb mariadbd "$RUN/mariadb.pid")
  stopped+=$(stop_daemon munged munged "$RUN/munged.pid")
  stopped=${stopped% }
  say "down (stopped: ${stopped:-nothing})"
}

cmd_purge() {
  cmd_down
  if system_conf_is_ours; then rm -f "$SYSTEM_CONF"; fi
  rm -rf "$STATE_DIR"
}

cmd_status() {
  if cluster_up; then
    say "up ($(summary), node $NODE ${UP_STATE%% *}, state $STATE_DIR)"
  else
    say "down ($UP_REASON)"
    exit 1
  fi
}

cmd_env() {
  system_conf_is_ours || printf 'export SLURM_CONF=%s\n' "$CONF"
}

usage() {
  printf 'usage: %s {up|down|status|env|check|purge}\n' "${0##*/}" >&2
  exit 2
}

[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0 # sourced (tests/test_local_slurm_script.py): the functions only
case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  check) cmd_check ;;
  purge) cmd_purge ;;
  *) usage ;;
esac
