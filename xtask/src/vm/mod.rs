//! Booting Debian kernels under QEMU with a busybox initramfs: the machinery of `cargo xtask
//! vmtest` (../vmtest.rs) and of `cargo xtask bench --vm` (../bench/vm.rs).
pub mod cpio;
pub mod initramfs;
pub mod kernels;
pub mod protocol;
pub mod qemu;
