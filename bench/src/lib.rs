//! Testbed and benchmarks for spegel: real containerd, real registry, network namespaces.

pub mod browser;
pub mod cluster;
pub mod containerd;
pub mod daemon;
pub mod delay;
pub mod forward;
pub mod http;
pub mod image;
pub mod images;
pub mod load;
pub mod netns;
pub mod p2p;
pub mod peers;
pub mod process;
pub mod pull;
pub mod registry;
pub mod relay;
pub mod routing;
pub mod serve;
pub mod soak;
pub mod stats;
