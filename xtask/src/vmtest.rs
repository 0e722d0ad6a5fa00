//! QEMU kernel matrix (issue 3): being written.
use anyhow::{Result, bail};

#[derive(clap::Args, Debug)]
pub struct VmtestArgs {}

pub fn vmtest(_args: &VmtestArgs) -> Result<()> {
    bail!("vmtest is not implemented yet")
}
