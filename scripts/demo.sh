#!/usr/bin/env bash
# Checkpoint a running counter, kill it, restore it from the images and show that it counts on
# from where it was, with the same PID. Needs root and a release build:
#   cargo build --release --workspace && scripts/demo.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/${CKPT_PROFILE:-release}"
for tool in ckpt-dump ckpt-restore ckpt-img counter; do
	if [[ ! -x "$bin/$tool" ]]; then
		echo "demo: $bin/$tool is missing; run: cargo build --release --workspace" >&2
		exit 1
	fi
done
if [[ $(id -u) != 0 ]]; then
	echo "demo: run as root (restoring a PID and rebuilding a process from outside need it)" >&2
	exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-demo.XXXXXX")
log="$work/counter.log"
images="$work/images"
pid=""
restorer=""
cleanup() {
	[[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
	[[ -n "$restorer" ]] && wait "$restorer" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

last_count() { tail -n 1 "$log" | sed -n 's/^count=\([0-9]*\) pid=\([0-9]*\)$/\1/p'; }

# Descriptors this shell inherited (pipes of a terminal multiplexer, an IDE...) would be
# inherited by the counter too, and a pipe cannot be dumped yet: close them. 255 is bash's own.
for fd_path in /proc/$$/fd/*; do
	fd=${fd_path##*/}
	if ((fd > 2 && fd != 255)); then
		eval "exec $fd>&-" 2>/dev/null || true
	fi
done

echo "== starting the counter (prints count=N pid=P every 0.2 s to $log)"
"$bin/counter" >"$log" 2>&1 </dev/null &
pid=$!
sleep 1.5
tail -n 3 "$log"

echo "== ckpt-dump -t $pid -D $images   (the process is killed once its images are written)"
mkdir -p "$images"
# The shell reaps the killed counter (it is its parent) and would announce "Killed": keep
# that announcement out of the demo's output, but not the dumper's messages.
{
	"$bin/ckpt-dump" -t "$pid" -D "$images" -o "$work/dump.log" 2>&3
	wait "$pid" || true
} 3>&2 2>/dev/null
before=$(last_count)
echo "   dumped at count=$before; the counter is gone:"
if kill -0 "$pid" 2>/dev/null; then
	echo "demo: pid $pid still runs after the dump" >&2
	exit 1
fi
sleep 1
echo "   (one second later the log still ends at count=$(last_count))"

echo "== the images ($(du -sh "$images" | cut -f1)):"
"$bin/ckpt-img" show "$images" || true

echo "== ckpt-restore -D $images"
"$bin/ckpt-restore" -D "$images" -o "$work/restore.log" &
restorer=$!
sleep 1.5
tail -n 4 "$log"
after=$(last_count)
new_pid=$(tail -n 1 "$log" | sed -n 's/.* pid=\([0-9]*\)$/\1/p')
if [[ -z "$after" || "$after" -le "$before" ]]; then
	echo "demo: FAILED: the restored counter does not count on (before $before, now ${after:-nothing})" >&2
	cat "$work/restore.log" >&2 || true
	exit 1
fi
if ! grep -q "^count=$((before + 1)) pid=$pid\$" "$log"; then
	echo "demo: FAILED: the log does not continue with count=$((before + 1)) pid=$pid" >&2
	exit 1
fi
if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != counter ]]; then
	echo "demo: FAILED: no counter runs as pid $pid" >&2
	exit 1
fi
echo "== OK: restored as pid $new_pid, counting on from $before to $after"

echo "== stopping it"
kill -TERM "$pid"
wait "$restorer" 2>/dev/null || true
pid=""
restorer=""
