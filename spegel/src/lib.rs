//! Spegel: a stateless, cluster-local, peer-to-peer OCI registry mirror.
//!
//! Layers, lowest first (a module only imports modules listed before it; the `layering` test
//! enforces it): [`net`], [`metrics`], [`http`], [`oci`], [`auth`], [`store`], [`routing`],
//! [`advertise`], [`mirror`], [`registry`], [`admin`], then the entry points: [`config`] (flags),
//! [`app`] (the `registry` daemon), [`host_config`] (`configuration`), [`cleanup`].

pub mod activity;
pub mod admin;
pub mod advertise;
pub mod app;
pub mod auth;
pub mod cleanup;
pub mod config;
pub mod host_config;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod oci;
pub mod registry;
pub mod routing;
pub mod store;

#[cfg(test)]
mod layering;
pub mod telemetry;
