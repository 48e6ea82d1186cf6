#!/bin/bash
# The CPU one `smtpq serve` spends per message, split into user and system time.
#
#   bench/serve_cpu.sh STORAGE SESSIONS N
#
#   STORAGE: memory, a disk queue's sync mode (none | fsync | syncfs | auto), or journal
#
# Starts smtp-sink on 127.0.0.1:2536 and `smtpq serve` (one worker, smarthost to the sink) on
# 127.0.0.1:2535 with the storage given (memory, a journal, or a disk queue with that sync mode), sends N
# messages of 2 KB over SESSIONS sessions with smtp-source, and prints the daemon's user and
# system CPU over the run (from /proc/PID/stat) and its voluntary context switches. Stops what it
# started, by pid. Needs Postfix's smtp-source and smtp-sink (bench/e2e.py --setup).
set -euo pipefail
storage=${1:?storage} sessions=${2:?sessions} n=${3:?messages}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$storage" = memory ]; then
    store='type = "memory"'
elif [ "$storage" = journal ]; then
    store=$(printf 'type = "journal"\npath = "%s/queue"' "$work")
else
    store=$(printf 'type = "disk"\npath = "%s/queue"\nsync = "%s"' "$work" "$storage")
fi
cat > "$work/smtpq.toml" <<TOML
hostname = "smtpq.bench.localdomain"
workers = 1
[edge]
listen = ["127.0.0.1:2535"]
reverse_lookup = false
[storage]
$store
[relay]
type = "smarthost"
host = "127.0.0.1"
port = 2536
TOML
/usr/sbin/smtp-sink -u nobody 127.0.0.1:2536 1000 & sink=$!
"$here/.venv/bin/smtpq" serve -c "$work/smtpq.toml" > "$work/smtpq.log" 2>&1 & daemon=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2535) 2>/dev/null && break; sleep 0.2; done
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$daemon/stat")
t0=$(date +%s.%N)
/usr/sbin/smtp-source -s "$sessions" -l 2048 -m "$n" -f from@example.com -t to@example.net \
    127.0.0.1:2535
t1=$(date +%s.%N)
sleep 1  # the last deliveries
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$daemon/stat")
hz=$(getconf CLK_TCK)
switches=$(awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$daemon/status")
kill "$daemon"; wait "$daemon" || true
kill "$sink"; wait "$sink" 2>/dev/null || true
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" -v n="$n" -v c="$switches" -v st="$storage" \
    -v t0="$t0" -v t1="$t1" \
    'BEGIN { printf "%s: accepted %.0f msgs/s; user %.2f s, system %.2f s, %.2f ms CPU/msg, %d voluntary switches (event loop thread)\n", st, n/(t1-t0), u/hz, s/hz, 1000*(u+s)/hz/n, c }'
