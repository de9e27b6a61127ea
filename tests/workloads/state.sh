#!/bin/bash
# A bash interpreter holding state: variables, an associative array, a file read up to a line,
# a trap. Same protocol as the other workloads: bash state.sh --ready FILE --result FILE
# It waits in a busy loop of builtins: sleep(1) would be a child process.
set -u
# Whatever the launcher leaked (pipes, sockets) is not state under test; 255 is bash's own.
for fd_path in /proc/$$/fd/*; do
	fd=${fd_path##*/}
	if ((fd > 2 && fd != 255)); then
		eval "exec $fd>&-" 2>/dev/null || true
	fi
done
ready=$2
result=$4
dir=$(dirname "$ready")

declare -A table
for ((i = 0; i < 5000; i++)); do
	table["key-$i"]=$((i * i % 1009))
done
counter=0
for ((i = 1; i <= 100; i++)); do
	echo "line $i"
done >"$dir/sh-data.txt"
exec 7<"$dir/sh-data.txt"
for ((i = 1; i <= 42; i++)); do
	read -r -u 7 line
done

got=""
trap 'got=1' USR2
echo ready >"$ready.tmp"
mv "$ready.tmp" "$ready" # an external command, finished and reaped before any dump
while [[ -z $got ]]; do
	counter=$((counter + 1))
done

failures=()
for ((i = 0; i < 5000; i++)); do
	if [[ ${table["key-$i"]} != $((i * i % 1009)) ]]; then
		failures+=("table entry $i changed")
		break
	fi
done
read -r -u 7 line
[[ $line == "line 43" ]] || failures+=("fd 7 reads '$line', expected 'line 43'")
((counter > 0)) || failures+=("the loop never ran")
if ((${#failures[@]} == 0)); then
	echo PASS >"$result.tmp"
else
	echo "FAIL: ${failures[*]}" >"$result.tmp"
fi
# builtins only from here: the result must appear by rename, and mv is external but fine now
mv "$result.tmp" "$result"
