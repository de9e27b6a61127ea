//! Test helpers: arbitrary messages of any type in the schema, built from a list of numbers
//! that proptest generates and shrinks, and the typed prost message of every image kind.
#![allow(dead_code)]

use images_format::{pb, ImageKind, DESCRIPTOR_SET};
use prost_reflect::{Cardinality, DescriptorPool, DynamicMessage, Kind, MessageDescriptor, Value};

pub fn pool() -> DescriptorPool {
    DescriptorPool::decode(DESCRIPTOR_SET).expect("the build writes a valid descriptor set")
}

/// Numbers to build values from; reads 0 once exhausted, so shrinking towards fewer numbers
/// shrinks towards minimal messages.
pub struct Entropy<'a> {
    data: &'a [u64],
    pos: usize,
}

impl<'a> Entropy<'a> {
    pub fn new(data: &'a [u64]) -> Self {
        Entropy { data, pos: 0 }
    }

    pub fn next(&mut self) -> u64 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }

    /// Values near the edges of their range are the likely mistakes: favour them.
    fn int(&mut self) -> u64 {
        match self.next() % 5 {
            0 => 0,
            1 => u64::MAX >> (self.next() % 64),
            2 => self.next() % 300,
            _ => self.next(),
        }
    }
}

/// A message of type `desc` with every required field set, optional fields set or not and
/// lists of 0-3 items, as the entropy decides.
pub fn arbitrary_message(desc: &MessageDescriptor, e: &mut Entropy, depth: u32) -> DynamicMessage {
    let mut msg = DynamicMessage::new(desc.clone());
    for field in desc.fields() {
        if field.is_list() {
            // Lists are the only way the schema recurses (cgroup dirs, apparmor namespaces).
            let n = if depth > 4 { 0 } else { e.next() % 4 };
            if n > 0 {
                let items = (0..n)
                    .map(|_| arbitrary_value(&field.kind(), e, depth + 1))
                    .collect();
                msg.set_field(&field, Value::List(items));
            }
        } else if field.cardinality() == Cardinality::Required || e.next() % 2 == 1 {
            let value = arbitrary_value(&field.kind(), e, depth + 1);
            msg.set_field(&field, value);
        }
    }
    msg
}

