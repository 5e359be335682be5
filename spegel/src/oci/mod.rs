//! OCI distribution: digests, references, request paths, byte ranges, error bodies, which
//! references are mirrored ([`Filters`]) and the response heads both the local registry and the
//! mirror send ([`response`]).

mod digest;
mod error;
mod filter;
mod media_type;
mod range;
mod reference;
pub mod response;

pub use digest::{Algorithm, Digest, DigestError};
pub use error::{ErrorCode, OciError};
pub use filter::{FilterError, Filters};
pub use media_type::{MANIFEST_MEDIA_TYPES, fingerprint_media_type, is_manifest_media_type};
pub use range::{ByteRange, ContentRange, RangeError};
pub use reference::{DistributionPath, Kind, PathError, Reference, ReferenceError};
pub use response::{MIRRORED_HEADER, SERVED_BY_HEADER, not_found_anywhere, oci_error};

/// Media type served when nothing better is known.
pub const OCTET_STREAM: &str = "application/octet-stream";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
