//! Spegel: a stateless, cluster-local, peer-to-peer OCI registry mirror.

pub mod activity;
pub mod admin_ui;
pub mod advertise;
pub mod auth;
pub mod cleanup;
pub mod config;
pub mod host_config;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod registry;
pub mod routing;
pub mod store;
