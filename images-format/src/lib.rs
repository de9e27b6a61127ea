//! CRIU-compatible checkpoint images.
#![forbid(unsafe_code)]

/// The protobuf messages of the image format, generated from `proto/`.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}

/// The encoded `FileDescriptorSet` of every message in `proto/`, for generic decoding.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));
