//! `check`: validates every image of a directory and the references between images.
//!
//! - every image file decodes completely (header, framing, messages, payloads), holds the
//!   kind its name says, and the inventory has the image version readers understand;
//! - the process tree: unique pids, known parents, a core image for every thread and no core
//!   image without a thread;
//! - files: every fd, executable, cwd, root and file mapping names a file id of `files.img`;
//! - memory: pagemap ranges lie inside the process's VMAs, `pages-N.img` holds exactly the
//!   present pages of its pagemap, every pages image has its pagemap, and every PE_PARENT
//!   page is found in the parent chain.
//!
//! Every problem is reported, not only the first.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use images_format::pb::{MmEntry, VmaEntry};
use images_format::vma::VmaStatus;
use images_format::{ImageDir, ImageKind, PageFlags, Pagemap, PagesError, PagesReader, PAGE_SIZE};

use crate::json::decode_image;
use crate::model::{self, error_chain, ImageSet, Problem};
use crate::schema::Schema;

/// Checks `path` and returns every problem found (none: the directory is consistent).
pub fn check_dir(path: &Path) -> Vec<Problem> {
    let (dir, set) = match model::load(path) {
        Ok(loaded) => loaded,
        Err(err) => {
            return vec![Problem {
                image: path.display().to_string(),
                what: error_chain(&err),
            }]
        }
    };
    let mut checker = Checker {
        dir: &dir,
        set: &set,
        problems: Vec::new(),
    };
    let undecodable = checker.decode_all();
    // the model's own reading errors, unless the full decode already reported that image
    for problem in &set.problems {
        if !undecodable.contains(&problem.image) {
            checker.problems.push(problem.clone());
        }
    }
    checker.tree();
    checker.files();
    checker.memory(&undecodable);
    let mut seen = HashSet::new();
    checker.problems.retain(|p| seen.insert(p.clone()));
    checker.problems
}

