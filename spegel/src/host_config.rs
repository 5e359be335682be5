//! `configuration`: writes containerd `hosts.toml` mirror configuration.
