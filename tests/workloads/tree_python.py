"""A python3 process tree sharing the objects real programs share between processes:

    python3 tree_python.py --ready FILE --result FILE

root R ── child A (called os.setsid(): leads its own session and group) ── grandchild G

- a pipe from R to A, with bytes R wrote before the dump still in it;
- a stream socketpair between R and A, with bytes queued in both directions;
- shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, created by R before forking): each process
  filled a page of its own before the dump, and G writes one more after the restore, which the
  others must see;
- a FIFO in the scratch directory: R holds the read end, G the write end, with bytes G wrote before
  the dump buffered in it.

Same protocol as the C workloads. After SIGUSR2 (sent to R), R passes it to A and A to G; every
process checks its ids (pid, parent, session, group) and what it holds, data still flows both ways
afterwards, and the children report through their exit status (and a fail-NAME file saying why).
R writes PASS only if all three are intact. Children blocked waiting for the signal give up when
their parent is gone, so that a killed root leaves nothing running for long.
"""
import mmap
import os
import select
import signal
import socket
import sys
import time

PAGE = mmap.PAGESIZE
PIPE_BYTES = 50_000  # under the pipe's 64 KiB, so R's write does not block
R_TO_A = b"R-before-" * 300
A_TO_R = b"A-before-" * 200
FIFO_BYTES = 10_000
DEADLINE = 30.0

# Pages of the shared region: 0 holds flags, then one page per process, then G's post-restore page.
FLAG_A_SET, FLAG_G_SET, FLAG_G_AFTER = 0, 1, 2
PAGE_R, PAGE_A, PAGE_G, PAGE_G_AFTER = 1, 2, 3, 4
SHARED_PAGES = 5


def pattern(tag, length):
    seed = (tag * 2654435761) & 0xFFFFFFFF
    out = bytearray(length)
    for i in range(0, length, 4):
        seed = (seed * 1103515245 + 12345) & 0xFFFFFFFF
        out[i : i + 4] = seed.to_bytes(4, "little")[: length - i]
    return bytes(out)


def fill_page(shm, index, tag):
    shm[index * PAGE : (index + 1) * PAGE] = pattern(tag, PAGE)


def page_ok(shm, index, tag):
    return shm[index * PAGE : (index + 1) * PAGE] == pattern(tag, PAGE)


def read_exact(fd, length, what, failures):
    """Reads LENGTH bytes from FD (blocking or not) within the deadline."""
    data = b""
    end = time.monotonic() + DEADLINE
    while len(data) < length:
        left = end - time.monotonic()
        if left <= 0:
            failures.append(f"{what}: {len(data)} of {length} bytes before the deadline")
            return data
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, length - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            failures.append(f"{what}: end of file after {len(data)} of {length} bytes")
            return data
        data += chunk
    return data


def expect_eof(fd, what, failures):
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            continue
        try:
            extra = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if extra:
            failures.append(f"{what}: {len(extra)} unexpected bytes")
        return
    failures.append(f"{what}: no end of file before the deadline")


def wait_flag(shm, flag, what, failures):
    end = time.monotonic() + DEADLINE
    while shm[flag] != 1:
        if time.monotonic() > end:
            failures.append(f"{what} never appeared in the shared memory")
            return
        time.sleep(0.005)


def wait_usr2(parent):
    """Waits for SIGUSR2 (blocked, so it cannot be lost); None if the parent went away."""
    while True:
        info = signal.sigtimedwait([signal.SIGUSR2], 1.0)
        # Not just "not None": when the wait is interrupted (a dump stops the process) and the
        # timeout has passed by the time it resumes, CPython returns a siginfo it never filled.
        if info is not None and info.si_signo == signal.SIGUSR2:
            return True
        if parent is not None and os.getppid() != parent:
            print(
                f"pid {os.getpid()}: parent {parent} is gone (parent now {os.getppid()}); giving up",
                file=sys.stderr,
                flush=True,
            )
            return None


def check_ids(failures, pid, ppid, sid, pgid):
    got = (os.getpid(), os.getppid(), os.getsid(0), os.getpgid(0))
    want = (pid, ppid, sid, pgid)
    if got != want:
        failures.append(f"pid/ppid/sid/pgid {got}, were {want}")


def check_pages(shm, failures):
    for index, tag in ((PAGE_R, 1), (PAGE_A, 2), (PAGE_G, 3)):
        if not page_ok(shm, index, tag):
            failures.append(f"shared page {index} changed")


def report_child(name, here, status, failures):
    """Exit status of a child, with its own account of what went wrong."""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return
    why = ""
    try:
        with open(os.path.join(here, f"fail-{name}")) as f:
            why = f.read().strip()
    except OSError:
        pass
    failures.append(f"{name} ended with status {status:#x}: {why or 'no report'}")


def child_exit(name, here, failures):
    if failures:
        with open(os.path.join(here, f"fail-{name}"), "w") as f:
            f.write("; ".join(failures))
    os._exit(1 if failures else 0)


