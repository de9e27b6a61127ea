//! The table of image kinds: file name, magic, header style and message of every image.
//!
//! Header styles (all integers little-endian u32 on the platforms we write):
//!
//! ```text
//! common   : 0x54564319 (IMG_COMMON)  | kind magic | entries...   most images
//! service  : 0x55105940 (IMG_SERVICE) | kind magic | entries...   stats-dump, stats-restore, irmap-cache
//! single   : kind magic                            | entries...   inventory.img only
//! raw      : bytes with no header and no framing                  pages-N.img, tarballs, ip dumps
//! ```
//!
//! Several kinds share a magic (the pagemap of a process and of shared memory, signal queues
//! of a task and of a thread): [`ImageKind::from_magic`] answers the kind whose name image
//! viewers print, and [`ImageKind::from_file_name`] tells them apart by name.

use std::fmt;

/// First word of every image but the inventory, raw and service images.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// First word of the statistics and irmap-cache files.
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// Value of `inventory_entry.img_version` for images with the two-word header.
pub const IMAGES_V1_1: u32 = 2;
/// The magic of raw images: they have none.
pub const RAW_IMAGE_MAGIC: u32 = 0;

/// How an image file starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// `IMG_COMMON_MAGIC`, then the kind's magic.
    Common,
    /// `IMG_SERVICE_MAGIC`, then the kind's magic.
    Service,
    /// The kind's magic alone (`inventory.img`).
    Single,
    /// No header and no entries: the file is raw bytes.
    Raw,
}

impl Header {
    /// Bytes of header before the first entry.
    pub fn len(self) -> u64 {
        match self {
            Header::Common | Header::Service => 8,
            Header::Single => 4,
            Header::Raw => 0,
        }
    }

    /// True for raw images, which have no header.
    pub fn is_empty(self) -> bool {
        self == Header::Raw
    }
}

/// What follows an entry, beyond its framed message, and how its length is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Nothing: entries follow each other.
    None,
    /// `pipe_data_entry.bytes` raw bytes (pipes-data, fifo-data).
    PipeData,
    /// `sk_packet_entry.length` raw bytes of the queued packet (sk-queues).
    SkQueue,
    /// `tcp_stream_entry.inq_len` bytes of receive queue then `outq_len` bytes of send queue.
    TcpQueues,
    /// `bpfmap_data_entry.keys_bytes + values_bytes` raw bytes.
    BpfmapData,
    /// `ipc_shm_entry.size` raw bytes, padded to a multiple of 4.
    IpcShm,
    /// `ipc_sem_entry.nsems` u16 values, padded to a multiple of 8 bytes.
    IpcSem,
    /// `ipc_msg_entry.qnum` framed `ipc_msg` records, each followed by `msize` bytes padded to 8.
    IpcMsg,
    /// The ghost-file layout: a `ghost_file_entry`; with `chunks` set, `ghost_chunk_entry`
    /// records follow, each trailed by `len` bytes; without it, the file's contents run to the
    /// end of the image.
    Ghost,
}

/// A static description of one image kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageDesc {
    pub kind: ImageKind,
    /// File name template: `%u`, `%d`, `%lu` take a decimal id, `%x` a hexadecimal one; a
    /// template without a conversion names a single file per image directory.
    pub template: &'static str,
    /// The magic's name as image viewers print it (`"CORE"`, `"PAGEMAP"`). Raw kinds carry
    /// the name of their table entry, which no viewer prints since raw files have no magic.
    pub magic_name: &'static str,
    /// The kind's magic; `RAW_IMAGE_MAGIC` (0) for raw kinds.
    pub magic: u32,
    pub header: Header,
    /// Full protobuf name of the entries' message (`"criu.core_entry"`); `None` for raw kinds.
    pub message: Option<&'static str>,
    /// Full protobuf name of a first entry that differs from the others (`pagemap_head`).
    pub head_message: Option<&'static str>,
    pub payload: Payload,
}

