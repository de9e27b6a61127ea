//! Micro benchmarks: framing and decoding of typical entries, page writing through the
//! pagemap writer, and page lookup and reads through a parent chain.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use images_format::{
    pb, ImageDir, ImageKind, ImageReader, ImageWriter, PageFlags, PagemapWriter, PagesReader,
    PAGE_SIZE,
};

/// An mm entry like a mid-sized process's: 300 VMAs.
fn mm_entry() -> pb::MmEntry {
    let vmas = (0..300u64)
        .map(|i| pb::VmaEntry {
            start: 0x4000_0000 + i * 0x10_0000,
            end: 0x4000_0000 + i * 0x10_0000 + 0x8000,
            pgoff: 0,
            shmid: i,
            prot: 3,
            flags: 0x22,
            status: 0x201,
            fd: -1,
            madv: Some(0),
            fdflags: None,
        })
        .collect();
    pb::MmEntry {
        vmas,
        mm_saved_auxv: vec![0; 64],
        ..Default::default()
    }
}

fn entries(c: &mut Criterion) {
    let mm = mm_entry();
    let mut g = c.benchmark_group("entry");
    let encoded = {
        let mut w = ImageWriter::new(Vec::new(), ImageKind::Mm, "mm").unwrap();
        w.write_entry(&mm).unwrap();
        w.finish().unwrap()
    };
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("write mm_entry (300 vmas)", |b| {
        b.iter(|| {
            let mut w =
                ImageWriter::new(Vec::with_capacity(encoded.len()), ImageKind::Mm, "mm").unwrap();
            w.write_entry(black_box(&mm)).unwrap();
            w.finish().unwrap()
        })
    });
    g.bench_function("read mm_entry (300 vmas)", |b| {
        b.iter(|| {
            let mut r =
                ImageReader::new(black_box(encoded.as_slice()), ImageKind::Mm, "mm", None).unwrap();
            r.read_entry::<pb::MmEntry>().unwrap().unwrap()
        })
    });
    g.finish();
}

fn pagemap_writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("pagemap_writer");
    let data = vec![0x5au8; 64 * PAGE_SIZE as usize];
    let total: u64 = 64 << 20;
    for chunk_pages in [1u64, 16, 64] {
        // Per run added: the pages themselves go to a sink, so bytes per second would say
        // nothing.
        g.throughput(Throughput::Elements(total / (chunk_pages * PAGE_SIZE)));
        g.bench_with_input(
            BenchmarkId::new("64 MiB in runs of pages", chunk_pages),
            &chunk_pages,
            |b, &n| {
                b.iter(|| {
                    let pm = ImageWriter::new(Vec::new(), ImageKind::Pagemap, "pm").unwrap();
                    // A sink, so that the writer's own cost is measured, not the kernel's first touch of
                    // fresh memory or the page cache.
                    let pages =
                        ImageWriter::new(std::io::sink(), ImageKind::Pages, "pages").unwrap();
                    let mut w = PagemapWriter::new(pm, pages, 1).unwrap();
                    let chunk = &data[..(n * PAGE_SIZE) as usize];
                    let mut vaddr = 0x1000_0000u64;
                    for _ in 0..total / chunk.len() as u64 {
                        w.add_present(vaddr, chunk).unwrap();
                        // a gap every run keeps entries from coalescing, as in a sparse heap
                        vaddr += chunk.len() as u64 + PAGE_SIZE;
                    }
                    w.finish().unwrap()
                })
            },
        );
    }
    g.finish();
}

fn pages_reader(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let old = ImageDir::create_dir(tmp.path().join("1")).unwrap();
    let new = ImageDir::create_dir(tmp.path().join("2")).unwrap();
    new.set_parent("../1").unwrap();
    let pages = 4096u64;
    let page = vec![1u8; PAGE_SIZE as usize];
    let mut w = old.pagemap_writer(ImageKind::Pagemap, 1, 1).unwrap();
    for i in 0..pages {
        w.add_present(0x1000_0000 + 2 * i * PAGE_SIZE, &page)
            .unwrap();
    }
    w.finish().unwrap();
    // every other page of the old runs rewritten, the rest in the parent
    let mut w = new.pagemap_writer(ImageKind::Pagemap, 1, 2).unwrap();
    for i in 0..pages {
        let vaddr = 0x1000_0000 + 2 * i * PAGE_SIZE;
        if i % 2 == 0 {
            w.add_present(vaddr, &page).unwrap();
        } else {
            w.add_hole(vaddr, 1, PageFlags::PARENT).unwrap();
        }
    }
    w.finish().unwrap();

    let mut g = c.benchmark_group("pages_reader");
    g.bench_function("open + resolve 4096 ranges over 2 layers", |b| {
        b.iter(|| {
            let r = PagesReader::open(&new, ImageKind::Pagemap, 1).unwrap();
            r.resolve().unwrap()
        })
    });
    let reader = PagesReader::open(&new, ImageKind::Pagemap, 1).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    g.throughput(Throughput::Bytes(PAGE_SIZE));
    g.bench_function("read_pages one page from the parent", |b| {
        b.iter(|| {
            reader
                .read_pages(black_box(0x1000_0000 + 2 * PAGE_SIZE), &mut buf)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, entries, pagemap_writer, pages_reader);
criterion_main!(benches);
