use std::{fmt, sync::LazyLock};

use regex::Regex;

use super::{Digest, DigestError};

const REPO: &str =
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*";
const TAG: &str = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}";

static REPO_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{REPO}$")).expect("static regex"));
static TAG_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{TAG}$")).expect("static regex"));
static REGISTRY_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$",
    )
    .expect("static regex")
});
static MANIFEST_TAG_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!("^/v2/({REPO})/manifests/({TAG})$")).expect("static regex")
});
static MANIFEST_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^/v2/({REPO})/manifests/(.*)$")).expect("static regex"));
static BLOB_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^/v2/({REPO})/blobs/(.*)$")).expect("static regex"));

/// Why an image name cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Registry part is not a host[:port].
    #[error("invalid registry {0:?}")]
    Registry(String),
    /// Repository does not match the distribution grammar.
    #[error("invalid repository {0:?}")]
    Repository(String),
    /// Tag does not match the distribution grammar.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// Digest is malformed.
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
    /// Neither tag nor digest.
    #[error("reference {0:?} has neither tag nor digest")]
    NoTagOrDigest(String),
    /// A bare image ID such as `sha256:…`.
    #[error("{0:?} is an image ID, not a name")]
    ImageId(String),
}

/// An image reference: registry, repository and a tag and/or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host[:port], e.g. `docker.io`.
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest, if any.
    pub digest: Option<Digest>,
}

impl Reference {
    /// The digest if any, else the tag, else empty: what a request names, for display.
    pub fn digest_or_tag(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => String::new(),
        }
    }

    /// The routing key: the digest string when there is one, else `registry/repo:tag`.
    pub fn identifier(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => format!("{}/{}:{}", self.registry, self.repository, t),
            (None, None) => format!("{}/{}", self.registry, self.repository),
        }
    }

    /// The string registry filters are matched against: `registry/repo[:tag]`.
    pub fn filter_string(&self) -> String {
        match &self.tag {
            Some(t) => format!("{}/{}:{}", self.registry, self.repository, t),
            None => format!("{}/{}", self.registry, self.repository),
        }
    }

    /// The tag key `registry/repo:tag`, if tagged.
    pub fn tag_name(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{}", self.registry, self.repository, t))
    }

    /// Parses a containerd image name (`[registry/]repo[:tag][@digest]`).
    ///
    /// Names without a registry are normalised the way Docker does: `nginx` is
    /// `docker.io/library/nginx`, `user/app` is `docker.io/user/app`.
    pub fn parse_image_name(name: &str) -> Result<Reference, ReferenceError> {
        if name.starts_with("sha256:") || name.starts_with("sha512:") || name.starts_with("sha384:")
        {
            return Err(ReferenceError::ImageId(name.to_string()));
        }
        let (rest, digest) = match name.rsplit_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>()?)),
            None => (name, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag
            && !TAG_RE.is_match(t)
        {
            return Err(ReferenceError::Tag(t.to_string()));
        }
        let (registry, repository) = match path.split_once('/') {
            Some((first, repo))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[') =>
            {
                (first.to_string(), repo.to_string())
            }
            Some(_) => ("docker.io".to_string(), path.to_string()),
            None => ("docker.io".to_string(), format!("library/{path}")),
        };
        if !REGISTRY_RE.is_match(&registry) {
            return Err(ReferenceError::Registry(registry));
        }
        if !REPO_RE.is_match(&repository) {
            return Err(ReferenceError::Repository(repository));
        }
        if tag.is_none() && digest.is_none() {
            return Err(ReferenceError::NoTagOrDigest(name.to_string()));
        }
        Ok(Reference {
            registry,
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// What a registry request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v2/<repo>/manifests/<ref>`.
    Manifest,
    /// `/v2/<repo>/blobs/<digest>`.
    Blob,
}

impl Kind {
    /// Path segment for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifests",
            Kind::Blob => "blobs",
        }
    }
}

/// Why a request path is not a pull request this registry understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path matches no distribution route.
    #[error("path does not match a distribution route")]
    NoMatch,
    /// Tag request without `ns`.
    #[error("registry parameter needs to be set for tag references")]
    MissingRegistryForTag,
    /// Digest request without `ns`.
    #[error("reference needs to contain a registry")]
    MissingRegistry,
    /// `ns` is not a host[:port].
    #[error("invalid registry parameter {0:?}")]
    InvalidRegistry(String),
    /// Invalid digest in the path.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A parsed `/v2/…` pull request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributionPath {
    /// Manifest or blob.
    pub kind: Kind,
    /// The reference, with the registry taken from `ns`.
    pub reference: Reference,
}