pub fn arbitrary_value(kind: &Kind, e: &mut Entropy, depth: u32) -> Value {
    match kind {
        Kind::Bool => Value::Bool(e.next() % 2 == 1),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(e.int() as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(e.int() as i64),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(e.int() as u32),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(e.int()),
        Kind::Float => Value::F32(e.next() as f32),
        Kind::Double => Value::F64(e.next() as f64),
        Kind::String => {
            let n = e.next() % 12;
            let s = (0..n)
                .map(|_| match e.next() % 4 {
                    0 => char::from_u32(0x20 + (e.next() % 0x5f) as u32).unwrap_or('x'),
                    1 => 'é',
                    2 => '/',
                    _ => char::from(b'a' + (e.next() % 26) as u8),
                })
                .collect();
            Value::String(s)
        }
        Kind::Bytes => {
            let n = e.next() % 100;
            Value::Bytes((0..n).map(|_| e.next() as u8).collect::<Vec<u8>>().into())
        }
        Kind::Message(desc) => Value::Message(arbitrary_message(desc, e, depth)),
        Kind::Enum(desc) => {
            let values: Vec<i32> = desc.values().map(|v| v.number()).collect();
            let i = (e.next() % values.len() as u64) as usize;
            Value::EnumNumber(values[i])
        }
    }
}

/// Calls `$f::<Type>(args...)` with the prost type of `kind`'s entries, or evaluates `$raw`
/// for raw kinds.
#[macro_export]
macro_rules! with_message_type {
    ($kind:expr, $f:ident ( $($arg:expr),* ), $raw:expr) => {{
        use images_format::pb;
        use images_format::ImageKind as K;
        match $kind {
            K::Inventory => $f::<pb::InventoryEntry>($($arg),*),
            K::Pstree => $f::<pb::PstreeEntry>($($arg),*),
            K::Core => $f::<pb::CoreEntry>($($arg),*),
            K::Ids => $f::<pb::TaskKobjIdsEntry>($($arg),*),
            K::Mm => $f::<pb::MmEntry>($($arg),*),
            K::Vmas => $f::<pb::VmaEntry>($($arg),*),
            K::Pagemap | K::ShmemPagemap => $f::<pb::PagemapEntry>($($arg),*),
            K::Fdinfo => $f::<pb::FdinfoEntry>($($arg),*),
            K::Files => $f::<pb::FileEntry>($($arg),*),
            K::RegFiles => $f::<pb::RegFileEntry>($($arg),*),
            K::ExtFiles => $f::<pb::ExtFileEntry>($($arg),*),
            K::NsFiles => $f::<pb::NsFileEntry>($($arg),*),
            K::EventfdFile => $f::<pb::EventfdFileEntry>($($arg),*),
            K::EventpollFile => $f::<pb::EventpollFileEntry>($($arg),*),
            K::EventpollTfd => $f::<pb::EventpollTfdEntry>($($arg),*),
            K::Signalfd => $f::<pb::SignalfdEntry>($($arg),*),
            K::InotifyFile => $f::<pb::InotifyFileEntry>($($arg),*),
            K::InotifyWd => $f::<pb::InotifyWdEntry>($($arg),*),
            K::FanotifyFile => $f::<pb::FanotifyFileEntry>($($arg),*),
            K::FanotifyMark => $f::<pb::FanotifyMarkEntry>($($arg),*),
            K::Pipes => $f::<pb::PipeEntry>($($arg),*),
            K::PipesData | K::FifoData => $f::<pb::PipeDataEntry>($($arg),*),
            K::Fifo => $f::<pb::FifoEntry>($($arg),*),
            K::Sigact => $f::<pb::SaEntry>($($arg),*),
            K::Unixsk => $f::<pb::UnixSkEntry>($($arg),*),
            K::Inetsk => $f::<pb::InetSkEntry>($($arg),*),
            K::Packetsk => $f::<pb::PacketSockEntry>($($arg),*),
            K::NetlinkSk => $f::<pb::NetlinkSkEntry>($($arg),*),
            K::SkQueues => $f::<pb::SkPacketEntry>($($arg),*),
            K::Itimers => $f::<pb::ItimerEntry>($($arg),*),
            K::PosixTimers => $f::<pb::PosixTimerEntry>($($arg),*),
            K::Creds => $f::<pb::CredsEntry>($($arg),*),
            K::Utsns => $f::<pb::UtsnsEntry>($($arg),*),
            K::IpcVar => $f::<pb::IpcVarEntry>($($arg),*),
            K::IpcnsShm => $f::<pb::IpcShmEntry>($($arg),*),
            K::IpcnsMsg => $f::<pb::IpcMsgEntry>($($arg),*),
            K::IpcnsSem => $f::<pb::IpcSemEntry>($($arg),*),
            K::Fs => $f::<pb::FsEntry>($($arg),*),
            K::RemapFpath => $f::<pb::RemapFilePathEntry>($($arg),*),
            K::GhostFile => $f::<pb::GhostFileEntry>($($arg),*),
            K::MemfdInode => $f::<pb::MemfdInodeEntry>($($arg),*),
            K::TcpStream => $f::<pb::TcpStreamEntry>($($arg),*),
            K::Mnts => $f::<pb::MntEntry>($($arg),*),
            K::Netdev => $f::<pb::NetDeviceEntry>($($arg),*),
            K::Netns => $f::<pb::NetnsEntry>($($arg),*),
            K::Autofs => $f::<pb::AutofsEntry>($($arg),*),
            K::BinfmtMisc | K::BinfmtMiscOld => $f::<pb::BinfmtMiscEntry>($($arg),*),
            K::TtyFiles => $f::<pb::TtyFileEntry>($($arg),*),
            K::TtyInfo => $f::<pb::TtyInfoEntry>($($arg),*),
            K::TtyData => $f::<pb::TtyDataEntry>($($arg),*),
            K::FileLocks => $f::<pb::FileLockEntry>($($arg),*),
            K::Rlimit => $f::<pb::RlimitEntry>($($arg),*),
            K::SignalShared | K::SignalPrivate => $f::<pb::SiginfoEntry>($($arg),*),
            K::Tunfile => $f::<pb::TunfileEntry>($($arg),*),
            K::Cgroup => $f::<pb::CgroupEntry>($($arg),*),
            K::Timerfd => $f::<pb::TimerfdEntry>($($arg),*),
            K::Cpuinfo => $f::<pb::CpuinfoEntry>($($arg),*),
            K::Seccomp => $f::<pb::SeccompEntry>($($arg),*),
            K::Userns => $f::<pb::UsernsEntry>($($arg),*),
            K::Timens => $f::<pb::TimensEntry>($($arg),*),
            K::Pidns => $f::<pb::PidnsEntry>($($arg),*),
            K::BpfmapFile => $f::<pb::BpfmapFileEntry>($($arg),*),
            K::BpfmapData => $f::<pb::BpfmapDataEntry>($($arg),*),
            K::Apparmor => $f::<pb::ApparmorEntry>($($arg),*),
            K::Pidfd => $f::<pb::PidfdEntry>($($arg),*),
            K::StatsDump | K::StatsRestore => $f::<pb::StatsEntry>($($arg),*),
            K::IrmapCache => $f::<pb::IrmapCacheEntry>($($arg),*),
            K::Pages
            | K::Ifaddr
            | K::Route
            | K::Route6
            | K::Rule
            | K::Iptables
            | K::Ip6tables
            | K::Nftables
            | K::NetnfCt
            | K::NetnfExp
            | K::TmpfsImg
            | K::TmpfsDev => $raw,
        }
    }};
}

/// Every message type of the schema that some image kind holds, head messages included.
pub fn kind_messages() -> Vec<(ImageKind, String)> {
    let mut out = Vec::new();
    for kind in ImageKind::all() {
        for name in [kind.head_message_name(), kind.message_name()]
            .into_iter()
            .flatten()
        {
            out.push((kind, name.to_owned()));
        }
    }
    out
}

/// Keeps the pb import used in every test binary that includes this module.
pub fn _unused(_: pb::PagemapHead) {}
