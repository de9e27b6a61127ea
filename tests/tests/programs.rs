//! Real programs no one here wrote, dumped and restored as whole trees with `ckpt-dump -t` and
//! `ckpt-restore -d`: redis-server loaded with data (threads, epoll, a listening TCP socket,
//! pipes), a bash pipeline with data in flight in its pipe, and a python3 tree sharing a pipe,
//! a socketpair, shared anonymous memory and a FIFO between a session leader child and a
//! grandchild.
//!
//! The tree's processes are ours to kill and reap: the test process is a child subreaper, so
//! whatever is orphaned in a tree (when the dump kills it, or when the test ends) becomes our
//! child, and is reaped by its exact pid. A pid is only ever signalled while it cannot have been
//! reused: our own unreaped child, or a process whose parent is stopped, or one whose start
//! time still matches the one recorded.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_tests::{
    become_subreaper, check_images, proc_state, run_tool, workload_path, ToolRun, Tools,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long a tree may take to set itself up, or to finish after the restore.
const SETTLE: Duration = Duration::from_secs(60);

/// A program on `PATH` (or in the usual system directories), if installed.
fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses):
/// index 0 is the state (field 3 of proc(5)).
fn stat_fields(pid: Pid) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Start time (field 22), which tells a process from a later one with the same pid.
fn start_time(pid: Pid) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn comm(pid: Pid) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// Children of every thread of `pid`.
fn children(pid: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    out
}

/// One process of a tree, as seen at one moment.
#[derive(Debug, Clone, Copy)]
struct Member {
    pid: Pid,
    start: u64,
}

/// `root` and every process below it, parents before children.
fn walk(root: Pid) -> Vec<Member> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut next = vec![root];
    while !next.is_empty() {
        let mut below = Vec::new();
        for pid in next {
            if !seen.insert(pid) {
                continue;
            }
            if let Some(start) = start_time(pid) {
                out.push(Member { pid, start });
                below.extend(children(pid));
            }
        }
        next = below;
    }
    out
}