impl DistributionPath {
    /// Parses a request path and its raw query (containerd adds `ns=<registry>`).
    ///
    /// The path is matched as received: percent-encoded characters never match the grammar, so
    /// encoded traversal attempts are rejected rather than decoded.
    pub fn parse(path: &str, query: Option<&str>) -> Result<DistributionPath, PathError> {
        let ns = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v.into_owned())
        });
        let registry = match ns {
            Some(ns) if ns.is_empty() => None,
            Some(ns) if !REGISTRY_RE.is_match(&ns) => return Err(PathError::InvalidRegistry(ns)),
            other => other,
        };
        if let Some(c) = MANIFEST_TAG_RE.captures(path) {
            let registry = registry.ok_or(PathError::MissingRegistryForTag)?;
            return Ok(DistributionPath {
                kind: Kind::Manifest,
                reference: Reference {
                    registry,
                    repository: c[1].to_string(),
                    tag: Some(c[2].to_string()),
                    digest: None,
                },
            });
        }
        let (kind, c) = if let Some(c) = MANIFEST_RE.captures(path) {
            (Kind::Manifest, c)
        } else if let Some(c) = BLOB_RE.captures(path) {
            (Kind::Blob, c)
        } else {
            return Err(PathError::NoMatch);
        };
        let digest: Digest = c[2].parse()?;
        let registry = registry.ok_or(PathError::MissingRegistry)?;
        Ok(DistributionPath {
            kind,
            reference: Reference {
                registry,
                repository: c[1].to_string(),
                tag: None,
                digest: Some(digest),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:b6d6089ca6c395fd563c2084f5dd7bc56a2f5e6a81413558c5be0083287a77e9";

    fn p(path: &str, q: Option<&str>) -> Result<DistributionPath, PathError> {
        DistributionPath::parse(path, q)
    }

    #[test]
    fn manifest_by_tag() {
        let dp = p("/v2/library/nginx/manifests/1.27", Some("ns=docker.io")).unwrap();
        assert_eq!(dp.kind, Kind::Manifest);
        assert_eq!(dp.reference.identifier(), "docker.io/library/nginx:1.27");
        assert_eq!(dp.reference.filter_string(), "docker.io/library/nginx:1.27");
        let dp = p("/v2/test/manifests/1", Some("ns=127.0.0.1%3A5000")).unwrap();
        assert_eq!(dp.reference.identifier(), "127.0.0.1:5000/test:1");
        assert_eq!(
            p("/v2/foo/manifests/latest", None),
            Err(PathError::MissingRegistryForTag)
        );
        assert_eq!(
            p("/v2/foo/manifests/latest", Some("x=1")),
            Err(PathError::MissingRegistryForTag)
        );
    }

    #[test]
    fn by_digest() {
        let dp = p(
            &format!("/v2/spegel-org/spegel/manifests/{D}"),
            Some("ns=ghcr.io"),
        )
        .unwrap();
        assert_eq!(dp.kind, Kind::Manifest);
        assert_eq!(dp.reference.identifier(), D);
        assert_eq!(dp.reference.filter_string(), "ghcr.io/spegel-org/spegel");
        let dp = p(&format!("/v2/a/b/c/blobs/{D}"), Some("ns=[fd00::1]:5000")).unwrap();
        assert_eq!(dp.kind, Kind::Blob);
        assert_eq!(dp.reference.registry, "[fd00::1]:5000");
        assert_eq!(
            p(&format!("/v2/foo/blobs/{D}"), None),
            Err(PathError::MissingRegistry)
        );
        assert_eq!(
            p("/v2/foo/blobs/latest", Some("ns=docker.io")),
            Err(PathError::Digest(DigestError::InvalidFormat))
        );
        assert_eq!(
            p("/v2/foo/blobs/sha256:abc", Some("ns=docker.io")),
            Err(PathError::Digest(DigestError::InvalidLength))
        );
        assert!(matches!(
            p(&format!("/v2/foo/blobs/{D}"), Some("ns=a/b")),
            Err(PathError::InvalidRegistry(_))
        ));
    }

    #[test]
    fn repo_grammar() {
        for ok in ["foo__bar", "foo_bar", "foo--bar", "a.b/c-d/e__f"] {
            assert!(
                p(&format!("/v2/{ok}/manifests/t"), Some("ns=x.io")).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "foo___bar",
            "Foo",
            "foo/",
            "-foo",
            "foo/../bar",
            "..",
            "foo%2F..%2Fbar",
            "foo//bar",
            "",
        ] {
            assert!(
                p(&format!("/v2/{bad}/manifests/t"), Some("ns=x.io")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn traversal_never_parses() {
        for path in [
            format!("/v2/foo/blobs/../../{D}"),
            format!("/v2/foo/blobs/{D}/.."),
            "/v2/foo/blobs/sha256:..%2f..%2fetc%2fpasswd".to_string(),
            format!("/v2/foo/blobs/sha256%3a{}", &D[7..]),
            format!("/v2/../foo/blobs/{D}"),
            format!("/v2/foo/blobs/{D}%00"),
            format!("/v2/foo/blobs/{D}/extra"),
            "/v2/foo/blobs/".to_string(),
            format!("/v2/foo/tags/{D}"),
            format!("/etc/v2/foo/blobs/{D}"),
        ] {
            assert!(p(&path, Some("ns=docker.io")).is_err(), "{path}");
        }
    }

    #[test]
    fn image_names() {
        let r = Reference::parse_image_name("docker.io/library/nginx:1.27").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/nginx", Some("1.27"))
        );
        let r = Reference::parse_image_name("nginx:latest").unwrap();
        assert_eq!(r.tag_name().unwrap(), "docker.io/library/nginx:latest");
        let r = Reference::parse_image_name("user/app:v1").unwrap();
        assert_eq!(r.tag_name().unwrap(), "docker.io/user/app:v1");
        let r = Reference::parse_image_name("127.0.0.1:5000/test:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "test")
        );
        let r = Reference::parse_image_name("localhost/app:1").unwrap();
        assert_eq!(r.registry, "localhost");
        let r = Reference::parse_image_name(&format!("[fd00::1]:5000/a/b:c@{D}")).unwrap();
        assert_eq!(r.registry, "[fd00::1]:5000");
        assert_eq!(r.tag.as_deref(), Some("c"));
        assert_eq!(r.identifier(), D);
        let r = Reference::parse_image_name(&format!("ghcr.io/x/y@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert!(Reference::parse_image_name(D).is_err());
        assert!(Reference::parse_image_name("ghcr.io/x/y").is_err());
        assert!(Reference::parse_image_name("ghcr.io/X/y:1").is_err());
        assert!(Reference::parse_image_name("ghcr.io/x/y:-bad").is_err());
        assert!(Reference::parse_image_name("ghcr.io/x/y@sha256:zz").is_err());
        assert!(Reference::parse_image_name("").is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(path in "/v2/\\PC{0,80}", q in proptest::option::of("\\PC{0,40}")) {
            let _ = DistributionPath::parse(&path, q.as_deref());
        }

        #[test]
        fn image_name_never_panics(name in "\\PC{0,80}") {
            let _ = Reference::parse_image_name(&name);
        }

        #[test]
        fn parsed_digest_paths_have_no_dots_or_slashes_in_hex(tail in "[a-z0-9:./%]{0,80}") {
            if let Ok(dp) = DistributionPath::parse(&format!("/v2/foo/blobs/{tail}"), Some("ns=x.io")) {
                let d = dp.reference.digest.unwrap();
                prop_assert!(!d.hex().contains('.') && !d.hex().contains('/'));
            }
        }
    }
}