struct Checker<'a> {
    dir: &'a ImageDir,
    set: &'a ImageSet,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, image: impl Into<String>, what: impl Into<String>) {
        self.problems.push(Problem {
            image: image.into(),
            what: what.into(),
        });
    }

    /// Decodes every image file; returns the names of those that failed.
    fn decode_all(&mut self) -> BTreeSet<String> {
        let mut failed = BTreeSet::new();
        let schema = match Schema::images() {
            Ok(schema) => schema,
            Err(err) => {
                self.report("schema", error_chain(&err));
                return failed;
            }
        };
        let entries = match std::fs::read_dir(self.dir.path()) {
            Ok(entries) => entries,
            Err(err) => {
                self.report(
                    self.dir.path().display().to_string(),
                    format!("listing: {err}"),
                );
                return failed;
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            let Some(image) = ImageKind::from_file_name(&name) else {
                if name.ends_with(".img") {
                    self.report(&name, "not the name of any image kind");
                }
                continue;
            };
            if image.kind.is_raw() {
                continue;
            }
            let bytes = match std::fs::read(self.dir.path().join(&name)) {
                Ok(bytes) => bytes,
                Err(err) => {
                    self.report(&name, format!("reading: {err}"));
                    failed.insert(name);
                    continue;
                }
            };
            match decode_image(&schema, &bytes, false) {
                Ok(json) => {
                    let magic = json.get("magic").and_then(|m| m.as_str()).unwrap_or("");
                    if magic != image.kind.magic_name() {
                        self.report(
                            &name,
                            format!("holds a {magic} image, not {}", image.kind.magic_name()),
                        );
                        failed.insert(name);
                    }
                }
                Err(err) => {
                    self.report(&name, error_chain(&err));
                    failed.insert(name);
                }
            }
        }
        failed
    }

    fn tree(&mut self) {
        let inventory = ImageKind::Inventory.file_name(0);
        if let Some(version) = self.set.inventory.as_ref().map(|i| i.img_version) {
            if version != images_format::kind::IMAGES_V1_1 {
                self.report(
                    &inventory,
                    format!(
                        "image version {version}, but readers understand only {}",
                        images_format::kind::IMAGES_V1_1
                    ),
                );
            }
        }
        let pstree = ImageKind::Pstree.file_name(0);
        if self.set.processes.is_empty() && self.dir.exists(ImageKind::Pstree, 0) {
            self.report(&pstree, "holds no process");
        }
        let mut pids = HashSet::new();
        let mut threads = HashSet::new();
        for process in &self.set.processes {
            let pid = process.pid();
            if !pids.insert(pid) {
                self.report(&pstree, format!("pid {pid} appears twice"));
            }
            let ppid = process.entry.ppid;
            if ppid != 0 && self.set.process(ppid).is_none() {
                self.report(
                    &pstree,
                    format!("pid {pid}: parent {ppid} is not in the tree"),
                );
            }
            if !process.entry.threads.contains(&pid) {
                self.report(
                    &pstree,
                    format!("pid {pid}: its threads do not include itself"),
                );
            }
            for &tid in &process.entry.threads {
                if !threads.insert(tid) {
                    self.report(&pstree, format!("thread {tid} appears twice"));
                }
                if process.has_resources() && !self.dir.exists(ImageKind::Core, u64::from(tid)) {
                    self.report(
                        ImageKind::Core.file_name(u64::from(tid)),
                        format!("missing (thread {tid} of pid {pid})"),
                    );
                }
            }
        }
        if let Ok(files) = self.dir.list() {
            for file in files {
                if file.name.kind != ImageKind::Core {
                    continue;
                }
                let known = file
                    .name
                    .id
                    .and_then(|id| u32::try_from(id).ok())
                    .is_some_and(|tid| threads.contains(&tid));
                if !known {
                    self.report(
                        &file.file_name,
                        "no thread of pstree.img has this core image",
                    );
                }
            }
        }
    }

    fn files(&mut self) {
        let set = self.set;
        for process in &set.processes {
            let pid = process.pid();
            if let Some(ids) = &process.ids {
                let fdinfo = ImageKind::Fdinfo.file_name(u64::from(ids.files_id));
                let mut fds = HashSet::new();
                for fd in &process.fds {
                    if !fds.insert(fd.fd) {
                        self.report(&fdinfo, format!("fd {} appears twice", fd.fd));
                    }
                    self.file_ref(&fdinfo, fd.id, &format!("pid {pid} fd {}", fd.fd));
                }
            }
            if let Some(mm) = &process.mm {
                let image = ImageKind::Mm.file_name(u64::from(pid));
                self.file_ref(&image, mm.exe_file_id, "the executable");
                for vma in &mm.vmas {
                    if is_file_mapping(vma) {
                        let what = format!("mapping {:#x}-{:#x}", vma.start, vma.end);
                        match u32::try_from(vma.shmid) {
                            Ok(id) => self.file_ref(&image, id, &what),
                            Err(_) => self.report(
                                &image,
                                format!("{what}: file id {} is not a u32", vma.shmid),
                            ),
                        }
                    }
                }
            }
            if let Some(fs) = &process.fs {
                let image = ImageKind::Fs.file_name(u64::from(pid));
                self.file_ref(&image, fs.cwd_id, "the working directory");
                self.file_ref(&image, fs.root_id, "the root directory");
            }
        }
    }

    fn file_ref(&mut self, image: &str, id: u32, what: &str) {
        if !self.set.files.contains_key(&id) {
            self.report(image, format!("{what}: file id {id} is not in files.img"));
        }
    }

    /// Every pagemap of the directory (processes and shared memory) against its VMAs, its
    /// pages image and the parent chain; and every pages image against the pagemaps.
    fn memory(&mut self, undecodable: &BTreeSet<String>) {
        let Ok(files) = self.dir.list() else {
            return;
        };
        let mut users: BTreeMap<u32, String> = BTreeMap::new();
        for file in &files {
            let kind = file.name.kind;
            let (true, Some(id)) = (
                matches!(kind, ImageKind::Pagemap | ImageKind::ShmemPagemap),
                file.name.id,
            ) else {
                continue;
            };
            if undecodable.contains(&file.file_name) {
                continue;
            }
            let read = self
                .dir
                .open(kind, id)
                .map_err(PagesError::from)
                .and_then(|mut reader| Pagemap::read(&mut reader));
            let pagemap = match read {
                Ok(pagemap) => pagemap,
                Err(err) => {
                    self.report(&file.file_name, error_chain(&err));
                    continue;
                }
            };
            if let Some(other) = users.insert(pagemap.pages_id, file.file_name.clone()) {
                self.report(
                    &file.file_name,
                    format!(
                        "its pages image pages-{}.img is also the one of {other}",
                        pagemap.pages_id
                    ),
                );
            }
            if kind == ImageKind::Pagemap {
                let process = u32::try_from(id).ok().and_then(|pid| self.set.process(pid));
                match process.and_then(|p| p.mm.as_ref().map(|mm| (p.pid(), mm))) {
                    Some((pid, mm)) => self.ranges_in_vmas(&file.file_name, pid, mm, &pagemap),
                    None if process.is_none() => {
                        self.report(&file.file_name, "no process of pstree.img has this pagemap")
                    }
                    None => {}
                }
            }
            let pages_ok = self.pages_size(&file.file_name, &pagemap);
            self.parent_pages(kind, id, &file.file_name, &pagemap, pages_ok);
        }
        for file in &files {
            if file.name.kind != ImageKind::Pages {
                continue;
            }
            let used = file
                .name
                .id
                .and_then(|id| u32::try_from(id).ok())
                .is_some_and(|id| users.contains_key(&id));
            if !used {
                self.report(&file.file_name, "no pagemap refers to this pages image");
            }
        }
    }

    fn ranges_in_vmas(&mut self, image: &str, pid: u32, mm: &MmEntry, pagemap: &Pagemap) {
        let mut vmas: Vec<(u64, u64)> = mm.vmas.iter().map(|v| (v.start, v.end)).collect();
        vmas.sort_unstable();
        for range in &pagemap.ranges {
            if !covered(&vmas, range.vaddr, range.end()) {
                self.report(
                    image,
                    format!(
                        "pages {:#x}-{:#x} are outside the VMAs of pid {pid}",
                        range.vaddr,
                        range.end(),
                    ),
                );
            }
        }
    }

    /// Whether `pages-N.img` holds exactly the present pages; reports it if not.
    fn pages_size(&mut self, pagemap_name: &str, pagemap: &Pagemap) -> bool {
        let pages_id = u64::from(pagemap.pages_id);
        let name = ImageKind::Pages.file_name(pages_id);
        let needed = pagemap.pages_with(PageFlags::PRESENT) * PAGE_SIZE;
        let path = self.dir.file_path(ImageKind::Pages, pages_id);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == needed => true,
            Ok(meta) => {
                self.report(
                    &name,
                    format!(
                        "holds {} bytes, but {pagemap_name} has {needed} bytes of present pages",
                        meta.len(),
                    ),
                );
                false
            }
            Err(_) if needed == 0 => true,
            Err(err) => {
                let state = if err.kind() == std::io::ErrorKind::NotFound {
                    "missing".to_owned()
                } else {
                    format!("unreadable ({err})")
                };
                self.report(
                    &name,
                    format!("{state}, but {pagemap_name} has {needed} bytes of present pages"),
                );
                false
            }
        }
    }

    fn parent_pages(
        &mut self,
        kind: ImageKind,
        id: u64,
        image: &str,
        pagemap: &Pagemap,
        pages_ok: bool,
    ) {
        if pagemap.pages_with(PageFlags::PARENT) == 0 {
            return;
        }
        if self.set.chain.len() < 2 {
            self.report(
                image,
                "has pages in the parent image, but there is no parent link",
            );
            return;
        }
        if !pages_ok {
            // its size problem is reported already, and the reader would refuse the layer
            return;
        }
        let resolved = PagesReader::open(self.dir, kind, id).and_then(|r| r.resolve());
        if let Err(err) = resolved {
            self.report(image, error_chain(&err));
        }
    }
}