/// Waits until `pid` is stopped (or gone, or a zombie), for up to `limit`.
fn wait_stopped(pid: Pid, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        match proc_state(pid) {
            None | Some('T' | 't' | 'Z' | 'X') => return,
            Some(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Reaps every member, in tree order: each becomes our child once its parent is gone (we are a
/// subreaper). A member that is no longer there with its start time was reaped by its own
/// parent. Returns the members still not reaped after `limit`.
fn reap(members: &[Member], limit: Duration) -> Vec<Pid> {
    let start = Instant::now();
    let mut left = Vec::new();
    for m in members {
        loop {
            if start_time(m.pid) != Some(m.start) {
                break;
            }
            match waitpid(m.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
                Ok(_) | Err(Errno::ECHILD) | Err(Errno::EINTR) => {}
                Err(e) => {
                    // Not a panic: this also runs in Drop, maybe while unwinding.
                    eprintln!("waitpid({}): {e}", m.pid);
                    left.push(m.pid);
                    break;
                }
            }
            if start.elapsed() > limit {
                left.push(m.pid);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    left
}

/// A process tree under test, started by the test, with its scratch directory. Dropping it
/// kills and reaps whatever is left of the tree.
struct Tree {
    name: String,
    root: Pid,
    /// Whether `root` is our unreaped child.
    ours: bool,
    dir: tempfile::TempDir,
    tools: Tools,
    dumps: usize,
}

impl Tree {
    /// Starts `program` with the arguments `args` makes from the scratch directory, which is
    /// also its working directory; stdin on /dev/null, stdout and stderr in files there, and
    /// no other descriptor (`tree_exec` closes what the test runner leaked): nothing of the
    /// harness's.
    fn start(name: &str, program: &Path, args: impl FnOnce(&Path) -> Vec<String>) -> Tree {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the end-to-end tests need root: ptrace, clone3 with set_tid"
        );
        become_subreaper();
        let tools = Tools::locate();
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-{name}-"))
            .tempdir()
            .expect("create a temp dir");
        let stdout = fs::File::create(dir.path().join("stdout.log")).expect("create stdout.log");
        let stderr = fs::File::create(dir.path().join("stderr.log")).expect("create stderr.log");
        // Reaped by pid, never through `Child`: the restored root has the same pid and no
        // `Child`.
        #[allow(clippy::zombie_processes)]
        let child = Command::new(workload_path("tree_exec"))
            .arg(program)
            .args(args(dir.path()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Tree {
            name: name.to_owned(),
            root: Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32")),
            ours: true,
            dir,
            tools,
            dumps: 0,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The processes of the tree now, root first.
    fn members(&self) -> Vec<Member> {
        walk(self.root)
    }

    /// Reaps the root if it has ended; its status then.
    fn try_reap_root(&mut self) -> Option<WaitStatus> {
        if !self.ours {
            return None;
        }
        match waitpid(self.root, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive | WaitStatus::Stopped(..) | WaitStatus::Continued(_)) => None,
            Ok(status) => {
                self.ours = false;
                Some(status)
            }
            Err(e) => {
                // ECHILD: someone else reaped it; anything else: nothing more we can do (and
                // this runs in Drop too, maybe while unwinding).
                if e != Errno::ECHILD {
                    eprintln!("waitpid({}): {e}", self.root);
                }
                self.ours = false;
                Some(WaitStatus::StillAlive)
            }
        }
    }

    /// Waits for the root to end (and reaps it), for up to `limit`.
    fn wait_root(&mut self, limit: Duration) -> Option<WaitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.try_reap_root() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Waits until `file` exists (the tree's own signal that it is set up).
    fn wait_file(&mut self, file: &Path) {
        let start = Instant::now();
        while !file.exists() {
            if let Some(status) = self.try_reap_root() {
                if file.exists() {
                    // Written just before the root ended.
                    return;
                }
                panic!(
                    "{} ended before writing {} ({status:?}){}",
                    self.name,
                    file.display(),
                    self.logs()
                );
            }
            assert!(
                start.elapsed() < SETTLE,
                "{} did not write {} within {SETTLE:?}{}",
                self.name,
                file.display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `ckpt-dump -t ROOT` (which kills the tree), every process reaped, and the images checked.
    fn dump(&mut self) -> PathBuf {
        self.dumps += 1;
        let images = self.dir().join(format!("images-{}", self.dumps));
        fs::create_dir(&images).expect("create the images dir");
        let members = self.members();
        let args = vec![
            "-t".to_owned(),
            self.root.to_string(),
            "-D".to_owned(),
            images.display().to_string(),
            "-v4".to_owned(),
            "-o".to_owned(),
            images.with_extension("dump.log").display().to_string(),
        ];
        let run = run_tool(&self.tools.dump, &args, &[]);
        assert!(
            run.success(),
            "dump of {} failed: {}{}",
            self.name,
            describe(&run),
            self.logs()
        );
        // The dump killed every process: the root is our child, the others become ours as
        // their parents die.
        let status = self.wait_root(Duration::from_secs(10));
        assert!(
            status.is_some(),
            "ckpt-dump returned but {} (pid {}) still runs",
            self.name,
            self.root
        );
        let left = reap(
            members.get(1..).unwrap_or_default(),
            Duration::from_secs(10),
        );
        assert!(
            left.is_empty(),
            "processes {left:?} of {} still exist after the dump{}",
            self.name,
            self.logs()
        );
        check_images(&self.tools, &images);
        images
    }

    /// `ckpt-restore -d`: the tree is back, its root at its pid and our child.
    fn restore(&mut self, images: &Path) -> ToolRun {
        let args = vec![
            "-D".to_owned(),
            images.display().to_string(),
            "-d".to_owned(),
            "-v4".to_owned(),
            "-o".to_owned(),
            images.with_extension("restore.log").display().to_string(),
        ];
        let run = run_tool(&self.tools.restore, &args, &[]);
        if proc_state(self.root).is_some() {
            // Whatever came back is our child now: own it before asserting, so that Drop
            // cleans it up on failure.
            self.ours = true;
        }
        assert!(
            run.success(),
            "restore of {} failed: {}{}",
            self.name,
            describe(&run),
            self.logs()
        );
        assert!(
            proc_state(self.root).is_some_and(|s| s != 'Z' && s != 'X'),
            "ckpt-restore succeeded but {} (pid {}) does not run{}",
            self.name,
            self.root,
            self.logs()
        );
        let ppid = stat_fields(self.root).and_then(|f| f.get(1).cloned());
        assert_eq!(
            ppid.as_deref(),
            Some(std::process::id().to_string().as_str()),
            "the restored root is not our child (are we a subreaper?)"
        );
        run
    }

    /// Stops the tree from the root down (a stopped parent reaps nothing, so the pids read
    /// below it stay valid), kills every process and reaps them all.
    fn kill_all(&mut self) {
        if !self.ours {
            return;
        }
        let mut members = Vec::new();
        let mut seen = HashSet::new();
        let mut next = vec![self.root];
        while !next.is_empty() {
            let mut below = Vec::new();
            for pid in next {
                if !seen.insert(pid) {
                    continue;
                }
                let Some(start) = start_time(pid) else {
                    continue;
                };
                let _ = kill(pid, Signal::SIGSTOP);
                wait_stopped(pid, Duration::from_secs(2));
                members.push(Member { pid, start });
                below.extend(children(pid));
            }
            next = below;
        }
        for m in &members {
            if start_time(m.pid) == Some(m.start) {
                let _ = kill(m.pid, Signal::SIGKILL);
            }
        }
        let _ = self.wait_root(Duration::from_secs(10));
        let left = reap(
            members.get(1..).unwrap_or_default(),
            Duration::from_secs(10),
        );
        if !left.is_empty() {
            eprintln!("{}: processes {left:?} were not reaped", self.name);
        }
    }

    /// Stderr and stdout of the tree and the tools' logs, for failure messages: each log's
    /// warnings and errors, then its last lines.
    fn logs(&self) -> String {
        let mut text = String::new();
        let mut add = |label: &str, path: &Path| {
            let Ok(content) = fs::read_to_string(path) else {
                return;
            };
            text.push_str(&format!("\n--- {label} ({}) ---\n", path.display()));
            let lines: Vec<&str> = content.lines().collect();
            let tail_from = lines.len().saturating_sub(15);
            let notable = lines[..tail_from]
                .iter()
                .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                .take(20);
            for line in notable
                .chain(["..."].iter())
                .chain(lines[tail_from..].iter())
            {
                text.push_str(line);
                text.push('\n');
            }
        };
        add("stderr", &self.dir().join("stderr.log"));
        add("stdout", &self.dir().join("stdout.log"));
        for n in 1..=self.dumps {
            let images = self.dir().join(format!("images-{n}"));
            add("dump log", &images.with_extension("dump.log"));
            add("restore log", &images.with_extension("restore.log"));
        }
        text
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn describe(run: &ToolRun) -> String {
    format!(
        "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        run.command, run.status, run.stdout, run.stderr
    )
}

// ---------------------------------------------------------------------------------------------
// redis-server

/// A reply of the Redis protocol (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// A minimal Redis client: commands as arrays of bulk strings, pipelined. Every call fails
/// (instead of panicking) so that the test can say what the tree's logs hold.
struct Redis {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

fn protocol_error(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl Redis {
    fn connect(port: u16, limit: Duration) -> std::io::Result<Redis> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let start = Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > limit => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Redis {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
        })
    }

    fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let w = &mut self.writer;
        write!(w, "*{}\r\n", args.len())?;
        for arg in args {
            write!(w, "${}\r\n", arg.len())?;
            w.write_all(arg)?;
            w.write_all(b"\r\n")?;
        }
        Ok(())
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        match line.strip_suffix("\r\n") {
            Some(text) => Ok(text.to_owned()),
            None => Err(protocol_error(format!(
                "redis closed the connection or sent {line:?}"
            ))),
        }
    }

    fn reply(&mut self) -> std::io::Result<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        let number = || -> std::io::Result<i64> {
            rest.parse()
                .map_err(|_| protocol_error(format!("bad number in redis reply {line:?}")))
        };
        Ok(match kind {
            "+" => Reply::Status(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(number()?),
            "$" => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(Reply::Bulk(None));
                };
                let mut data = vec![0; len + 2];
                self.reader.read_exact(&mut data)?;
                data.truncate(len);
                Reply::Bulk(Some(data))
            }
            "*" => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(Reply::Array(None));
                };
                let items = (0..len)
                    .map(|_| self.reply())
                    .collect::<std::io::Result<Vec<Reply>>>()?;
                Reply::Array(Some(items))
            }
            _ => return Err(protocol_error(format!("unexpected redis reply {line:?}"))),
        })
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        self.send(args)?;
        self.writer.flush()?;
        self.reply()
    }

    /// Sends every command, then reads every reply; none may be an error.
    fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> std::io::Result<()> {
        for command in commands {
            let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
            self.send(&args)?;
        }
        self.writer.flush()?;
        for command in commands {
            if let Reply::Error(e) = self.reply()? {
                let name = String::from_utf8_lossy(&command[0]).into_owned();
                return Err(protocol_error(format!("redis refused {name}: {e}")));
            }
        }
        Ok(())
    }

    fn dbsize(&mut self) -> std::io::Result<i64> {
        match self.call(&[b"DBSIZE"])? {
            Reply::Int(n) => Ok(n),
            other => Err(protocol_error(format!("DBSIZE answered {other:?}"))),
        }
    }

    fn digest(&mut self) -> std::io::Result<String> {
        match self.call(&[b"DEBUG", b"DIGEST"])? {
            Reply::Status(d) => Ok(d),
            Reply::Bulk(Some(d)) => Ok(String::from_utf8_lossy(&d).into_owned()),
            other => Err(protocol_error(format!("DEBUG DIGEST answered {other:?}"))),
        }
    }
}

fn cmd(parts: &[&str]) -> Vec<Vec<u8>> {
    parts.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// A few thousand keys of every common type, some with a time to live, and one large value.
fn redis_data() -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for i in 0..2000 {
        let value = format!("value-{i}-{}", "x".repeat(i % 97));
        out.push(cmd(&["SET", &format!("str:{i}"), &value]));
    }
    for i in 0..300 {
        let key = format!("hash:{i}");
        let mut c = vec!["HSET".to_owned(), key];
        for f in 0..10 {
            c.push(format!("field{f}"));
            c.push(format!("{}", i * 31 + f));
        }
        out.push(c.into_iter().map(String::into_bytes).collect());
        let key = format!("list:{i}");
        let mut c = vec!["RPUSH".to_owned(), key];
        c.extend((0..20).map(|e| format!("item-{i}-{e}")));
        out.push(c.into_iter().map(String::into_bytes).collect());
        let key = format!("set:{i}");
        let mut c = vec!["SADD".to_owned(), key];
        c.extend((0..15).map(|e| format!("member-{}", (i * 7 + e) % 50)));
        out.push(c.into_iter().map(String::into_bytes).collect());
        let key = format!("zset:{i}");
        let mut c = vec!["ZADD".to_owned(), key];
        for e in 0..10 {
            c.push(format!("{}.5", i + e));
            c.push(format!("z-{e}"));
        }
        out.push(c.into_iter().map(String::into_bytes).collect());
    }
    for i in (0..2000).step_by(20) {
        out.push(cmd(&["EXPIRE", &format!("str:{i}"), "86400"]));
    }
    let big: String = (0..(1 << 20))
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    out.push(cmd(&["SET", "big", &big]));
    out
}

/// Waits until no connection to `port` is open on the server side (ESTABLISHED or CLOSE_WAIT
/// in /proc/net/tcp): the server has closed every client's socket, so the dump sees only its
/// listener.
fn wait_no_connections(port: u16) {
    let start = Instant::now();
    let local = format!(":{port:04X}");
    loop {
        let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let open = table.lines().skip(1).any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && (f[3] == "01" || f[3] == "08")
        });
        if !open {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "redis keeps a client connection open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn redis_server_loaded_with_data_survives() {
    let Some(redis) = program("redis-server") else {
        eprintln!("note: redis-server is not installed; skipping");
        return;
    };
    let port = ckpt_tests::free_port();
    let mut tree = Tree::start("redis", &redis, |dir| {
        [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--enable-debug-command",
            "yes",
            "--dir",
            &dir.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    });
    let (keys, digest) = {
        let mut client = Redis::connect(port, SETTLE)
            .unwrap_or_else(|e| panic!("redis does not accept connections: {e}{}", tree.logs()));
        let loaded = (|| -> std::io::Result<(Reply, i64, String)> {
            let pong = client.call(&[b"PING"])?;
            client.pipeline(&redis_data())?;
            Ok((pong, client.dbsize()?, client.digest()?))
        })();
        let (pong, keys, digest) =
            loaded.unwrap_or_else(|e| panic!("loading redis: {e}{}", tree.logs()));
        assert_eq!(pong, Reply::Status("PONG".into()));
        assert_eq!(keys, 3201, "keys loaded into redis");
        assert!(
            digest.len() == 40 && digest.chars().any(|c| c != '0'),
            "DEBUG DIGEST of the loaded data: {digest:?}"
        );
        (keys, digest)
    };
    wait_no_connections(port);
    let threads = fs::read_dir(format!("/proc/{}/task", tree.root))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        threads > 1,
        "redis-server runs {threads} thread(s): expected its helper threads"
    );

    let images = tree.dump();
    tree.restore(&images);

    let checked = (|| -> std::io::Result<[(Reply, Reply); 5]> {
        let mut client = Redis::connect(port, Duration::from_secs(10))?;
        let value = format!("value-1999-{}", "x".repeat(1999 % 97)).into_bytes();
        Ok([
            (Reply::Int(client.dbsize()?), Reply::Int(keys)),
            (
                Reply::Status(client.digest()?),
                Reply::Status(digest.clone()),
            ),
            (
                client.call(&[b"SET", b"after-restore", b"still writable"])?,
                Reply::Status("OK".into()),
            ),
            (
                client.call(&[b"GET", b"after-restore"])?,
                Reply::Bulk(Some(b"still writable".to_vec())),
            ),
            (
                client.call(&[b"GET", b"str:1999"])?,
                Reply::Bulk(Some(value)),
            ),
        ])
    })();
    let checked = checked.unwrap_or_else(|e| {
        panic!(
            "the restored redis does not answer: {e}{}{}",
            threads_of(tree.root),
            tree.logs()
        )
    });
    // DBSIZE, DEBUG DIGEST, SET, GET of the new key, GET of a loaded one.
    for (n, (got, want)) in checked.into_iter().enumerate() {
        assert_eq!(got, want, "answer {n} of the restored redis{}", tree.logs());
    }
}

/// Where each thread of `pid` waits (state, kernel function, system call), for failure messages.
fn threads_of(pid: Pid) -> String {
    let mut text = format!("\n--- threads of {pid} (state, wchan, syscall) ---\n");
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |name: &str| {
            fs::read_to_string(task.path().join(name))
                .unwrap_or_default()
                .trim_end()
                .to_owned()
        };
        let state = stat_fields(Pid::from_raw(
            task.file_name().to_string_lossy().parse().unwrap_or(0),
        ))
        .and_then(|f| f.first().cloned())
        .unwrap_or_default();
        text.push_str(&format!(
            "{} {state} {} {}\n",
            task.file_name().to_string_lossy(),
            read("wchan"),
            read("syscall")
        ));
    }
    text
}

// ---------------------------------------------------------------------------------------------
// bash pipeline

/// Waits until `seq` is blocked writing into the full pipe while the reader still sleeps (the
/// subshell has exec'd `sleep`, and `wc` has not started): the moment to dump. Returns seq's pid.
fn wait_pipe_full(tree: &mut Tree) -> Pid {
    let start = Instant::now();
    loop {
        let mut seq = None;
        let mut sleeping = false;
        for m in tree.members() {
            match comm(m.pid).as_str() {
                "seq" => {
                    let wchan =
                        fs::read_to_string(format!("/proc/{}/wchan", m.pid)).unwrap_or_default();
                    let syscall =
                        fs::read_to_string(format!("/proc/{}/syscall", m.pid)).unwrap_or_default();
                    // write(2) is system call 1 on x86_64.
                    if wchan == "pipe_write" || syscall.split_whitespace().next() == Some("1") {
                        seq = Some(m.pid);
                    }
                }
                "sleep" => sleeping = true,
                "wc" => panic!(
                    "wc already runs: this machine is too slow to catch the pipe full while the \
                     reader sleeps{}",
                    tree.logs()
                ),
                _ => {}
            }
        }
        if let (Some(pid), true) = (seq, sleeping) {
            return pid;
        }
        if let Some(status) = tree.try_reap_root() {
            panic!("the pipeline ended early ({status:?}){}", tree.logs());
        }
        assert!(
            start.elapsed() < SETTLE,
            "seq never blocked on the full pipe while sleep ran{}",
            tree.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bash_pipeline_with_data_in_flight_counts_exactly() {
    let Some(bash) = program("bash") else {
        eprintln!("note: bash is not installed; skipping");
        return;
    };
    let mut tree = Tree::start("pipeline", &bash, |dir| {
        let out = dir.join("count.txt");
        vec![
            "-c".to_owned(),
            format!("seq 1 2000000 | (sleep 2; wc -l) > '{}'", out.display()),
        ]
    });
    let seq = wait_pipe_full(&mut tree);
    let processes = tree.members().len();
    assert!(
        processes >= 4,
        "bash, seq, the subshell and sleep: {processes} processes"
    );

    let images = tree.dump();
    let in_flight = fs::metadata(images.join("pipes-data.img"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        in_flight > 4096,
        "pipes-data.img holds {in_flight} bytes: the full pipe between seq (pid {seq}) and wc \
         was not saved"
    );
    tree.restore(&images);
    let status = tree.wait_root(SETTLE);
    assert_eq!(
        status,
        Some(WaitStatus::Exited(tree.root, 0)),
        "the restored pipeline's bash{}",
        tree.logs()
    );
    let count = fs::read_to_string(tree.dir().join("count.txt")).unwrap_or_default();
    assert_eq!(
        count.trim(),
        "2000000",
        "wc -l after restore{}",
        tree.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// python3 tree

/// The real interpreter (not a launcher script that would exec it), if python3 is installed.
fn python3() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_file().then_some(path)
}

#[test]
fn python_tree_keeps_session_pipe_socketpair_shared_memory_and_fifo() {
    let Some(python) = python3() else {
        eprintln!("note: python3 is not installed; skipping");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/tree_python.py");
    let mut tree = Tree::start("pytree", &python, |dir| {
        vec![
            script.display().to_string(),
            "--ready".to_owned(),
            dir.join("ready").display().to_string(),
            "--result".to_owned(),
            dir.join("result").display().to_string(),
        ]
    });
    let ready = tree.dir().join("ready");
    let result = tree.dir().join("result");
    tree.wait_file(&ready);
    let members = tree.members();
    assert_eq!(members.len(), 3, "root, session leader child, grandchild");
    let child = members[1].pid;
    assert_eq!(
        nix::unistd::getsid(Some(child)).ok(),
        Some(child),
        "the child leads its session"
    );

    let images = tree.dump();
    tree.restore(&images);
    let restored: Vec<(Pid, String)> = tree
        .members()
        .iter()
        .map(|m| (m.pid, comm(m.pid)))
        .collect();
    assert_eq!(
        restored.len(),
        3,
        "processes after restore: {restored:?}{}",
        tree.logs()
    );
    kill(tree.root, Signal::SIGUSR2).expect("SIGUSR2 to the restored root");
    tree.wait_file(&result);
    let verdict = fs::read_to_string(&result).unwrap_or_default();
    let status = tree.wait_root(SETTLE);
    assert_eq!(
        verdict.trim_end(),
        "PASS",
        "the restored python tree reports (root {status:?}){}",
        tree.logs()
    );
    assert_eq!(status, Some(WaitStatus::Exited(tree.root, 0)));
}
