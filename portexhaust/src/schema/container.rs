//! Which container (or systemd unit) a process ran in, as events, holders and metrics name it.
//! Working it out from cgroups is the kernel layer's job (`kernel::container`).
use serde::{Deserialize, Serialize};

/// What ran the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Runtime {
    #[serde(rename = "docker")]
    Docker,
    #[serde(rename = "containerd")]
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    #[serde(rename = "podman")]
    Podman,
    /// A Kubernetes container whose runtime does not tag its cgroup: with the cgroupfs driver
    /// containerd and cri-dockerd both name it by the bare container id under `pod<uid>/`.
    #[serde(rename = "cri")]
    Cri,
    /// A systemd service or scope (including user sessions): `id` is the unit name.
    #[serde(rename = "systemd")]
    Systemd,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Podman => "podman",
            Self::Cri => "cri",
            Self::Systemd => "systemd",
        }
    }
}

/// The container (or unit) a cgroup belongs to. Serialises as `{"runtime","id","pod"}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub runtime: Runtime,
    /// Full 64-hex container id, or the systemd unit name.
    pub id: String,
    /// Kubernetes pod UID (with dashes), when the cgroup lies under a pod.
    #[serde(default)]
    pub pod: Option<String>,
}

impl ContainerInfo {
    /// Short form for the human output: `docker:0123456789ab`, or the unit name.
    pub fn short(&self) -> String {
        match self.runtime {
            Runtime::Systemd => self.id.clone(),
            r => format!("{}:{}", r.name(), &self.id[..self.id.len().min(12)]),
        }
    }
}
