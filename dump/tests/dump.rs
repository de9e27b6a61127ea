//! End-to-end tests of `ckpt-dump` on a workload that checks itself: it builds state of many
//! kinds, and on SIGUSR2 verifies every piece of it and writes PASS or FAIL. A dump that
//! leaves the process running (on purpose, or because it failed) must leave it passing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_ok, dump_command, send};

const WORKLOAD_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/busy.c");

/// A started workload; killed and reaped when dropped.
struct Workload {
    child: Child,
    dir: tempfile::TempDir,
}

impl Workload {
    /// Compiles and starts the self-checking workload in a fresh directory, waiting until it
    /// is ready. `None` (with a printed reason) when no C compiler is available.
    fn start() -> Option<Workload> {
        Workload::start_program(WORKLOAD_SRC, &["ready", "result"])
    }

    /// Compiles the C program `source` as `busy` and starts it with `args`, which must make
    /// it write a file named `ready`.
    fn start_program(source: &str, args: &[&str]) -> Option<Workload> {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("busy");
        let cc = Command::new("cc")
            .args(["-O1", "-pthread", "-o"])
            .arg(&exe)
            .arg(source)
            .arg("-lrt")
            .status();
        match cc {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("skipped: cannot compile the workload with cc ({other:?})");
                return None;
            }
        }
        let out = fs::File::create(dir.path().join("out.log")).expect("log");
        let child = Command::new(&exe)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start workload");
        let w = Workload { child, dir };
        w.wait_file("ready", Duration::from_secs(20));
        Some(w)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_file(&self, name: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok(text) = fs::read_to_string(self.path(name)) {
                return text;
            }
            assert!(start.elapsed() < timeout, "workload never wrote {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn dump(&self, images: &Path, args: &[&str], fault: Option<&str>) -> Output {
        let mut cmd = dump_command(self.pid(), images);
        cmd.args(args);
        if let Some(point) = fault {
            cmd.env("CKPT_FAULT", point);
        }
        cmd.output().expect("run ckpt-dump")
    }

    /// Asks the workload to check itself and returns its verdict.
    fn verdict(&mut self) -> String {
        send(self.pid(), "USR2");
        let text = self.wait_file("result", Duration::from_secs(20));
        let _ = self.child.wait();
        text
    }

    fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().expect("wait")
    }

    fn maps(&self) -> String {
        fs::read_to_string(format!("/proc/{}/maps", self.pid())).expect("maps")
    }