/// Mappings whose `shmid` is the id of a file in files.img.
fn is_file_mapping(vma: &VmaEntry) -> bool {
    let status = VmaStatus::from_bits_retain(vma.status);
    status.intersects(VmaStatus::FILE_PRIVATE | VmaStatus::FILE_SHARED)
        && !status.intersects(VmaStatus::SYSVIPC)
}

/// Whether sorted VMAs cover `[start, end)` without a gap.
fn covered(vmas: &[(u64, u64)], start: u64, end: u64) -> bool {
    let mut at = start;
    for &(vma_start, vma_end) in vmas {
        if vma_end <= at {
            continue;
        }
        if vma_start > at {
            return false;
        }
        at = vma_end;
        if at >= end {
            return true;
        }
    }
    at >= end
}

#[cfg(test)]
mod tests {
    use super::covered;

    #[test]
    fn coverage_needs_every_byte() {
        let vmas = [(0x1000, 0x3000), (0x3000, 0x5000), (0x8000, 0x9000)];
        assert!(covered(&vmas, 0x1000, 0x5000));
        assert!(covered(&vmas, 0x2000, 0x3000));
        assert!(!covered(&vmas, 0x4000, 0x6000));
        assert!(!covered(&vmas, 0x6000, 0x7000));
        assert!(covered(&vmas, 0x8000, 0x9000));
        assert!(!covered(&vmas, 0x8000, 0xa000));
    }
}
