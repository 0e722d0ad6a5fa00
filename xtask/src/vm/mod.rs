//! Pieces of `cargo xtask vmtest` (see ../vmtest.rs for the command itself).
pub mod cpio;
pub mod initramfs;
pub mod kernels;
pub mod protocol;
pub mod qemu;
