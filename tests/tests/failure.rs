//! Failures: a dump that fails at any step leaves the process running exactly as it was, and a
//! restore from damaged images fails cleanly, leaves no process behind and changes no image.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_tests::{dir_digest, image_files, proc_state, proc_status_field, Workload};

/// Makes the dump of each sensitive workload fail at `point` and checks the aftermath. `mem_vmas`
/// compares its whole memory map (a scratch page left behind shows), `signals` its mask and
/// pending signals (an injection that leaks a signal shows).
fn dump_fails_at(point: &str) {
    for name in ["mem_vmas", "signals"] {
        let mut w = Workload::start(name, &[]);
        let images = w.new_images_dir();
        let run = w.run_dump(&images, &[], &[("CKPT_FAULT", point)]);
        assert!(
            !run.success(),
            "ckpt-dump with CKPT_FAULT={point} succeeded{}",
            w.logs()
        );
        let leftovers = if images.exists() {
            image_files(&images)
        } else {
            Vec::new()
        };
        assert!(
            leftovers.is_empty(),
            "a failed dump left images behind: {leftovers:?}"
        );
        assert!(
            w.is_alive(),
            "{name} died when the dump failed at {point}{}",
            w.logs()
        );
        // Give a wrongly stopped process a moment to show its state.
        std::thread::sleep(Duration::from_millis(50));
        let state = proc_state(w.pid());
        assert!(
            matches!(state, Some('S') | Some('R')),
            "{name} is in state {state:?} after the dump failed at {point}"
        );
        assert_eq!(
            proc_status_field(w.pid(), "TracerPid").as_deref(),
            Some("0"),
            "{name} is still traced"
        );
        let verdict = w.finish();
        assert!(
            verdict == "PASS",
            "{name} changed when the dump failed at {point}: {verdict}{}",
            w.logs()
        );
    }
}

#[test]
fn dump_failure_after_freeze_leaves_process_running() {
    dump_fails_at("after-freeze");
}

#[test]
fn dump_failure_after_inject_leaves_process_running() {
    dump_fails_at("after-inject");
}

#[test]
fn dump_failure_mid_pages_leaves_process_running() {
    dump_fails_at("mid-pages");
}

#[test]
fn dump_failure_before_inventory_leaves_process_running() {
    dump_fails_at("before-inventory");
}

/// Copies an image directory (files only) to `to`.
fn copy_images(from: &Path, to: &Path) {
    fs::create_dir(to).expect("create damaged images dir");
    for entry in fs::read_dir(from).expect("read images").flatten() {
        if entry.path().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).expect("copy image");
        }
    }
}

fn find(dir: &Path, prefix: &str) -> PathBuf {
    image_files(dir)
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no {prefix}*.img in {}", dir.display()))
}

