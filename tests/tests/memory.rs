//! Memory: every VMA kind keeps its place, protection and bytes; shared memory stays shared.

use std::path::Path;
use std::process::Command;

use ckpt_tests::{reap_killed, round_trip, Workload};
use nix::unistd::Pid;

#[test]
fn every_vma_kind_keeps_layout_and_contents() {
    round_trip("mem_vmas", &[]);
}

#[test]
fn large_region_survives_byte_for_byte() {
    round_trip("mem_large", &["--mib", "256"]);
}

#[test]
fn memory_written_during_the_dump_stays_consistent() {
    round_trip("busy", &[]);
}

#[test]
fn shared_mappings_keep_contents_and_stay_shared_with_their_file() {
    round_trip("shared", &[]);
}

/// The names of the images of kind `prefix` in `dir`.
fn images_named(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list the images")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[test]
fn shared_anonymous_memory_mapped_twice_is_saved_once_and_stays_one_object() {
    let mut w = Workload::start("shm_anon", &[]);
    let images = w.dump(&[]);
    assert_eq!(
        images_named(&images, "pagemap-shmem-").len(),
        1,
        "one shmem pagemap for one object mapped twice"
    );
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn shared_anonymous_memory_written_by_a_parent_is_seen_by_its_child_after_restore() {
    let mut w = Workload::start("shm_anon", &["--child", "1"]);
    let child = Pid::from_raw(w.ready_field("child"));
    let images = w.dump(&[]);
    reap_killed(child);
    assert_eq!(
        images_named(&images, "pagemap-shmem-").len(),
        1,
        "one shmem pagemap for the object both processes map"
    );
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn memfd_sysv_and_anonymous_memory_stay_shared_with_a_child_and_seals_come_last() {
    let mut w = Workload::start("shm_tree", &[]);
    let child = Pid::from_raw(w.ready_field("child"));
    let _segment = Segment(w.ready_field("id").to_string());
    let images = w.dump(&[]);
    reap_killed(child);
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn memfd_keeps_name_size_seals_offset_and_contents() {
    let mut w = Workload::start("shm_memfd", &[]);
    let images = w.dump(&[]);
    assert_eq!(images_named(&images, "memfd.img").len(), 1);
    assert_eq!(images_named(&images, "pagemap-shmem-").len(), 1);
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn shared_file_mappings_on_tmpfs_and_disk_write_through_to_their_files() {
    let mut w = Workload::start("shm_file", &[]);
    let tmpfs_file = format!("/dev/shm/ckpt-shm-file-{}", w.pid());
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
    let _ = std::fs::remove_file(tmpfs_file);
}

/// Removes a SysV segment when dropped, so that a failed test leaves none behind.
struct Segment(String);

impl Segment {
    /// The segment a `shm_sysv` workload reported in its ready file (`id=ID key=KEY`).
    fn of(w: &Workload) -> Segment {
        let text = w.ready_text();
        let id = text
            .split_whitespace()
            .find_map(|f| f.strip_prefix("id="))
            .unwrap_or_else(|| panic!("no segment id in the ready file: {text:?}"));
        Segment(id.to_owned())
    }

    fn remove(&self) -> bool {
        Command::new("ipcrm")
            .args(["-m", &self.0])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Its line in /proc/sysvipc/shm, if it exists.
    fn listed(&self) -> Option<String> {
        let text = std::fs::read_to_string("/proc/sysvipc/shm").ok()?;
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(self.0.as_str()))
            .map(str::to_owned)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[test]
fn sysv_segment_that_still_exists_is_attached_again() {
    let mut w = Workload::start("shm_sysv", &[]);
    let segment = Segment::of(&w);
    let images = w.dump(&[]);
    assert_eq!(images_named(&images, "ipcns-shm-").len(), 1);
    assert!(
        segment.listed().is_some(),
        "the segment outlives its killed user"
    );
    w.restore(&images);
    w.assert_pass();
    assert!(
        segment.listed().is_none(),
        "the workload removes its segment at the end"
    );
}

#[test]
fn sysv_segment_removed_before_restore_comes_back_with_its_id_key_and_contents() {
    let mut w = Workload::start("shm_sysv", &[]);
    let segment = Segment::of(&w);
    let images = w.dump(&[]);
    assert!(segment.remove(), "ipcrm -m {}", segment.0);
    assert!(segment.listed().is_none());
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn twenty_thousand_vmas_keep_layout_and_contents() {
    round_trip("manyvmas", &["--vmas", "20000"]);
}
