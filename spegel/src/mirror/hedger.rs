//! Hedge timing from the distribution of past peer response-header latencies.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

/// Hedge delay while no latency has been observed.
pub const INITIAL_HEDGE: Duration = Duration::from_millis(50);
/// Lower bound of the hedge delay: on loopback-fast clusters a tiny p90 would hedge every fetch.
const MIN_HEDGE: Duration = Duration::from_millis(10);
/// Upper bound of latencies considered (as in the original's 0–500 ms histogram).
const MAX_HEDGE: Duration = Duration::from_millis(500);
/// Samples kept; older ones are forgotten so the estimate follows the cluster.
const WINDOW: usize = 512;

/// Latency percentiles shared by all forwards of one mirror.
#[derive(Debug, Default)]
pub struct Hedger {
    samples: Mutex<VecDeque<Duration>>,
}

impl Hedger {
    /// A hedger with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the header latency of a successful fetch.
    pub fn observe(&self, latency: Duration) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == WINDOW {
            samples.pop_front();
        }
        samples.push_back(latency.min(MAX_HEDGE));
    }

    /// The 90th percentile of observed latencies, or [`INITIAL_HEDGE`] without data.
    pub fn p90(&self) -> Duration {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.is_empty() {
            return INITIAL_HEDGE;
        }
        let mut sorted: Vec<Duration> = samples.iter().copied().collect();
        sorted.sort_unstable();
        let idx = (sorted.len() * 9).div_ceil(10).saturating_sub(1);
        sorted[idx.min(sorted.len() - 1)]
    }

    /// How long to wait for response headers before also asking the next peer.
    pub fn hedge_delay(&self) -> Duration {
        self.p90().clamp(MIN_HEDGE, MAX_HEDGE)
    }

    /// How long a race may wait for response headers once its first fetch started.
    pub fn race_timeout(&self, floor: Duration) -> Duration {
        (self.p90() * 2).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_bounds() {
        let h = Hedger::new();
        assert_eq!(h.hedge_delay(), INITIAL_HEDGE);
        assert_eq!(
            h.race_timeout(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        for ms in 1..=10 {
            h.observe(Duration::from_millis(ms * 20));
        }
        assert_eq!(h.p90(), Duration::from_millis(180));
        assert_eq!(
            h.race_timeout(Duration::from_millis(100)),
            Duration::from_millis(360)
        );
        let fast = Hedger::new();
        fast.observe(Duration::from_micros(300));
        assert_eq!(fast.hedge_delay(), MIN_HEDGE);
        let slow = Hedger::new();
        slow.observe(Duration::from_secs(9));
        assert_eq!(slow.hedge_delay(), MAX_HEDGE);
    }
}