macro_rules! image_kinds {
    ($( $variant:ident => $template:literal, $name:literal, $magic:expr, $header:ident,
        $message:expr, $head:expr, $payload:ident; )*) => {
        /// Every image kind of CRIU's format, named after its magic.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ImageKind {
            $( $variant, )*
        }

        /// One row per [`ImageKind`], in declaration order.
        pub static IMAGE_KINDS: &[ImageDesc] = &[
            $( ImageDesc {
                kind: ImageKind::$variant,
                template: $template,
                magic_name: $name,
                magic: $magic,
                header: Header::$header,
                message: $message,
                head_message: $head,
                payload: Payload::$payload,
            }, )*
        ];
    };
}

// Kinds that share a magic come after the one viewers name, so that the first match by
// magic is the printed one.
image_kinds! {
    Inventory => "inventory.img", "INVENTORY", 0x5831_3116, Single, Some("criu.inventory_entry"), None, None;
    Pstree => "pstree.img", "PSTREE", 0x5027_3030, Common, Some("criu.pstree_entry"), None, None;
    Core => "core-%u.img", "CORE", 0x5505_3847, Common, Some("criu.core_entry"), None, None;
    Ids => "ids-%u.img", "IDS", 0x5443_2030, Common, Some("criu.task_kobj_ids_entry"), None, None;
    Mm => "mm-%u.img", "MM", 0x5749_2820, Common, Some("criu.mm_entry"), None, None;
    Vmas => "vmas-%u.img", "VMAS", 0x5412_3737, Common, Some("criu.vma_entry"), None, None;
    Pagemap => "pagemap-%lu.img", "PAGEMAP", 0x5608_4025, Common, Some("criu.pagemap_entry"), Some("criu.pagemap_head"), None;
    ShmemPagemap => "pagemap-shmem-%lu.img", "PAGEMAP", 0x5608_4025, Common, Some("criu.pagemap_entry"), Some("criu.pagemap_head"), None;
    Pages => "pages-%u.img", "PAGES", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Fdinfo => "fdinfo-%u.img", "FDINFO", 0x5621_3732, Common, Some("criu.fdinfo_entry"), None, None;
    Files => "files.img", "FILES", 0x5630_3138, Common, Some("criu.file_entry"), None, None;
    RegFiles => "reg-files.img", "REG_FILES", 0x5036_3636, Common, Some("criu.reg_file_entry"), None, None;
    ExtFiles => "ext-files.img", "EXT_FILES", 0x5925_5641, Common, Some("criu.ext_file_entry"), None, None;
    NsFiles => "ns-files.img", "NS_FILES", 0x6139_4011, Common, Some("criu.ns_file_entry"), None, None;
    EventfdFile => "eventfd.img", "EVENTFD_FILE", 0x4452_3722, Common, Some("criu.eventfd_file_entry"), None, None;
    EventpollFile => "eventpoll.img", "EVENTPOLL_FILE", 0x4502_3858, Common, Some("criu.eventpoll_file_entry"), None, None;
    EventpollTfd => "eventpoll-tfd.img", "EVENTPOLL_TFD", 0x4443_3746, Common, Some("criu.eventpoll_tfd_entry"), None, None;
    Signalfd => "signalfd.img", "SIGNALFD", 0x5732_3820, Common, Some("criu.signalfd_entry"), None, None;
    InotifyFile => "inotify.img", "INOTIFY_FILE", 0x4842_4431, Common, Some("criu.inotify_file_entry"), None, None;
    InotifyWd => "inotify-wd.img", "INOTIFY_WD", 0x5456_2009, Common, Some("criu.inotify_wd_entry"), None, None;
    FanotifyFile => "fanotify.img", "FANOTIFY_FILE", 0x5509_6122, Common, Some("criu.fanotify_file_entry"), None, None;
    FanotifyMark => "fanotify-mark.img", "FANOTIFY_MARK", 0x5650_6035, Common, Some("criu.fanotify_mark_entry"), None, None;
    Pipes => "pipes.img", "PIPES", 0x5651_3555, Common, Some("criu.pipe_entry"), None, None;
    PipesData => "pipes-data.img", "PIPES_DATA", 0x5645_3709, Common, Some("criu.pipe_data_entry"), None, PipeData;
    Fifo => "fifo.img", "FIFO", 0x5836_4939, Common, Some("criu.fifo_entry"), None, None;
    FifoData => "fifo-data.img", "FIFO_DATA", 0x5933_3054, Common, Some("criu.pipe_data_entry"), None, PipeData;
    Sigact => "sigacts-%u.img", "SIGACT", 0x5534_4201, Common, Some("criu.sa_entry"), None, None;
    Unixsk => "unixsk.img", "UNIXSK", 0x5437_3943, Common, Some("criu.unix_sk_entry"), None, None;
    Inetsk => "inetsk.img", "INETSK", 0x5644_3851, Common, Some("criu.inet_sk_entry"), None, None;
    Packetsk => "packetsk.img", "PACKETSK", 0x6045_4618, Common, Some("criu.packet_sock_entry"), None, None;
    NetlinkSk => "netlinksk.img", "NETLINK_SK", 0x5800_5614, Common, Some("criu.netlink_sk_entry"), None, None;
    SkQueues => "sk-queues.img", "SK_QUEUES", 0x5626_4026, Common, Some("criu.sk_packet_entry"), None, SkQueue;
    Itimers => "itimers-%u.img", "ITIMERS", 0x5746_4056, Common, Some("criu.itimer_entry"), None, None;
    PosixTimers => "posix-timers-%u.img", "POSIX_TIMERS", 0x5260_3957, Common, Some("criu.posix_timer_entry"), None, None;
    Creds => "creds-%u.img", "CREDS", 0x5402_3547, Common, Some("criu.creds_entry"), None, None;
    Utsns => "utsns-%u.img", "UTSNS", 0x5447_3203, Common, Some("criu.utsns_entry"), None, None;
    IpcVar => "ipcns-var-%u.img", "IPC_VAR", 0x5311_5007, Common, Some("criu.ipc_var_entry"), None, None;
    IpcnsShm => "ipcns-shm-%u.img", "IPCNS_SHM", 0x4628_3044, Common, Some("criu.ipc_shm_entry"), None, IpcShm;
    IpcnsMsg => "ipcns-msg-%u.img", "IPCNS_MSG", 0x5545_3737, Common, Some("criu.ipc_msg_entry"), None, IpcMsg;
    IpcnsSem => "ipcns-sem-%u.img", "IPCNS_SEM", 0x5957_3019, Common, Some("criu.ipc_sem_entry"), None, IpcSem;
    Fs => "fs-%u.img", "FS", 0x5140_3912, Common, Some("criu.fs_entry"), None, None;
    RemapFpath => "remap-fpath.img", "REMAP_FPATH", 0x5913_3954, Common, Some("criu.remap_file_path_entry"), None, None;
    GhostFile => "ghost-file-%x.img", "GHOST_FILE", 0x5258_3605, Common, Some("criu.ghost_file_entry"), None, Ghost;
    MemfdInode => "memfd.img", "MEMFD_INODE", 0x4845_3499, Common, Some("criu.memfd_inode_entry"), None, None;
    TcpStream => "tcp-stream-%x.img", "TCP_STREAM", 0x5146_5506, Common, Some("criu.tcp_stream_entry"), None, TcpQueues;
    Mnts => "mountpoints-%u.img", "MNTS", 0x5556_3928, Common, Some("criu.mnt_entry"), None, None;
    Netdev => "netdev-%u.img", "NETDEV", 0x5737_3951, Common, Some("criu.net_device_entry"), None, None;
    Netns => "netns-%u.img", "NETNS", 0x5593_3752, Common, Some("criu.netns_entry"), None, None;
    Ifaddr => "ifaddr-%u.img", "IFADDR", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Route => "route-%u.img", "ROUTE", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Route6 => "route6-%u.img", "ROUTE6", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Rule => "rule-%u.img", "RULE", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Iptables => "iptables-%u.img", "IPTABLES", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Ip6tables => "ip6tables-%u.img", "IP6TABLES", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Nftables => "nftables-%u.img", "NFTABLES", RAW_IMAGE_MAGIC, Raw, None, None, None;
    NetnfCt => "netns-ct-%u.img", "NETNF_CT", RAW_IMAGE_MAGIC, Raw, None, None, None;
    NetnfExp => "netns-exp-%u.img", "NETNF_EXP", RAW_IMAGE_MAGIC, Raw, None, None, None;
    TmpfsImg => "tmpfs-%u.tar.gz.img", "TMPFS_IMG", RAW_IMAGE_MAGIC, Raw, None, None, None;
    TmpfsDev => "tmpfs-dev-%u.tar.gz.img", "TMPFS_DEV", RAW_IMAGE_MAGIC, Raw, None, None, None;
    Autofs => "autofs-%u.img", "AUTOFS", 0x4935_3943, Common, Some("criu.autofs_entry"), None, None;
    BinfmtMisc => "binfmt-misc.img", "BINFMT_MISC", 0x6734_3323, Common, Some("criu.binfmt_misc_entry"), None, None;
    BinfmtMiscOld => "binfmt-misc-%u.img", "BINFMT_MISC", 0x6734_3323, Common, Some("criu.binfmt_misc_entry"), None, None;
    TtyFiles => "tty.img", "TTY_FILES", 0x5943_3025, Common, Some("criu.tty_file_entry"), None, None;
    TtyInfo => "tty-info.img", "TTY_INFO", 0x5945_3036, Common, Some("criu.tty_info_entry"), None, None;
    TtyData => "tty-data.img", "TTY_DATA", 0x5941_3026, Common, Some("criu.tty_data_entry"), None, None;
    FileLocks => "filelocks.img", "FILE_LOCKS", 0x5432_3616, Common, Some("criu.file_lock_entry"), None, None;
    Rlimit => "rlimit-%u.img", "RLIMIT", 0x5711_3925, Common, Some("criu.rlimit_entry"), None, None;
    SignalShared => "signal-s-%u.img", "SIGNAL", 0x5925_5647, Common, Some("criu.siginfo_entry"), None, None;
    SignalPrivate => "signal-p-%u.img", "SIGNAL", 0x5925_5647, Common, Some("criu.siginfo_entry"), None, None;
    Tunfile => "tunfile.img", "TUNFILE", 0x5714_3751, Common, Some("criu.tunfile_entry"), None, None;
    Cgroup => "cgroup.img", "CGROUP", 0x5938_3330, Common, Some("criu.cgroup_entry"), None, None;
    Timerfd => "timerfd.img", "TIMERFD", 0x5049_3712, Common, Some("criu.timerfd_entry"), None, None;
    Cpuinfo => "cpuinfo.img", "CPUINFO", 0x6140_4013, Common, Some("criu.cpuinfo_entry"), None, None;
    Seccomp => "seccomp.img", "SECCOMP", 0x6441_3049, Common, Some("criu.seccomp_entry"), None, None;
    Userns => "userns-%u.img", "USERNS", 0x5547_4906, Common, Some("criu.userns_entry"), None, None;
    Timens => "timens-%u.img", "TIMENS", 0x4311_4433, Common, Some("criu.timens_entry"), None, None;
    Pidns => "pidns-%u.img", "PIDNS", 0x6115_7326, Common, Some("criu.pidns_entry"), None, None;
    BpfmapFile => "bpfmap-file.img", "BPFMAP_FILE", 0x5750_6142, Common, Some("criu.bpfmap_file_entry"), None, None;
    BpfmapData => "bpfmap-data.img", "BPFMAP_DATA", 0x6432_4033, Common, Some("criu.bpfmap_data_entry"), None, BpfmapData;
    Apparmor => "apparmor.img", "APPARMOR", 0x5942_3047, Common, Some("criu.apparmor_entry"), None, None;
    Pidfd => "pidfd.img", "PIDFD", 0x5443_5556, Common, Some("criu.pidfd_entry"), None, None;
    StatsDump => "stats-dump", "STATS", 0x5709_3306, Service, Some("criu.stats_entry"), None, None;
    StatsRestore => "stats-restore", "STATS", 0x5709_3306, Service, Some("criu.stats_entry"), None, None;
    IrmapCache => "irmap-cache", "IRMAP_CACHE", 0x5700_4059, Service, Some("criu.irmap_cache_entry"), None, None;
}

