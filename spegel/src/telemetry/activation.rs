//! Whether kernel telemetry runs (`--ebpf`) and which selector orders peers
//! (`--peer-selection`): pure decisions, so every combination is testable without a kernel.

use std::fmt::Display;

/// `--ebpf`: whether to load the kernel probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EbpfMode {
    /// Load them; if that fails, log why and continue with userspace measurements.
    #[default]
    Auto,
    /// Load them; failing to is fatal (for users who want to know).
    On,
    /// Do not load them.
    Off,
}

/// `--peer-selection`: the policy that orders a key's providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerSelection {
    /// Expected cost from telemetry: RTT, throughput, load and failures.
    Telemetry,
    /// Time to response headers of earlier fetches only.
    Latency,
    /// Least used first, round robin (the original Spegel's order), for comparisons.
    LeastUsed,
}

/// Which telemetry source the daemon runs with.
#[derive(Debug)]
pub enum Activation<T> {
    /// The kernel probes loaded.
    Kernel(T),
    /// Userspace measurements only, and why.
    Userspace {
        /// One line for the log.
        reason: String,
    },
}

impl<T> Activation<T> {
    /// Whether the kernel probes are active (`spegel_ebpf_enabled`).
    pub fn ebpf_enabled(&self) -> bool {
        matches!(self, Activation::Kernel(_))
    }
}

/// Why telemetry cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `--ebpf=on` and the probes could not be loaded.
    #[error("--ebpf=on but the eBPF probes could not be loaded: {0}")]
    EbpfRequired(String),
}

/// Applies `mode` to the result of `load` (called only unless `mode` is off).
pub fn decide<T, E: Display>(
    mode: EbpfMode,
    load: impl FnOnce() -> Result<T, E>,
) -> Result<Activation<T>, TelemetryError> {
    match mode {
        EbpfMode::Off => Ok(Activation::Userspace {
            reason: "eBPF disabled by --ebpf=off".into(),
        }),
        EbpfMode::Auto => Ok(match load() {
            Ok(probes) => Activation::Kernel(probes),
            Err(e) => Activation::Userspace {
                reason: format!("eBPF probes not loaded: {e}"),
            },
        }),
        EbpfMode::On => load()
            .map(Activation::Kernel)
            .map_err(|e| TelemetryError::EbpfRequired(e.to_string())),
    }
}

/// The selector to run: the flag if given, else the telemetry selector whenever a telemetry
/// source exists (userspace counts), else the latency selector.
pub fn choose_selection(flag: Option<PeerSelection>, telemetry_present: bool) -> PeerSelection {
    match flag {
        Some(s) => s,
        None if telemetry_present => PeerSelection::Telemetry,
        None => PeerSelection::Latency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_loader_results() {
        let ok = || Ok::<_, String>(7);
        let fail = || Err::<u32, _>("no CAP_BPF".to_string());
        assert!(matches!(
            decide(EbpfMode::Auto, ok),
            Ok(Activation::Kernel(7))
        ));
        match decide(EbpfMode::Auto, fail) {
            Ok(Activation::Userspace { reason }) => assert!(reason.contains("no CAP_BPF")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(EbpfMode::On, ok),
            Ok(Activation::Kernel(7))
        ));
        match decide(EbpfMode::On, fail) {
            Err(e) => assert!(e.to_string().contains("no CAP_BPF"), "{e}"),
            other => panic!("{other:?}"),
        }
        let mut called = false;
        let off = decide(EbpfMode::Off, || {
            called = true;
            Ok::<_, String>(1)
        })
        .unwrap();
        assert!(!called, "off must not try to load");
        assert!(!off.ebpf_enabled());
        match off {
            Activation::Userspace { reason } => assert!(reason.contains("--ebpf=off")),
            Activation::Kernel(_) => panic!("off loaded the probes"),
        }
    }

    #[test]
    fn selection_defaults() {
        assert_eq!(choose_selection(None, true), PeerSelection::Telemetry);
        assert_eq!(choose_selection(None, false), PeerSelection::Latency);
        assert_eq!(
            choose_selection(Some(PeerSelection::LeastUsed), true),
            PeerSelection::LeastUsed
        );
        assert_eq!(
            choose_selection(Some(PeerSelection::Telemetry), false),
            PeerSelection::Telemetry
        );
    }
}