#[test]
fn restore_from_damaged_images_fails_cleanly() {
    let mut w = Workload::start("mem_vmas", &[]);
    let images = w.dump(&[]);
    let pid = w.pid();

    type Damage = fn(&Path);
    let damages: [(&str, Damage); 5] = [
        ("pages file cut short", |d| {
            let pages = find(d, "pages-");
            let len = fs::metadata(&pages).expect("stat pages").len();
            fs::OpenOptions::new()
                .write(true)
                .open(&pages)
                .expect("open pages")
                .set_len(len / 2)
                .expect("truncate");
        }),
        ("core image missing", |d| {
            fs::remove_file(find(d, "core-")).expect("remove core")
        }),
        ("mm image with a wrong magic", |d| {
            let mm = find(d, "mm-");
            let mut bytes = fs::read(&mm).expect("read mm");
            bytes[4] ^= 0xff;
            fs::write(&mm, bytes).expect("write mm");
        }),
        ("pagemap entries overwritten", |d| {
            let pagemap = find(d, "pagemap-");
            let mut bytes = fs::read(&pagemap).expect("read pagemap");
            let start = bytes.len() / 2;
            for b in &mut bytes[start..] {
                *b = 0xff;
            }
            fs::write(&pagemap, bytes).expect("write pagemap");
        }),
        ("inventory truncated", |d| {
            let inventory = d.join("inventory.img");
            fs::write(
                &inventory,
                &fs::read(&inventory).expect("read inventory")[..10],
            )
            .expect("write inventory");
        }),
    ];

    for (n, (what, damage)) in damages.iter().enumerate() {
        let damaged = w.dir().join(format!("damaged-{n}"));
        copy_images(&images, &damaged);
        damage(&damaged);
        let before = dir_digest(&damaged);
        let run = w.run_restore(&damaged, &[], &[]);
        // Anything left of the restored process is our child now (we are its subreaper).
        std::thread::sleep(Duration::from_millis(100));
        let leftover = proc_state(pid);
        if leftover.is_some() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        assert!(
            !run.success(),
            "restore from images with {what} succeeded{}",
            w.logs()
        );
        assert!(
            leftover.is_none(),
            "restore from images with {what} left pid {pid} behind (state {leftover:?})"
        );
        assert!(
            !run.stderr.trim().is_empty(),
            "restore from images with {what} failed without saying why"
        );
        assert_eq!(
            dir_digest(&damaged),
            before,
            "restore changed the images ({what})"
        );
    }

    // The intact images still restore: nothing above kept the pid busy.
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn restore_refuses_a_pid_in_use_and_leaves_its_holder_alone() {
    let mut w = Workload::start("signals", &[]);
    let images = w.dump(&["--leave-running"]);
    let before = dir_digest(&images);
    let run = w.run_restore(&images, &[], &[]);
    assert!(
        !run.success(),
        "restore succeeded while pid {} is in use",
        w.pid()
    );
    assert!(
        run.stderr.contains(&w.pid().to_string()),
        "the error should name the pid in use: {}",
        run.stderr
    );
    assert!(w.is_alive(), "the process holding the pid died");
    let after: Vec<_> = dir_digest(&images)
        .into_iter()
        .filter(|(name, ..)| name != "stats-restore")
        .collect();
    assert_eq!(after, before, "a refused restore changed the images");
    w.assert_pass();
}

#[test]
fn restore_refuses_an_executable_that_changed_since_the_dump() {
    // The workload runs from a copy of its binary that the test can replace.
    let bin_dir = tempfile::tempdir().expect("temp dir");
    let exe = bin_dir.path().join("fsctx");
    fs::copy(ckpt_tests::workload_path("fsctx"), &exe).expect("copy the workload");
    let mut w = Workload::start_program("fsctx", &exe, &[], &[]);
    let images = w.dump(&[]);

    let original = fs::read(&exe).expect("read the binary");
    fs::remove_file(&exe).expect("remove the binary");
    fs::copy(ckpt_tests::workload_path("rlimits"), &exe).expect("put another binary in its place");
    let run = w.run_restore(&images, &[], &[]);
    std::thread::sleep(Duration::from_millis(100));
    let leftover = proc_state(w.pid());
    if leftover.is_some() {
        let _ = nix::sys::signal::kill(w.pid(), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(w.pid(), None);
    }
    assert!(
        !run.success(),
        "restore ran a process whose executable changed{}",
        w.logs()
    );
    assert!(
        leftover.is_none(),
        "a refused restore left pid {} behind",
        w.pid()
    );
    assert!(
        run.stderr.contains(exe.to_str().expect("utf-8 path")),
        "the error should name the file that changed: {}",
        run.stderr
    );

    // With the right binary back, the same images restore.
    fs::remove_file(&exe).expect("remove the other binary");
    fs::write(&exe, original).expect("put the binary back");
    fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn dump_of_a_process_traced_by_someone_else_fails_and_leaves_it_alone() {
    let mut w = Workload::start("signals", &[]);
    let pid = w.pid();
    // A debugger stand-in: a thread that seizes the workload and holds it until told to go.
    // When a tracer thread exits, the kernel detaches its tracees.
    let (seized_tx, seized_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let tracer = std::thread::spawn(move || {
        let seized = nix::sys::ptrace::seize(pid, nix::sys::ptrace::Options::empty());
        seized_tx.send(seized.is_ok()).expect("report the seize");
        let _ = go_rx.recv();
    });
    assert!(
        seized_rx.recv().expect("the tracer reports"),
        "cannot seize the workload"
    );
    assert_ne!(proc_status_field(pid, "TracerPid").as_deref(), Some("0"));

    let images = w.new_images_dir();
    let run = w.run_dump(&images, &[], &[]);
    let still_traced = proc_status_field(pid, "TracerPid").is_some_and(|t| t != "0");
    go_tx.send(()).expect("release the tracer");
    tracer.join().expect("the tracer thread");

    assert!(
        !run.success(),
        "ckpt-dump dumped a process another tracer holds"
    );
    assert!(
        run.stderr.contains(&pid.to_string()),
        "the error should name the pid: {}",
        run.stderr
    );
    assert!(
        still_traced,
        "the dump took the process away from its tracer"
    );
    let leftovers = image_files(&images);
    assert!(
        leftovers.is_empty(),
        "a failed dump left images: {leftovers:?}"
    );
    assert!(w.is_alive(), "the process died");
    w.assert_pass();
}