def grandchild(here, shm, fifo_path, a_pid):
    failures = []
    fifo_w = os.open(fifo_path, os.O_WRONLY)
    os.write(fifo_w, pattern(4, FIFO_BYTES))  # before the flag: R waits for the flag
    fill_page(shm, PAGE_G, 3)
    shm[FLAG_G_SET] = 1
    me = os.getpid()
    if wait_usr2(a_pid) is None:
        os._exit(2)
    check_ids(failures, me, a_pid, a_pid, a_pid)
    check_pages(shm, failures)
    fill_page(shm, PAGE_G_AFTER, 5)
    shm[FLAG_G_AFTER] = 1
    os.write(fifo_w, b"G-after")
    os.close(fifo_w)
    child_exit("G", here, failures)


def child(here, shm, fifo_path, r_pid, pipe_r, sock):
    failures = []
    os.setsid()
    me = os.getpid()
    g_pid = os.fork()
    if g_pid == 0:
        os.close(pipe_r)
        sock.close()
        grandchild(here, shm, fifo_path, me)
    sock.sendall(A_TO_R)
    fill_page(shm, PAGE_A, 2)
    shm[FLAG_A_SET] = 1
    if wait_usr2(r_pid) is None:
        os.kill(g_pid, signal.SIGKILL)
        os.waitpid(g_pid, 0)
        os._exit(2)
    os.kill(g_pid, signal.SIGUSR2)
    check_ids(failures, me, r_pid, me, me)
    data = read_exact(sock.fileno(), len(R_TO_A), "socketpair R->A", failures)
    if data != R_TO_A and len(data) == len(R_TO_A):
        failures.append("socketpair R->A: queued bytes differ")
    sock.sendall(b"A-after")
    if read_exact(sock.fileno(), 7, "socketpair R->A after restore", failures) != b"R-after":
        failures.append("socketpair R->A after restore: wrong bytes")
    data = read_exact(pipe_r, PIPE_BYTES, "pipe R->A", failures)
    if len(data) == PIPE_BYTES and data != pattern(6, PIPE_BYTES):
        failures.append("pipe R->A: buffered bytes differ")
    expect_eof(pipe_r, "pipe R->A", failures)
    check_pages(shm, failures)
    _, status = os.waitpid(g_pid, 0)
    report_child("G", here, status, failures)
    if shm[FLAG_G_AFTER] != 1 or not page_ok(shm, PAGE_G_AFTER, 5):
        failures.append("G's write after the restore is not seen by A")
    child_exit("A", here, failures)


def main():
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    ready, result = args["--ready"], args["--result"]
    os.closerange(3, 65536)  # whatever the launcher leaked is not state under test
    here = os.path.dirname(os.path.abspath(ready))
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])

    shm = mmap.mmap(-1, SHARED_PAGES * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    fill_page(shm, PAGE_R, 1)
    pipe_r, pipe_w = os.pipe()
    sock_r, sock_a = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fifo_path = os.path.join(here, "tree.fifo")
    os.mkfifo(fifo_path, 0o600)
    # A reader first, so that G's open for writing does not block.
    fifo_r = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)

    me = os.getpid()
    sid, pgid = os.getsid(0), os.getpgid(0)
    a_pid = os.fork()
    if a_pid == 0:
        os.close(pipe_w)
        os.close(fifo_r)
        sock_r.close()
        child(here, shm, fifo_path, me, pipe_r, sock_a)
    os.close(pipe_r)
    sock_a.close()

    os.write(pipe_w, pattern(6, PIPE_BYTES))
    sock_r.sendall(R_TO_A)
    setup = []
    wait_flag(shm, FLAG_A_SET, "A's setup", setup)
    wait_flag(shm, FLAG_G_SET, "G's setup", setup)
    if setup:
        print("setup failed: " + "; ".join(setup), file=sys.stderr)
        os.kill(a_pid, signal.SIGKILL)
        os.waitpid(a_pid, 0)
        sys.exit(2)

    tmp = ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"ready root={me} child={a_pid}\n")
    os.replace(tmp, ready)

    wait_usr2(None)
    failures = []
    os.kill(a_pid, signal.SIGUSR2)
    os.close(pipe_w)
    check_ids(failures, me, os.getppid(), sid, pgid)
    data = read_exact(sock_r.fileno(), len(A_TO_R), "socketpair A->R", failures)
    if len(data) == len(A_TO_R) and data != A_TO_R:
        failures.append("socketpair A->R: queued bytes differ")
    sock_r.sendall(b"R-after")
    if read_exact(sock_r.fileno(), 7, "socketpair A->R after restore", failures) != b"A-after":
        failures.append("socketpair A->R after restore: wrong bytes")
    data = read_exact(fifo_r, FIFO_BYTES, "FIFO G->R", failures)
    if len(data) == FIFO_BYTES and data != pattern(4, FIFO_BYTES):
        failures.append("FIFO G->R: buffered bytes differ")
    if read_exact(fifo_r, 7, "FIFO G->R after restore", failures) != b"G-after":
        failures.append("FIFO G->R after restore: wrong bytes")
    check_pages(shm, failures)
    _, status = os.waitpid(a_pid, 0)
    report_child("A", here, status, failures)
    expect_eof(fifo_r, "FIFO G->R once G is gone", failures)
    if shm[FLAG_G_AFTER] != 1 or not page_ok(shm, PAGE_G_AFTER, 5):
        failures.append("G's write after the restore is not seen by R")

    verdict = "PASS\n" if not failures else "FAIL: " + "; ".join(failures) + "\n"
    tmp = result + ".tmp"
    with open(tmp, "w") as f:
        f.write(verdict)
    os.replace(tmp, result)
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
