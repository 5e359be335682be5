//! Which references are mirrored: the registry whitelist and regex filters (§2.10).

use regex::Regex;

use super::Reference;

/// Why filters could not be built from flags.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A `--mirrored-registries` entry is not a URL with a host.
    #[error("invalid mirrored registry {0:?}: expected a URL such as https://docker.io")]
    Registry(String),
    /// A `--registry-filters` entry is not a valid regex.
    #[error("invalid registry filter {pattern:?}")]
    Regex {
        /// The offending pattern.
        pattern: String,
        /// Regex compile error.
        source: regex::Error,
    },
}

/// Filters built from `--mirrored-registries` and `--registry-filters`.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    whitelist: Option<Vec<String>>,
    regexes: Vec<Regex>,
}

impl Filters {
    /// Builds filters; an empty registry list, `*` or `_default` mirror every registry.
    pub fn new(
        mirrored_registries: &[String],
        registry_filters: &[String],
    ) -> Result<Self, FilterError> {
        let whitelist = if mirrored_registries.is_empty()
            || mirrored_registries
                .iter()
                .any(|r| r == "*" || r == "_default")
        {
            None
        } else {
            let mut hosts = Vec::with_capacity(mirrored_registries.len());
            for r in mirrored_registries {
                let url = url::Url::parse(r).map_err(|_| FilterError::Registry(r.clone()))?;
                let host = url
                    .host_str()
                    .ok_or_else(|| FilterError::Registry(r.clone()))?;
                hosts.push(match url.port() {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_string(),
                });
            }
            Some(hosts)
        };
        let regexes = registry_filters
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                Regex::new(p).map_err(|source| FilterError::Regex {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Filters { whitelist, regexes })
    }

    /// The `--mirrored-registries` allow-list (host and port), `None` when everything is mirrored.
    pub fn registries(&self) -> Option<&[String]> {
        self.whitelist.as_deref()
    }

    /// Whether `reference` must not be mirrored nor advertised.
    pub fn is_filtered(&self, reference: &Reference) -> bool {
        if let Some(hosts) = &self.whitelist
            && !hosts.contains(&reference.registry)
        {
            return true;
        }
        if self.regexes.is_empty() {
            return false;
        }
        let s = reference.filter_string();
        self.regexes.iter().any(|r| r.is_match(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> Reference {
        Reference::parse_image_name(name).unwrap()
    }

    #[test]
    fn whitelist_and_regexes() {
        let f = Filters::new(&[], &[]).unwrap();
        assert!(!f.is_filtered(&r("docker.io/library/nginx:latest")));

        let f = Filters::new(
            &["https://docker.io".into(), "http://127.0.0.1:5000".into()],
            &[],
        )
        .unwrap();
        assert!(!f.is_filtered(&r("docker.io/library/nginx:1")));
        assert!(!f.is_filtered(&r("127.0.0.1:5000/test:1")));
        assert!(f.is_filtered(&r("ghcr.io/a/b:1")));
        assert!(f.is_filtered(&r("127.0.0.1:5001/test:1")));

        let f = Filters::new(&["*".into(), "https://docker.io".into()], &[]).unwrap();
        assert!(!f.is_filtered(&r("ghcr.io/a/b:1")));

        let f = Filters::new(&[], &[":latest$".into(), r"^docker\.io/.+:dev$".into()]).unwrap();
        assert!(f.is_filtered(&r("ghcr.io/a/b:latest")));
        assert!(!f.is_filtered(&r("ghcr.io/a/b:latest2")));
        assert!(f.is_filtered(&r("docker.io/a/b:dev")));
        assert!(!f.is_filtered(&r("ghcr.io/a/b:dev")));
        // Digest references match on registry/repo only.
        let mut digest_ref = r("ghcr.io/a/b:latest");
        digest_ref.tag = None;
        assert!(!f.is_filtered(&digest_ref));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Filters::new(&["not a url".into()], &[]).is_err());
        assert!(Filters::new(&[], &["(".into()]).is_err());
    }
}
