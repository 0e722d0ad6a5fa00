//! Everything that touches the machine: loading and attaching the programs and reading their
//! maps, BTF, what the kernel allows, sock_diag, network namespaces, /proc, containers and
//! sysctls. The facts it gathers are handed to the engine and the recorder as data.
pub mod attached;
pub mod bindscan;
pub mod btf;
pub mod cgroups;
pub mod clock;
pub mod conntrack;
pub mod container;
pub mod error;
pub mod facts;
pub mod gather;
pub mod klog;
pub mod loader;
pub mod netns;
pub mod plan;
pub mod preflight;
pub mod procinfo;
pub mod sockdiag;
pub mod symbols;
pub mod sysctl;

pub use error::{Error, Result};
