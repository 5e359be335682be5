//! The OCI registry HTTP server.
