"""A Python interpreter holding state: a large dict, a file read up to an offset, worker threads
with their own counters, and a signal handler. Same protocol as the C workloads:
    python3 state.py --ready FILE --result FILE
"""
import os
import signal
import sys
import threading
import time
import zlib


def main():
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    ready, result = args["--ready"], args["--result"]
    os.closerange(3, 65536)  # whatever the launcher leaked is not state under test
    here = os.path.dirname(os.path.abspath(ready))

    table = {f"key-{i}": (i * i) % 1000003 for i in range(500_000)}
    digest = zlib.crc32(repr(sorted(table.items())).encode())

    path = os.path.join(here, "py-data.txt")
    with open(path, "w") as f:
        f.write("".join(f"line {i}\n" for i in range(1000)))
    reader = open(path)
    for _ in range(123):
        reader.readline()
    offset = reader.tell()
    os_offset = os.lseek(reader.fileno(), 0, os.SEEK_CUR)  # past the buffered text

    counters = [0] * 4
    stop = threading.Event()

    def work(n):
        local = threading.local()
        local.name = f"worker-{n}"
        while not stop.is_set():
            counters[n] += 1
            assert local.name == f"worker-{n}"
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()

    got = []
    signal.signal(signal.SIGUSR2, lambda sig, frame: got.append(sig))
    tasks_before = len(os.listdir("/proc/self/task"))

    tmp = ready + ".tmp"
    with open(tmp, "w") as f:
        f.write("ready\n")
    os.replace(tmp, ready)

    while not got:
        time.sleep(0.01)

    failures = []
    if zlib.crc32(repr(sorted(table.items())).encode()) != digest:
        failures.append("the dict changed")
    now = os.lseek(reader.fileno(), 0, os.SEEK_CUR)
    if now != os_offset:
        failures.append(f"fd offset {now}, was {os_offset}")
    if reader.tell() != offset:
        failures.append(f"text offset {reader.tell()}, was {offset}")
    if reader.readline() != "line 123\n":
        failures.append("the file reads the wrong line")
    tasks = len(os.listdir("/proc/self/task"))
    if tasks != tasks_before:
        failures.append(f"{tasks} threads, were {tasks_before}")
    before = list(counters)
    time.sleep(0.3)
    for n, t in enumerate(threads):
        if not t.is_alive():
            failures.append(f"thread {n} died")
        elif counters[n] == before[n]:
            failures.append(f"thread {n} does not run")
    stop.set()

    verdict = "PASS\n" if not failures else "FAIL: " + "; ".join(failures) + "\n"
    tmp = result + ".tmp"
    with open(tmp, "w") as f:
        f.write(verdict)
    os.replace(tmp, result)
    sys.exit(0 if not failures else 1)


main()