/// A file name split into its kind and id (the number the template's conversion stands for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageName {
    pub kind: ImageKind,
    /// `None` for kinds whose template has no id.
    pub id: Option<u64>,
}

impl ImageKind {
    /// The row of this kind in [`IMAGE_KINDS`].
    pub fn desc(self) -> &'static ImageDesc {
        // The table is generated from the enum in declaration order, so the discriminant
        // is the index; the find is a fallback that keeps this total.
        IMAGE_KINDS
            .get(self as usize)
            .filter(|d| d.kind == self)
            .or_else(|| IMAGE_KINDS.iter().find(|d| d.kind == self))
            .expect("every ImageKind has a row in IMAGE_KINDS")
    }

    /// Every kind, in table order.
    pub fn all() -> impl Iterator<Item = ImageKind> {
        IMAGE_KINDS.iter().map(|d| d.kind)
    }

    /// The magic name as image viewers print it, e.g. `"CORE"`.
    pub fn magic_name(self) -> &'static str {
        self.desc().magic_name
    }

    pub fn magic(self) -> u32 {
        self.desc().magic
    }

    pub fn header(self) -> Header {
        self.desc().header
    }

    /// Full protobuf name of the entries' message, e.g. `"criu.core_entry"`.
    pub fn message_name(self) -> Option<&'static str> {
        self.desc().message
    }

    /// Full protobuf name of the first entry when it differs (the pagemap head).
    pub fn head_message_name(self) -> Option<&'static str> {
        self.desc().head_message
    }

    pub fn payload(self) -> Payload {
        self.desc().payload
    }

    pub fn is_raw(self) -> bool {
        self.header() == Header::Raw
    }

    /// True when the template takes an id (`core-%u.img`), false for a fixed name.
    pub fn has_id(self) -> bool {
        self.desc().template.contains('%')
    }

    /// The file name of this kind for `id`; kinds with a fixed name ignore `id`.
    pub fn file_name(self, id: u64) -> String {
        let template = self.desc().template;
        match split_template(template) {
            Some((prefix, Radix::Decimal, suffix)) => format!("{prefix}{id}{suffix}"),
            Some((prefix, Radix::Hex, suffix)) => format!("{prefix}{id:x}{suffix}"),
            None => template.to_owned(),
        }
    }

    /// The kind and id a file name stands for, if it is the name of an image.
    ///
    /// Names are matched exactly as the templates produce them: no sign, no leading zeros
    /// unless the id is 0, lower-case hex.
    pub fn from_file_name(name: &str) -> Option<ImageName> {
        IMAGE_KINDS.iter().find_map(|d| match_template(d, name))
    }

    /// The kind viewers name for a magic (the first row with it); `None` for raw and unknown
    /// magics.
    pub fn from_magic(magic: u32) -> Option<ImageKind> {
        if magic == RAW_IMAGE_MAGIC {
            return None;
        }
        IMAGE_KINDS
            .iter()
            .find(|d| d.magic == magic)
            .map(|d| d.kind)
    }

    /// The kind whose printed magic name is `name` (the first row with it).
    pub fn from_magic_name(name: &str) -> Option<ImageKind> {
        IMAGE_KINDS
            .iter()
            .find(|d| d.magic_name == name && d.header != Header::Raw)
            .map(|d| d.kind)
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.desc().template)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Radix {
    Decimal,
    Hex,
}