    fn state(&self) -> char {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?')
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every image crit knows decodes with crit (skipped when crit is absent).
fn crit_decodes(images: &Path) {
    if Command::new("crit").arg("-h").output().is_err() {
        eprintln!("crit not installed: images not cross-checked");
        return;
    }
    for entry in fs::read_dir(images).expect("images") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("pages-") {
            continue;
        }
        let out = Command::new("crit")
            .arg("decode")
            .arg("-i")
            .arg(&path)
            .output()
            .expect("crit");
        assert!(
            out.status.success(),
            "crit cannot decode {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn leave_running_dump_keeps_process_intact() {
    let Some(mut w) = Workload::start() else {
        return;
    };
    let images = w.path("images");
    let out = w.dump(&images, &["--leave-running"], None);
    assert_ok(&out, "ckpt-dump");
    let pid = w.pid();
    for name in [
        "inventory.img".to_owned(),
        "pstree.img".to_owned(),
        format!("core-{pid}.img"),
        format!("mm-{pid}.img"),
        format!("pagemap-{pid}.img"),
        format!("ids-{pid}.img"),
        format!("fs-{pid}.img"),
        "files.img".to_owned(),
        "pages-1.img".to_owned(),
        "timens-0.img".to_owned(),
        "stats-dump".to_owned(),
        "remap-fpath.img".to_owned(),
        "ghost-file-1.img".to_owned(),
    ] {
        assert!(images.join(&name).exists(), "{name} missing");
    }
    // Four threads, four core images.
    let cores = fs::read_dir(&images)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("core-")
        })
        .count();
    assert_eq!(cores, 4);
    crit_decodes(&images);
    check_contents(&images, pid);
    assert_eq!(w.verdict().trim(), "PASS");
}

/// Spot checks of what the images say about the workload's known state.
fn check_contents(images: &Path, pid: u32) {
    use images_format::pb;
    use images_format::{ImageDir, ImageKind};
    let dir = ImageDir::new(images).unwrap();
    let id = u64::from(pid);
    let core: pb::CoreEntry = dir.read_one(ImageKind::Core, id).unwrap();
    let tc = core.tc.as_ref().expect("leader has tc");
    assert_eq!(
        tc.sigactions.len(),
        62,
        "every signal but SIGKILL and SIGSTOP"
    );
    assert_eq!(tc.comm, "busy-work");
    let rlimits = tc.rlimits.as_ref().unwrap();
    let nofile = &rlimits.rlimits[7];
    assert_eq!((nofile.cur, nofile.max), (512, 1024));
    let posix = &tc.timers.as_ref().unwrap().posix;
    assert_eq!(posix.len(), 1);
    assert!(posix[0].vsec > 100 && posix[0].vsec <= 200);
    assert_eq!(
        tc.signals_s.as_ref().unwrap().signals.len(),
        1,
        "the queued RT signal"
    );
    let thread = core.thread_core.as_ref().unwrap();
    assert_eq!(thread.seccomp_mode, Some(2));
    assert_eq!(thread.sas.as_ref().unwrap().ss_size, 65536);
    assert!(thread.rseq_entry.is_some(), "glibc registers rseq");
    assert_eq!(thread.creds.as_ref().unwrap().no_new_privs, Some(1));
    let xsave = core.thread_info.as_ref().unwrap().fpregs.xsave.as_ref();
    assert!(
        xsave.is_some_and(|x| x.ymmh_space.len() == 64),
        "AVX state saved"
    );

    let seccomp: pb::SeccompEntry = dir.read_one(ImageKind::Seccomp, 0).unwrap();
    assert_eq!(seccomp.seccomp_filters.len(), 4, "one filter per thread");
    assert!(seccomp
        .seccomp_filters
        .iter()
        .all(|f| f.filter.len() == 4 * 8));

    let mm: pb::MmEntry = dir.read_one(ImageKind::Mm, id).unwrap();
    const GUARD: u32 = 1 << 16;
    const VDSO: u32 = 1 << 3;
    const VVAR: u32 = 1 << 12;
    assert!(mm
        .vmas
        .iter()
        .any(|v| v.status == GUARD && v.end - v.start == 4096));
    assert!(mm.vmas.iter().any(|v| v.status & VDSO != 0));
    assert!(mm.vmas.iter().any(|v| v.status & VVAR != 0));
    assert!(
        mm.vmas
            .iter()
            .any(|v| v.prot == 0 && v.end - v.start == 4096),
        "PROT_NONE"
    );
    assert!(!mm.mm_saved_auxv.is_empty() && mm.mm_brk >= mm.mm_start_brk);

    let ids: pb::TaskKobjIdsEntry = dir.read_one(ImageKind::Ids, id).unwrap();
    let fdinfo: Vec<pb::FdinfoEntry> = dir
        .read_all(ImageKind::Fdinfo, u64::from(ids.files_id))
        .unwrap();
    let files: Vec<pb::FileEntry> = dir.read_all(ImageKind::Files, 0).unwrap();
    let reg = |fd: u32| {
        let e = fdinfo.iter().find(|e| e.fd == fd).expect("fd");
        (
            e,
            files
                .iter()
                .find(|f| f.id == e.id)
                .and_then(|f| f.reg.clone())
                .expect("reg"),
        )
    };
    assert_eq!(reg(1).0.id, reg(2).0.id, "stdout and stderr share one file");
    let (data_fd, data) = reg(3);
    assert!(data.name.ends_with("/data.txt") && data.pos == 6 && data_fd.flags == 0);
    let (log_fd, log) = reg(4);
    assert_eq!(log_fd.flags, 1, "FD_CLOEXEC");
    assert!(log.flags & 0o2000 != 0, "O_APPEND");
    let (_, ghost) = reg(5);
    assert!(ghost.name.ends_with("/ghost.txt"));
    let remaps: Vec<pb::RemapFilePathEntry> = dir.read_all(ImageKind::RemapFpath, 0).unwrap();
    assert_eq!(remaps.len(), 1);
    let exe = files
        .iter()
        .find(|f| f.id == mm.exe_file_id)
        .and_then(|f| f.reg.as_ref())
        .unwrap();
    assert!(exe.name.ends_with("/busy") && !exe.build_id.is_empty());
}

#[test]
fn default_dump_kills_the_process() {
    let Some(mut w) = Workload::start() else {
        return;
    };
    let images = w.path("images");
    assert_ok(&w.dump(&images, &[], None), "ckpt-dump");
    let status = w.wait_exit();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    assert!(images.join("inventory.img").exists());
}

#[test]
fn leave_stopped_dump_leaves_process_stopped() {
    let Some(mut w) = Workload::start() else {
        return;
    };
    let images = w.path("images");
    assert_ok(&w.dump(&images, &["--leave-stopped"], None), "ckpt-dump");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(w.state(), 'T');
    send(w.pid(), "CONT");
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn dump_failure_leaves_process_running() {
    let Some(mut w) = Workload::start() else {
        return;
    };
    for point in [
        "after-freeze",
        "after-inject",
        "mid-pages",
        "before-inventory",
    ] {
        let maps_before = w.maps();
        let images = w.path(&format!("images-{point}"));
        let out = w.dump(&images, &[], Some(point));
        assert!(!out.status.success(), "{point}: the dump should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(point), "{point}: {stderr}");
        assert!(!images.exists(), "{point}: partial images left behind");
        assert_ne!(w.state(), 'T', "{point}: left stopped");
        assert_eq!(w.maps(), maps_before, "{point}: memory layout changed");
    }
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn failed_dump_keeps_files_it_did_not_create() {
    let Some(w) = Workload::start() else { return };
    let images = w.path("existing");
    fs::create_dir(&images).unwrap();
    fs::write(images.join("notes.txt"), "keep me").unwrap();
    let out = w.dump(&images, &[], Some("before-inventory"));
    assert!(!out.status.success());
    let left: Vec<_> = fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["notes.txt".to_owned()]);
}

#[test]
fn pipe_fd_fails_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::piped())
        .spawn()
        .expect("sleep");
    let images = dir.path().join("images");
    let out = dump_command(child.id(), &images).output().unwrap();
    let running = fs::read_to_string(format!("/proc/{}/stat", child.id())).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("pid {}", child.id())) && stderr.contains("fd 0 is a pipe"),
        "{stderr}"
    );
    assert!(!images.exists(), "images written for an undumpable process");
    assert!(running, "the process must survive a refused dump");
}

