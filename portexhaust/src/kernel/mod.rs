//! Everything that touches the machine's kernel: loading and attaching the programs, reading
//! their maps, BTF, and what the kernel allows.
pub mod attached;
pub mod btf;
pub mod loader;
pub mod plan;
pub mod preflight;
