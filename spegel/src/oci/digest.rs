use std::{fmt, str::FromStr};

/// Hash algorithm of a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, 64 hex characters.
    Sha256,
    /// SHA-384, 96 hex characters.
    Sha384,
    /// SHA-512, 128 hex characters.
    Sha512,
}

impl Algorithm {
    /// Name as written in a digest string and in content store paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha384 => 96,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a valid digest; messages match go-digest's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not of the form `alg:hex`, or hex not lowercase.
    #[error("invalid checksum digest format")]
    InvalidFormat,
    /// Hex of the wrong length for the algorithm.
    #[error("invalid checksum digest length")]
    InvalidLength,
    /// A well-formed algorithm that is not sha256, sha384 or sha512.
    #[error("unsupported digest algorithm")]
    Unsupported,
}

/// A validated content digest: the algorithm plus lowercase hex of exactly the right length.
///
/// Validation happens before any file path is built from a digest, so `hex` is safe to use as a
/// path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The digest's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(sha2::Sha256::digest(data)),
        }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::InvalidFormat);
        };
        if alg.is_empty() || hex.is_empty() {
            return Err(DigestError::InvalidFormat);
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha384" => Algorithm::Sha384,
            "sha512" => Algorithm::Sha512,
            _ => {
                // go-digest: a well-formed but unknown algorithm is "unsupported", anything else "format".
                let alg_ok = alg.split(['+', '.', '_', '-']).all(|c| {
                    !c.is_empty()
                        && c.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                });
                let hex_ok = hex
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
                return Err(if alg_ok && hex_ok {
                    DigestError::Unsupported
                } else {
                    DigestError::InvalidFormat
                });
            }
        };
        if hex.len() != algorithm.hex_len() {
            return Err(DigestError::InvalidLength);
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::InvalidFormat);
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEX64: &str = "03ffdf45276dd38ffac79b0e9c6c14d89d9113ad783d5922580f4c66a3305591";

    #[test]
    fn valid_digests() {
        let d: Digest = format!("sha256:{HEX64}").parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex(), HEX64);
        assert_eq!(d.to_string(), format!("sha256:{HEX64}"));
        assert!(
            format!("sha384:{}", "a".repeat(96))
                .parse::<Digest>()
                .is_ok()
        );
        assert!(
            format!("sha512:{}", "0".repeat(128))
                .parse::<Digest>()
                .is_ok()
        );
    }

    #[test]
    fn invalid_digests() {
        use DigestError::*;
        let cases = [
            ("", InvalidFormat),
            ("sha256", InvalidFormat),
            ("sha256:", InvalidFormat),
            (":abc", InvalidFormat),
            ("latest", InvalidFormat),
            ("sha256:abc", InvalidLength),
            (&format!("sha256:{}", HEX64.to_uppercase()), InvalidFormat),
            (&format!("sha256:{}", &HEX64[..63]), InvalidLength),
            (&format!("sha256:{HEX64}0"), InvalidLength),
            (&format!("sha256:{}g", &HEX64[..63]), InvalidFormat),
            (&format!("md5:{HEX64}"), Unsupported),
            (&format!("sha256:../../{}", &HEX64[..58]), InvalidFormat),
            (&format!("sha256:{}/..", &HEX64[..61]), InvalidFormat),
            (&format!("SHA256:{HEX64}"), InvalidFormat),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Digest>(), Err(want), "{input}");
        }
    }

    #[test]
    fn sha256_of_matches_known_vector() {
        assert_eq!(
            Digest::sha256_of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_valid_hex_is_safe(s in "\\PC*") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                prop_assert_eq!(d.to_string(), s);
            }
        }

        #[test]
        fn roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let d = Digest::sha256_of(&bytes);
            prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
    }
}
