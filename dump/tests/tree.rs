//! Dumps of process trees: a root with a child holding the read end of a pipe with
//! buffered bytes, a thread and a child of its own; a session leader; a zombie; a stopped
//! child; all sharing one file description. The images are checked entry by entry (parent
//! links, groups and sessions, the zombie's status, one object for the shared fd, one
//! `pipes-data` entry, one fd table for a `CLONE_FILES` child), by `ckpt-img check` and by
//! crit. A dump that fails on purpose leaves
//! every process as it was; the default dump kills them all.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use images_format::pb::{
    CoreEntry, FdinfoEntry, FileEntry, PipeDataEntry, PstreeEntry, StatsEntry, TaskKobjIdsEntry,
};
use images_format::{ImageDir, ImageKind};

mod common;
use common::{assert_ok, proc_state, start_c_workload, tools, DUMP};

const WORKLOAD_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/tree.c");

/// The state letters of [`Tree::states`] once the workload is set up: all asleep in pause()
/// but S (stopped) and Z (a zombie).
const SETTLED: [char; 7] = ['S', 'S', 'S', 'S', 'T', 'S', 'Z'];

/// The processes of the workload, as it reports them.
#[derive(Debug, Clone, Copy)]
struct Pids {
    root: u32,
    a: u32,
    g: u32,
    b: u32,
    z: u32,
    s: u32,
    /// Shares the root's fd table and fs info.
    f: u32,
}

impl Pids {
    fn live(&self) -> [u32; 6] {
        [self.root, self.a, self.g, self.b, self.s, self.f]
    }
}

/// The tree; every process is killed when dropped and the root reaped (its children go to
/// the reaper).
struct Tree {
    child: Child,
    dir: tempfile::TempDir,
    pids: Pids,
    /// Killed by the dump and reaped: its pids may belong to others by now.
    reaped: bool,
}

