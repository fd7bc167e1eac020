#!/usr/bin/env bash
# Stop the CI Slurm started by start.sh: kill each daemon by the pid it recorded.
set -uo pipefail
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if [[ -s $pidfile ]]; then
        pid=$(cat "$pidfile")
        if kill "$pid" 2>/dev/null; then
            # Wait (up to 10 s) so a following start.sh does not race the old daemon.
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            echo "stop.sh: stopped $(basename "$pidfile" .pid) (pid $pid)"
        fi
        rm -f "$pidfile"
    fi
done
