//! A restore that fails after it created a SysV segment again removes that segment: a
//! second attempt finds the id free and succeeds.

use ckpt_tests::Workload;

/// The id of the segment a `shm_sysv` workload reported in its ready file (`id=ID key=KEY`).
fn segment_id(w: &Workload) -> String {
    let text = w.ready_text();
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("id="))
        .unwrap_or_else(|| panic!("no segment id in the ready file: {text:?}"))
        .to_owned()
}

fn listed(id: &str) -> bool {
    std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(id))
}

fn ipcrm(id: &str) -> bool {
    std::process::Command::new("ipcrm")
        .args(["-m", id])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Removes the segment when dropped, so that a failed test leaves none behind.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        if listed(&self.0) {
            let _ = ipcrm(&self.0);
        }
    }
}

#[test]
fn failed_restore_removes_the_sysv_segment_it_created() {
    let mut w = Workload::start("shm_sysv", &[]);
    let id = segment_id(&w);
    let _cleanup = Removed(id.clone());
    let images = w.dump(&[]);
    assert!(ipcrm(&id), "ipcrm -m {id}");
    // The pid file cannot be written: restore fails once every process is rebuilt, after
    // the segment was created again.
    let nowhere = w.dir().join("no-such-dir").join("pid");
    let nowhere = nowhere.to_string_lossy().into_owned();
    let failed = w.run_restore(&images, &["--pidfile", &nowhere], &[]);
    assert!(
        !failed.success(),
        "a restore that cannot write its pid file must fail"
    );
    assert!(failed.stderr.contains("no-such-dir"), "{}", failed.stderr);
    assert!(
        !listed(&id),
        "the failed restore left segment {id} behind: {}",
        std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default()
    );
    w.restore(&images);
    w.assert_pass();
}
