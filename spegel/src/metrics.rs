//! Prometheus metrics, with the original's names and labels.
