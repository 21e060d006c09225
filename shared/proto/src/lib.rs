//! Generated protobuf messages and gRPC clients and servers for the Bulkhead
//! API (`proto/bulkhead/<service>/v1`), and the file descriptor set that every
//! server registers with reflection.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

macro_rules! package {
    ($name:ident, $pkg:literal) => {
        pub mod $name {
            pub mod v1 {
                tonic::include_proto!($pkg);
            }
        }
    };
}

package!(audit, "bulkhead.audit.v1");
package!(dispatcher, "bulkhead.dispatcher.v1");
package!(identity, "bulkhead.identity.v1");
package!(sandbox, "bulkhead.sandbox.v1");
package!(sealed, "bulkhead.sealed.v1");

/// The encoded `FileDescriptorSet` of every Bulkhead proto.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bulkhead_descriptor.bin"));