#[test]
fn pages_image_matches_process_memory() {
    use images_format::{ImageDir, ImageKind, PagesReader};
    use std::os::unix::fs::FileExt;
    let Some(w) = Workload::start() else { return };
    let images = w.path("images");
    // Stopped afterwards, the memory cannot change while we compare.
    assert_ok(&w.dump(&images, &["--leave-stopped"], None), "ckpt-dump");
    let dir = ImageDir::new(&images).unwrap();
    let reader = PagesReader::open(&dir, ImageKind::Pagemap, u64::from(w.pid())).unwrap();
    let mem = fs::File::open(format!("/proc/{}/mem", w.pid())).unwrap();
    let mut pages = 0u64;
    for range in &reader.pagemap().ranges {
        let len = usize::try_from(range.len()).unwrap();
        let mut saved = vec![0u8; len];
        reader.read_pages(range.vaddr, &mut saved).unwrap();
        let mut live = vec![0u8; len];
        mem.read_exact_at(&mut live, range.vaddr).unwrap();
        assert!(saved == live, "pages at {:#x} differ", range.vaddr);
        pages += range.nr_pages;
    }
    // The 64 MiB region alone is 16384 pages.
    assert!(pages > 16384, "only {pages} pages saved");
    send(w.pid(), "CONT");
}

#[test]
fn deleted_binary_is_saved_as_ghost() {
    use images_format::pb;
    use images_format::{ImageDir, ImageKind};
    let Some(mut w) = Workload::start() else {
        return;
    };
    // As when a program is rebuilt while it runs: its mappings show "(deleted)".
    fs::remove_file(w.path("busy")).unwrap();
    let images = w.path("images");
    assert_ok(&w.dump(&images, &["--leave-running"], None), "ckpt-dump");
    let dir = ImageDir::new(&images).unwrap();
    let remaps: Vec<pb::RemapFilePathEntry> = dir.read_all(ImageKind::RemapFpath, 0).unwrap();
    assert_eq!(remaps.len(), 2, "ghost.txt and the binary");
    let mm: pb::MmEntry = dir.read_one(ImageKind::Mm, u64::from(w.pid())).unwrap();
    assert!(remaps.iter().any(|r| r.orig_id == mm.exe_file_id));
    let ghost = remaps.iter().find(|r| r.orig_id == mm.exe_file_id).unwrap();
    let saved =
        fs::metadata(dir.file_path(ImageKind::GhostFile, u64::from(ghost.remap_id))).unwrap();
    assert!(
        saved.len() > 10_000,
        "the binary's contents are in the ghost image"
    );
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn threads_born_during_the_freeze_are_dumped() {
    use images_format::pb;
    use images_format::{ImageDir, ImageKind};
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/spawner.c");
    let Some(w) = Workload::start_program(source, &["64", "ready"]) else {
        return;
    };
    for round in 0..3 {
        let images = w.path(&format!("images-{round}"));
        assert_ok(&w.dump(&images, &["--leave-running"], None), "ckpt-dump");
        let dir = ImageDir::new(&images).unwrap();
        let pstree: pb::PstreeEntry = dir.read_one(ImageKind::Pstree, 0).unwrap();
        assert!(
            pstree.threads.len() >= 65,
            "the idle threads and the main one"
        );
        for tid in &pstree.threads {
            assert!(
                dir.exists(ImageKind::Core, u64::from(*tid)),
                "core of thread {tid}"
            );
        }
        assert_ne!(w.state(), 'T');
    }
}
