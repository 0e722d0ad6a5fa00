//! The variants a scenario runs under (untraced, portexhaust with each backend and flavour,
//! bpftrace), and which of them each scenario runs.
use super::{
    offer::Offer,
    procs::{Flavor, TracerKind},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Variant {
    Untraced,
    Traced(TracerKind),
}

impl Variant {
    pub fn name(&self) -> String {
        match self {
            Self::Untraced => "untraced".into(),
            Self::Traced(TracerKind::Portexhaust { backend, flavor }) => {
                format!("{}/{backend}", flavor.prefix())
            }
            Self::Traced(TracerKind::Bpftrace) => "bpftrace".into(),
        }
    }

    fn portexhaust(backend: &str, flavor: Flavor) -> Self {
        Self::Traced(TracerKind::Portexhaust {
            backend: backend.to_string(),
            flavor,
        })
    }
}

/// The variants each scenario runs.
pub(super) struct Sets {
    /// Churn and the two-process storm.
    pub(super) main: Vec<Variant>,
    /// The one-process storm: `main` and the hooks-only diagnostics.
    pub(super) storm: Vec<Variant>,
    /// Ownership tracking at scale: portexhaust only (bpftrace has none).
    pub(super) scale: Vec<Variant>,
}

impl Sets {
    pub(super) fn new(offer: &Offer, bpftrace: bool, diagnostics: bool) -> Self {
        let b = &offer.backends_ran;
        let mut main = vec![Variant::Untraced];
        main.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::Default)));
        if diagnostics {
            // The same tracer with `--no-blame`: failures only, what the blame machinery costs.
            main.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::NoBlame)));
        }
        if offer.catch {
            main.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::Catch)));
        }
        if offer.call_sites {
            // The default walks user stacks for call sites: the same without, for their cost.
            main.extend(
                b.iter()
                    .map(|b| Variant::portexhaust(b, Flavor::NoCallSites)),
            );
        }
        if offer.catch_nat {
            // The NAT hook does not depend on the backend: once, with the default one.
            let d = offer.default_backend.as_ref().or(b.first());
            main.extend(d.map(|d| Variant::portexhaust(d, Flavor::CatchNat)));
        }
        if bpftrace {
            main.push(Variant::Traced(TracerKind::Bpftrace));
        }
        let mut storm = main.clone();
        if diagnostics {
            // Every program attached, nothing reported.
            storm.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::HooksOnly)));
        }
        let scale = main
            .iter()
            .filter(|v| !matches!(v, Variant::Traced(TracerKind::Bpftrace)))
            .cloned()
            .collect();
        Self { main, storm, scale }
    }
}
