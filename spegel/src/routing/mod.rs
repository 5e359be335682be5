//! Content routing: who in the cluster can serve a digest or tag.
