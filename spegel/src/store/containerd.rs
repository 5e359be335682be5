//! [`Store`](super::Store) backed by containerd's gRPC API and content directory.

/// Connection settings for [`ContainerdStore`].
#[derive(Debug, Clone)]
pub struct ContainerdStoreConfig {
    /// containerd socket path.
    pub socket: String,
    /// containerd namespace.
    pub namespace: String,
    /// Content store root; empty asks containerd.
    pub content_path: String,
}

/// containerd-backed store.
pub struct ContainerdStore;
