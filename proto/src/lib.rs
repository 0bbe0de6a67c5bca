//! The dmar.v1 wire contract: generated messages, clients and servers for the Control and
//! ATS link services (`dmar/v1/dmar.proto` is the source of truth, with a comment on every
//! message and field), plus the encoded file descriptor set for gRPC reflection.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// Generated code for package `dmar.v1`.
pub mod v1 {
    tonic::include_proto!("dmar.v1");
}

/// The encoded `FileDescriptorSet` of `dmar.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dmar_v1_descriptor.bin"));