/// Splits a template at its single conversion.
fn split_template(template: &str) -> Option<(&str, Radix, &str)> {
    let start = template.find('%')?;
    let rest = &template[start + 1..];
    for (conv, radix) in [
        ("lu", Radix::Decimal),
        ("u", Radix::Decimal),
        ("d", Radix::Decimal),
        ("x", Radix::Hex),
    ] {
        if let Some(suffix) = rest.strip_prefix(conv) {
            return Some((&template[..start], radix, suffix));
        }
    }
    None
}

fn match_template(desc: &ImageDesc, name: &str) -> Option<ImageName> {
    let Some((prefix, radix, suffix)) = split_template(desc.template) else {
        return (name == desc.template).then_some(ImageName {
            kind: desc.kind,
            id: None,
        });
    };
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let canonical = match radix {
        Radix::Decimal => digits.bytes().all(|b| b.is_ascii_digit()),
        Radix::Hex => digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
    };
    if digits.is_empty() || !canonical || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    let id = match radix {
        Radix::Decimal => digits.parse::<u64>().ok()?,
        Radix::Hex => u64::from_str_radix(digits, 16).ok()?,
    };
    Some(ImageName {
        kind: desc.kind,
        id: Some(id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_discriminant() {
        for (i, d) in IMAGE_KINDS.iter().enumerate() {
            assert_eq!(d.kind as usize, i, "{}", d.template);
        }
    }

    #[test]
    fn file_names_round_trip() {
        for kind in ImageKind::all() {
            let name = kind.file_name(0x1a2);
            let parsed = ImageKind::from_file_name(&name).expect(&name);
            assert_eq!(parsed.kind, kind, "{name}");
            assert_eq!(parsed.id, kind.has_id().then_some(0x1a2), "{name}");
        }
    }

    #[test]
    fn names_are_told_apart() {
        let p = ImageKind::from_file_name("pagemap-shmem-7.img").unwrap();
        assert_eq!((p.kind, p.id), (ImageKind::ShmemPagemap, Some(7)));
        let p = ImageKind::from_file_name("pagemap-42.img").unwrap();
        assert_eq!((p.kind, p.id), (ImageKind::Pagemap, Some(42)));
        let p = ImageKind::from_file_name("pages-3.img").unwrap();
        assert_eq!((p.kind, p.id), (ImageKind::Pages, Some(3)));
        let p = ImageKind::from_file_name("ghost-file-ff.img").unwrap();
        assert_eq!((p.kind, p.id), (ImageKind::GhostFile, Some(255)));
        assert_eq!(ImageKind::Core.file_name(1234), "core-1234.img");
        assert_eq!(ImageKind::StatsDump.file_name(0), "stats-dump");
        for bad in [
            "core-.img",
            "core-01.img",
            "core--1.img",
            "core-1x.img",
            "parent",
            "x.img",
        ] {
            assert_eq!(ImageKind::from_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn magics_name_the_printed_kind() {
        assert_eq!(ImageKind::from_magic(0x5608_4025), Some(ImageKind::Pagemap));
        assert_eq!(
            ImageKind::from_magic(0x5709_3306),
            Some(ImageKind::StatsDump)
        );
        assert_eq!(ImageKind::from_magic(0), None);
        assert_eq!(ImageKind::from_magic(1), None);
        assert_eq!(ImageKind::from_magic_name("CORE"), Some(ImageKind::Core));
        assert_eq!(ImageKind::Inventory.header(), Header::Single);
        assert_eq!(ImageKind::IrmapCache.header(), Header::Service);
    }
}
