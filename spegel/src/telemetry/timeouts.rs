//! Timeouts stretched by measured peer RTTs, with the configured values as the floor: a LAN
//! keeps its fast miss, a cluster whose nodes are tens of milliseconds apart still gets hits.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::NetTelemetry;

/// A DHT lookup's first provider needs two round trips (ask the closest peers, get the
/// record); twice that leaves room for scheduling and a slower peer.
const RESOLVE_RTTS: u32 = 4;
/// A fetch's headers need a connect and a request round trip; twice that again.
const RACE_RTTS: u32 = 4;
/// A hedge waits at least the connect and request round trips of the first fetch.
const HEDGE_RTTS: u32 = 2;
/// Longest adapted resolve or race timeout: beyond this, falling back upstream is better.
const MAX_ADAPTED: Duration = Duration::from_secs(2);
/// Longest adapted hedge floor (the hedger's own upper bound).
const MAX_HEDGE_FLOOR: Duration = Duration::from_millis(500);
/// How long a computed RTT percentile is reused.
const REFRESH: Duration = Duration::from_secs(1);

/// The `q` quantile (0..=1, nearest rank) of `values`; `None` when empty.
pub fn quantile(values: &mut [Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.saturating_sub(1).min(values.len() - 1)])
}

/// `configured`, raised to `rtts` × `p90` (capped at `cap`) when peers are that far away.
pub fn adapt(configured: Duration, p90: Option<Duration>, rtts: u32, cap: Duration) -> Duration {
    match p90 {
        Some(rtt) => configured.max((rtt * rtts).min(cap)),
        None => configured,
    }
}

/// Resolve, race and hedge timeouts from the RTTs of the peers a telemetry source knows.
pub struct AdaptiveTimeouts {
    telemetry: Option<Arc<dyn NetTelemetry>>,
    cached: Mutex<Option<(Instant, Option<Duration>)>>,
}

impl AdaptiveTimeouts {
    /// Adapts to `telemetry`; with `None` every timeout is the configured one.
    pub fn new(telemetry: Option<Arc<dyn NetTelemetry>>) -> Self {
        AdaptiveTimeouts {
            telemetry,
            cached: Mutex::new(None),
        }
    }

    /// The 90th percentile of the known peers' smoothed RTTs.
    pub fn rtt_p90(&self) -> Option<Duration> {
        let telemetry = self.telemetry.as_ref()?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, value)) = *cached
            && at.elapsed() < REFRESH
        {
            return value;
        }
        let mut rtts: Vec<Duration> = telemetry
            .peers()
            .into_iter()
            .map(|(_, s)| s.srtt.max(s.min_rtt))
            .filter(|d| !d.is_zero())
            .collect();
        let value = quantile(&mut rtts, 0.9);
        *cached = Some((Instant::now(), value));
        value
    }

    /// How long to wait for a provider while nothing is in flight.
    pub fn resolve_timeout(&self, configured: Duration) -> Duration {
        adapt(configured, self.rtt_p90(), RESOLVE_RTTS, MAX_ADAPTED)
    }

    /// The lower bound of a race's wait for response headers.
    pub fn race_floor(&self, configured: Duration) -> Duration {
        adapt(configured, self.rtt_p90(), RACE_RTTS, MAX_ADAPTED)
    }

    /// The hedge delay, no shorter than the first fetch's round trips.
    pub fn hedge_delay(&self, measured: Duration) -> Duration {
        adapt(measured, self.rtt_p90(), HEDGE_RTTS, MAX_HEDGE_FLOOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::StaticTelemetry;
    use std::net::IpAddr;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cluster(rtts: &[u64]) -> Arc<dyn NetTelemetry> {
        Arc::new(StaticTelemetry::new(
            rtts.iter()
                .enumerate()
                .map(|(i, r)| {
                    let ip: IpAddr = format!("10.0.0.{}", i + 1).parse().unwrap();
                    (ip, StaticTelemetry::rtt(Duration::from_micros(*r)))
                })
                .collect(),
        ))
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&mut [], 0.9), None);
        let mut v: Vec<Duration> = (1..=10).map(ms).collect();
        assert_eq!(quantile(&mut v, 0.9), Some(ms(9)));
        assert_eq!(quantile(&mut v, 0.5), Some(ms(5)));
        assert_eq!(quantile(&mut [ms(3)], 0.9), Some(ms(3)));
    }

    #[test]
    fn lan_keeps_the_configured_floor() {
        let t = AdaptiveTimeouts::new(Some(cluster(&[100, 150, 200])));
        assert_eq!(t.resolve_timeout(ms(20)), ms(20));
        assert_eq!(t.race_floor(ms(100)), ms(100));
        assert_eq!(t.hedge_delay(ms(10)), ms(10));
    }

    #[test]
    fn stretched_cluster_stretches_the_timeouts() {
        // Every peer 20 ms away: the 20 ms default would end before the DHT's first answer.
        let t = AdaptiveTimeouts::new(Some(cluster(&[20_000, 20_500, 21_000, 19_800])));
        assert_eq!(t.resolve_timeout(ms(20)), ms(84));
        assert_eq!(t.race_floor(ms(100)), ms(100));
        assert_eq!(t.hedge_delay(ms(10)), ms(42));
        let far = AdaptiveTimeouts::new(Some(cluster(&[50_000; 5])));
        assert_eq!(far.resolve_timeout(ms(20)), ms(200));
        assert_eq!(far.race_floor(ms(100)), ms(200));
        // A larger configured value always wins.
        assert_eq!(far.resolve_timeout(ms(500)), ms(500));
    }

    #[test]
    fn bounded_and_neutral_without_data() {
        let t = AdaptiveTimeouts::new(Some(cluster(&[3_000_000])));
        assert_eq!(t.resolve_timeout(ms(20)), MAX_ADAPTED);
        assert_eq!(t.hedge_delay(ms(10)), MAX_HEDGE_FLOOR);
        let none = AdaptiveTimeouts::new(None);
        assert_eq!(none.resolve_timeout(ms(20)), ms(20));
        let empty = AdaptiveTimeouts::new(Some(cluster(&[])));
        assert_eq!(empty.race_floor(ms(100)), ms(100));
    }
}