impl Tree {
    fn start() -> Tree {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pids");
        let mut child = start_c_workload(
            dir.path(),
            WORKLOAD_SRC,
            "tree",
            &["-O2", "-pthread"],
            &[pid_file.to_string_lossy().into_owned()],
        );
        let start = Instant::now();
        let text = loop {
            if let Ok(text) = fs::read_to_string(&pid_file) {
                break text;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the workload could not set itself up: {status:?}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the workload never got ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let v: Vec<u32> = text
            .split_whitespace()
            .map(|w| w.parse().expect("pid"))
            .collect();
        assert_eq!(v.len(), 7, "{text}");
        let pids = Pids {
            root: v[0],
            a: v[1],
            g: v[2],
            b: v[3],
            z: v[4],
            s: v[5],
            f: v[6],
        };
        assert_eq!(pids.root, child.id());
        let tree = Tree {
            child,
            dir,
            pids,
            reaped: false,
        };
        // The last ones forked may still be on their way to pause().
        tree.settles_to(&SETTLED);
        tree
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn dump(&self, images: &Path, args: &[&str], fault: Option<&str>) -> Output {
        let mut cmd = Command::new(DUMP);
        cmd.arg("-t")
            .arg(self.pids.root.to_string())
            .arg("-D")
            .arg(images)
            .args(args)
            .env_remove("CKPT_FAULT");
        if let Some(point) = fault {
            cmd.env("CKPT_FAULT", point);
        }
        cmd.output().expect("run ckpt-dump")
    }

    /// Each process's state letter, root first (the zombie last).
    fn states(&self) -> Vec<char> {
        let p = self.pids;
        [p.root, p.a, p.g, p.b, p.s, p.f, p.z]
            .iter()
            .map(|pid| proc_state(*pid))
            .collect()
    }

    /// Waits (a little) until every process is back in the state `before` lists: a process
    /// just let go may still be running on its way back to sleep.
    fn settles_to(&self, before: &[char]) {
        let start = Instant::now();
        while self.states() != before && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(self.states(), before, "every process as it was");
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // Children first, while their parents can still reap them.
        for pid in self.pids.live().iter().rev() {
            if proc_state(*pid) != '?' {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = self.child.wait();
    }
}

fn tracer(pid: u32) -> i32 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:").map(|v| v.trim().to_owned()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

fn entry(pstree: &[PstreeEntry], pid: u32) -> &PstreeEntry {
    pstree
        .iter()
        .find(|e| e.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} is not in pstree.img: {pstree:?}"))
}

/// The fdinfo of `pid`'s fd table.
fn fds(dir: &ImageDir, pid: u32) -> Vec<FdinfoEntry> {
    let ids: TaskKobjIdsEntry = dir.read_one(ImageKind::Ids, u64::from(pid)).expect("ids");
    dir.read_all(ImageKind::Fdinfo, u64::from(ids.files_id))
        .expect("fdinfo")
}

/// The id of the object behind fd `fd` of `pid`.
fn file_id(dir: &ImageDir, pid: u32, fd: u32) -> u32 {
    fds(dir, pid)
        .iter()
        .find(|e| e.fd == fd)
        .unwrap_or_else(|| panic!("pid {pid} has no fd {fd}"))
        .id
}

/// The fd number of `shared.txt` in `pid`, from /proc.
fn shared_fd(pid: u32) -> u32 {
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
        let entry = entry.expect("fd");
        if let Ok(target) = fs::read_link(entry.path()) {
            if target.ends_with("shared.txt") {
                return entry.file_name().to_string_lossy().parse().expect("fd");
            }
        }
    }
    panic!("pid {pid} has no shared.txt open");
}

#[test]
fn tree_images_hold_every_process() {
    let t = Tree::start();
    let p = t.pids;
    let fd = shared_fd(p.root);
    let before = SETTLED;
    let images = t.path("images");
    let out = t.dump(&images, &["--leave-running", "-o", "dump.log", "-v4"], None);
    assert_ok(&out, "ckpt-dump of the tree");
    t.settles_to(&before);
    for pid in p.live() {
        assert_eq!(tracer(pid), 0, "pid {pid} let go");
    }

    let dir = ImageDir::new(&images).expect("images");
    let pstree: Vec<PstreeEntry> = dir.read_all(ImageKind::Pstree, 0).expect("pstree");
    assert_eq!(pstree.len(), 7, "{pstree:?}");
    assert_eq!(pstree[0].pid, p.root, "the root first");
    assert_eq!(entry(&pstree, p.root).ppid, 0);
    for child in [p.a, p.b, p.z, p.s, p.f] {
        assert_eq!(entry(&pstree, child).ppid, p.root, "pid {child}");
    }
    assert_eq!(entry(&pstree, p.g).ppid, p.a);
    // Parents before children.
    for (i, e) in pstree.iter().enumerate() {
        if e.ppid != 0 {
            let parent = pstree.iter().position(|x| x.pid == e.ppid).expect("parent");
            assert!(parent < i, "{} listed before its parent", e.pid);
        }
    }
    let root = entry(&pstree, p.root);
    for pid in [p.a, p.g, p.s, p.z, p.f] {
        let e = entry(&pstree, pid);
        assert_eq!((e.pgid, e.sid), (root.pgid, root.sid), "pid {pid}");
    }
    let b = entry(&pstree, p.b);
    assert_eq!(
        (b.pgid, b.sid),
        (p.b, p.b),
        "the setsid child leads its session"
    );
    assert_eq!(entry(&pstree, p.a).threads.len(), 2, "A and its thread");
    assert_eq!(entry(&pstree, p.z).threads, vec![p.z]);
    for e in &pstree {
        for tid in &e.threads {
            assert!(dir.exists(ImageKind::Core, u64::from(*tid)), "core-{tid}");
        }
    }

    // The zombie: its exit status (exit(7) as a raw wait status), nothing else.
    let core: CoreEntry = dir.read_one(ImageKind::Core, u64::from(p.z)).expect("core");
    let tc = core.tc.expect("tc");
    assert_eq!((tc.task_state, tc.exit_code), (2, 7 << 8));
    assert!(!dir.exists(ImageKind::Mm, u64::from(p.z)));
    let core: CoreEntry = dir.read_one(ImageKind::Core, u64::from(p.s)).expect("core");
    assert_eq!(core.tc.expect("tc").task_state, 3, "the stopped child");
    let core: CoreEntry = dir.read_one(ImageKind::Core, u64::from(p.a)).expect("core");
    assert_eq!(core.tc.expect("tc").task_state, 1);

    // One object for the fd every process inherited, and for stdout.
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files");
    let shared = file_id(&dir, p.root, fd);
    for pid in p.live() {
        assert_eq!(file_id(&dir, pid, fd), shared, "pid {pid}: shared.txt");
        assert_eq!(file_id(&dir, pid, 1), file_id(&dir, p.root, 1), "stdout");
    }
    let objects: Vec<&FileEntry> = files.iter().filter(|f| f.id == shared).collect();
    assert_eq!(objects.len(), 1, "one files.img entry per description");
    let reg = objects[0].reg.as_ref().expect("regular file");
    assert_eq!(reg.pos, 5, "the shared offset");
    let mut ids: Vec<u32> = files.iter().map(|f| f.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), files.len(), "file ids are unique");
    // Separate fd tables but F's, which is the root's: one fdinfo image per table.
    let ids_of = |pid: u32| -> TaskKobjIdsEntry {
        dir.read_one(ImageKind::Ids, u64::from(pid)).expect("ids")
    };
    let mut tables: Vec<u32> = p.live().iter().map(|pid| ids_of(*pid).files_id).collect();
    tables.sort_unstable();
    tables.dedup();
    assert_eq!(tables.len(), 5);
    let (root_ids, f_ids, a_ids) = (ids_of(p.root), ids_of(p.f), ids_of(p.a));
    assert_eq!(root_ids.files_id, f_ids.files_id, "CLONE_FILES");
    assert_eq!(root_ids.fs_id, f_ids.fs_id, "CLONE_FS");
    assert_ne!(root_ids.fs_id, a_ids.fs_id);
    assert_ne!(root_ids.vm_id, f_ids.vm_id);
    assert_ne!(root_ids.sighand_id, f_ids.sighand_id);
    let fdinfo_images = fs::read_dir(&images)
        .expect("images")
        .filter(|e| {
            let name = e.as_ref().expect("entry").file_name();
            name.to_string_lossy().starts_with("fdinfo-")
        })
        .count();
    assert_eq!(fdinfo_images, 5, "one fdinfo image per fd table");

    // The pipe from the root to A: one object per end, the bytes once.
    let root_fds = fds(&dir, p.root);
    let a_fds = fds(&dir, p.a);
    let pipe_of = |entries: &[FdinfoEntry]| -> Vec<u32> {
        entries
            .iter()
            .filter_map(|e| files.iter().find(|f| f.id == e.id))
            .filter_map(|f| f.pipe.as_ref().map(|p| p.pipe_id))
            .collect()
    };
    let common: Vec<u32> = pipe_of(&root_fds)
        .into_iter()
        .filter(|id| pipe_of(&a_fds).contains(id))
        .collect();
    assert_eq!(common.len(), 1, "the data pipe");
    let mut reader = dir
        .open_named(&ImageKind::PipesData.file_name(0))
        .expect("pipes-data.img");
    let mut ours = Vec::new();
    while let Some(entry) = reader.read_entry::<PipeDataEntry>().expect("entry") {
        let bytes = reader
            .read_payload(u64::from(entry.bytes))
            .expect("payload");
        if entry.pipe_id == common[0] {
            ours.push(bytes);
        }
    }
    assert_eq!(ours, vec![b"in the pipe".to_vec()], "the bytes, saved once");

    // The 4 MiB the root wrote before forking are in six processes (the zombie's are gone):
    // restore makes five more copies of them.
    let log = fs::read_to_string(images.join("dump.log")).expect("log");
    let duplicated: u64 = log
        .split("restore duplicates ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no COW statistic in the log:\n{log}"));
    let mib = 1 << 20;
    assert!(
        (20 * mib..22 * mib).contains(&duplicated),
        "{duplicated} bytes duplicated"
    );
    let stats: Vec<StatsEntry> = ImageDir::new(&images)
        .expect("images")
        .read_all(ImageKind::StatsDump, 0)
        .expect("stats-dump");
    let kept = stats
        .first()
        .and_then(|s| s.dump.as_ref())
        .and_then(|d| d.cow_shared_bytes);
    assert_eq!(kept, Some(duplicated), "stats-dump keeps the figure");

    let check = Command::new(&tools().img)
        .arg("check")
        .arg(&images)
        .output()
        .expect("ckpt-img");
    assert_ok(&check, "ckpt-img check");
    crit_reads_the_tree(&images, &p);
}

/// crit decodes the images a tree adds or changes (one python start each: a few only), and
/// its `x ps` view shows the whole tree.
fn crit_reads_the_tree(images: &Path, p: &Pids) {
    if Command::new("crit").arg("-h").output().is_err() {
        eprintln!("crit not installed: images not cross-checked");
        return;
    }
    let names = [
        "pstree.img".to_owned(),
        "files.img".to_owned(),
        "pipes-data.img".to_owned(),
        format!("core-{}.img", p.z),
        format!("core-{}.img", p.s),
        format!("ids-{}.img", p.f),
    ];
    for name in names {
        let out = Command::new("crit")
            .arg("decode")
            .arg("-i")
            .arg(images.join(&name))
            .output()
            .expect("crit");
        assert_ok(&out, &format!("crit decode {name}"));
    }
    let out = Command::new("crit")
        .arg("x")
        .arg(images)
        .arg("ps")
        .output()
        .expect("crit x ps");
    assert_ok(&out, "crit x ps");
    let text = String::from_utf8_lossy(&out.stdout);
    for pid in [p.root, p.a, p.g, p.b, p.z, p.s, p.f] {
        assert!(
            text.contains(&pid.to_string()),
            "{pid} in crit's tree:\n{text}"
        );
    }
    // `crit x fds` is left out: it opens ids-PID.img for every process, and a zombie has
    // none (nor in CRIU's own images).
}

#[test]
fn failed_tree_dump_leaves_every_process_running() {
    let t = Tree::start();
    let before = SETTLED;
    for point in [
        "after-freeze",
        "after-inject",
        "mid-pages",
        "before-inventory",
    ] {
        let images = t.path(&format!("images-{point}"));
        let out = t.dump(&images, &[], Some(point));
        assert!(!out.status.success(), "{point}: the dump must fail");
        t.settles_to(&before);
        for pid in t.pids.live() {
            assert_eq!(tracer(pid), 0, "{point}: pid {pid} let go");
        }
        let left = fs::read_dir(&images).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{point}: no partial images");
    }
    // Still running: A's thread and G answer signals as before (a stopped or traced
    // process would show 'T' or 't').
    for pid in [t.pids.root, t.pids.a, t.pids.g, t.pids.b] {
        assert_eq!(proc_state(pid), 'S', "pid {pid} sleeps as before");
    }
}

#[test]
fn tree_dump_kills_every_process() {
    let mut t = Tree::start();
    let images = t.path("images");
    let out = t.dump(&images, &[], None);
    assert_ok(&out, "ckpt-dump of the tree");
    let status = t.child.wait().expect("reap the root");
    t.reaped = true;
    assert!(!status.success(), "the root was killed: {status:?}");
    // The others are dead: gone, or zombies until the reaper collects them.
    let start = Instant::now();
    for pid in [t.pids.a, t.pids.g, t.pids.b, t.pids.s, t.pids.f] {
        while !matches!(proc_state(pid), 'Z' | 'X' | '?') {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "pid {pid} still alive: {}",
                proc_state(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn pre_copy_of_a_tree_is_refused() {
    let t = Tree::start();
    let images = t.path("images");
    let out = t.dump(&images, &["--pre-dump"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pre-copy of a process tree is not supported yet"),
        "{stderr}"
    );
    for pid in t.pids.live() {
        assert_eq!(tracer(pid), 0, "pid {pid} let go");
    }
}

#[test]
fn a_process_blocked_in_vfork_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/vfork.c");
    let mut parent = start_c_workload(dir.path(), source, "vfork", &["-O2"], &[]);
    let children = format!("/proc/{0}/task/{0}/children", parent.id());
    let start = Instant::now();
    let child: u32 = loop {
        if let Some(pid) = fs::read_to_string(&children)
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|w| w.parse().ok()))
        {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no vfork child");
        std::thread::sleep(Duration::from_millis(10));
    };
    let started = Instant::now();
    let out = Command::new(DUMP)
        .arg("-t")
        .arg(parent.id().to_string())
        .arg("-D")
        .arg(dir.path().join("images"))
        .env_remove("CKPT_FAULT")
        .output()
        .expect("run ckpt-dump");
    let took = started.elapsed();
    let (parent_tracer, child_tracer) = (tracer(parent.id()), tracer(child));
    // The child first: its parent returns from vfork, and is then ours to reap.
    let _ = Command::new("kill")
        .args(["-KILL", &child.to_string()])
        .status();
    let _ = parent.kill();
    let _ = parent.wait();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vfork child"), "{stderr}");
    assert!(
        took < Duration::from_secs(10),
        "refused at once, not after {took:?}"
    );
    assert_eq!((parent_tracer, child_tracer), (0, 0), "both let go");
}
