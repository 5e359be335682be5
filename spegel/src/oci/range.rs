use std::{fmt, str::FromStr};

/// A single HTTP byte range as requested (RFC 9110 subset: one range only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-end`, both inclusive.
    FromTo(u64, u64),
    /// `bytes=start-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Why a `Range` header cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Unit other than `bytes`.
    #[error("invalid range unit")]
    InvalidUnit,
    /// More than one range.
    #[error("multiple ranges not supported")]
    Multiple,
    /// Syntax error in a range spec.
    #[error("invalid range {0:?}")]
    Invalid(String),
    /// Start at or past the end of the content.
    #[error("start {start} is out of bounds for size {size}")]
    OutOfBounds {
        /// Requested start.
        start: u64,
        /// Content size.
        size: u64,
    },
    /// Ranges over empty content are unsatisfiable.
    #[error("size must be larger than zero")]
    EmptyContent,
}

/// Positions saturate here: no content is larger, and containerd offsets are `i64`.
const MAX_POS: u64 = i64::MAX as u64;

/// A position: `1*DIGIT` of any length is valid (RFC 9110 §14.1.1), so a huge value saturates
/// at [`MAX_POS`] instead of failing: `bytes=0-18446744073709551615` asks for everything.
fn parse_pos(s: &str, whole: &str) -> Result<u64, RangeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Invalid(whole.to_string()));
    }
    Ok(s.parse::<u64>().map_or(MAX_POS, |n| n.min(MAX_POS)))
}

impl FromStr for ByteRange {
    type Err = RangeError;

    fn from_str(header: &str) -> Result<Self, Self::Err> {
        let spec = header
            .trim()
            .strip_prefix("bytes=")
            .ok_or(RangeError::InvalidUnit)?;
        if spec.contains(',') {
            return Err(RangeError::Multiple);
        }
        let (start, end) = spec
            .trim()
            .split_once('-')
            .ok_or_else(|| RangeError::Invalid(header.to_string()))?;
        let (start, end) = (start.trim(), end.trim());
        match (start.is_empty(), end.is_empty()) {
            (true, true) => Err(RangeError::Invalid(header.to_string())),
            (true, false) => {
                let n = parse_pos(end, header)?;
                if n == 0 {
                    return Err(RangeError::Invalid(header.to_string()));
                }
                Ok(ByteRange::Suffix(n))
            }
            (false, true) => Ok(ByteRange::From(parse_pos(start, header)?)),
            (false, false) => {
                let (s, e) = (parse_pos(start, header)?, parse_pos(end, header)?);
                if s > e {
                    return Err(RangeError::Invalid(header.to_string()));
                }
                Ok(ByteRange::FromTo(s, e))
            }
        }
    }
}

impl fmt::Display for ByteRange {
    /// The `Range` header value, as sent when forwarding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteRange::FromTo(s, e) => write!(f, "bytes={s}-{e}"),
            ByteRange::From(s) => write!(f, "bytes={s}-"),
            ByteRange::Suffix(n) => write!(f, "bytes=-{n}"),
        }
    }
}

impl ByteRange {
    /// The satisfiable part of this range for content of `size` bytes.
    pub fn resolve(&self, size: u64) -> Result<ContentRange, RangeError> {
        if size == 0 {
            return Err(RangeError::EmptyContent);
        }
        let (start, end) = match *self {
            ByteRange::Suffix(n) => (size - n.min(size), size - 1),
            ByteRange::From(s) | ByteRange::FromTo(s, _) if s >= size => {
                return Err(RangeError::OutOfBounds { start: s, size });
            }
            ByteRange::From(s) => (s, size - 1),
            ByteRange::FromTo(s, e) => (s, e.min(size - 1)),
        };
        Ok(ContentRange { start, end, size })
    }
}

/// A satisfiable byte range of content with a known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte, inclusive.
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
    /// Total content size.
    pub size: u64,
}

impl ContentRange {
    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a content range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Parses a `Content-Range: bytes S-E/SIZE` header value (`*` sizes are rejected).
    pub fn parse_header(value: &str) -> Option<ContentRange> {
        let rest = value.trim().strip_prefix("bytes ")?;
        let (range, size) = rest.split_once('/')?;
        let (start, end) = range.split_once('-')?;
        let cr = ContentRange {
            start: start.parse().ok()?,
            end: end.parse().ok()?,
            size: size.parse().ok()?,
        };
        (cr.start <= cr.end && cr.end < cr.size).then_some(cr)
    }
}

impl fmt::Display for ContentRange {
    /// The `Content-Range` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bytes {}-{}/{}", self.start, self.end, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_vectors() {
        assert_eq!("bytes=1-3".parse(), Ok(ByteRange::FromTo(1, 3)));
        assert_eq!("bytes=5-".parse(), Ok(ByteRange::From(5)));
        assert_eq!("bytes=-4".parse(), Ok(ByteRange::Suffix(4)));
        assert_eq!(
            "items=1-3".parse::<ByteRange>(),
            Err(RangeError::InvalidUnit)
        );
        assert_eq!("1-3".parse::<ByteRange>(), Err(RangeError::InvalidUnit));
        assert_eq!(
            "bytes=1-3,5-6".parse::<ByteRange>(),
            Err(RangeError::Multiple)
        );
        for bad in [
            "bytes=-",
            "bytes=-0",
            "bytes=3-1",
            "bytes=a-3",
            "bytes=1-b",
            "bytes=",
            "bytes=5",
            "bytes=+1-2",
        ] {
            assert!(bad.parse::<ByteRange>().is_err(), "{bad}");
        }
        // Valid however large: positions saturate.
        assert_eq!(
            "bytes=0-18446744073709551615".parse(),
            Ok(ByteRange::FromTo(0, MAX_POS))
        );
        assert_eq!(
            "bytes=0-999999999999999999999999".parse(),
            Ok(ByteRange::FromTo(0, MAX_POS))
        );
        assert_eq!(
            "bytes=99999999999999999999-".parse(),
            Ok(ByteRange::From(MAX_POS))
        );
        assert_eq!(
            "bytes=-9223372036854775808".parse(),
            Ok(ByteRange::Suffix(MAX_POS))
        );
    }

    #[test]
    fn resolve_vectors() {
        let r = |s: &str| s.parse::<ByteRange>().unwrap();
        let cr = r("bytes=1-3").resolve(20).unwrap();
        assert_eq!((cr.start, cr.end, cr.len()), (1, 3, 3));
        assert_eq!(cr.to_string(), "bytes 1-3/20");
        assert_eq!(
            r("bytes=-4").resolve(20).unwrap().to_string(),
            "bytes 16-19/20"
        );
        assert_eq!(
            r("bytes=-40").resolve(20).unwrap().to_string(),
            "bytes 0-19/20"
        );
        assert_eq!(
            r("bytes=5-").resolve(20).unwrap().to_string(),
            "bytes 5-19/20"
        );
        assert_eq!(
            r("bytes=5-100").resolve(20).unwrap().to_string(),
            "bytes 5-19/20"
        );
        assert_eq!(r("bytes=19-19").resolve(20).unwrap().len(), 1);
        assert_eq!(
            r("bytes=20-").resolve(20),
            Err(RangeError::OutOfBounds {
                start: 20,
                size: 20
            })
        );
        assert_eq!(r("bytes=0-0").resolve(0), Err(RangeError::EmptyContent));
        assert_eq!(
            r("bytes=0-18446744073709551615")
                .resolve(20)
                .unwrap()
                .to_string(),
            "bytes 0-19/20"
        );
        assert_eq!(
            r("bytes=-18446744073709551615")
                .resolve(20)
                .unwrap()
                .to_string(),
            "bytes 0-19/20"
        );
        assert!(r("bytes=18446744073709551615-").resolve(20).is_err());
    }

    #[test]
    fn serialize_and_content_range_header() {
        assert_eq!(ByteRange::FromTo(1, 2).to_string(), "bytes=1-2");
        assert_eq!(ByteRange::From(7).to_string(), "bytes=7-");
        assert_eq!(ByteRange::Suffix(3).to_string(), "bytes=-3");
        assert_eq!(
            ContentRange::parse_header("bytes 1-3/20"),
            Some(ContentRange {
                start: 1,
                end: 3,
                size: 20
            })
        );
        assert_eq!(ContentRange::parse_header("bytes 1-3/*"), None);
        assert_eq!(ContentRange::parse_header("bytes 3-1/20"), None);
        assert_eq!(ContentRange::parse_header("bytes 1-20/20"), None);
    }

    proptest! {
        #[test]
        fn resolved_ranges_are_in_bounds(header in "\\PC{0,30}", size in 0u64..10_000) {
            if let Ok(r) = header.parse::<ByteRange>()
                && let Ok(cr) = r.resolve(size) {
                    prop_assert!(cr.start <= cr.end && cr.end < size);
                    prop_assert_eq!(cr.len(), cr.end - cr.start + 1);
                }
        }

        #[test]
        fn display_roundtrips(s in 0u64..1_000_000, len in 0u64..1_000_000) {
            for r in [ByteRange::FromTo(s, s + len), ByteRange::From(s), ByteRange::Suffix(len + 1)] {
                prop_assert_eq!(r.to_string().parse::<ByteRange>().unwrap(), r);
            }
        }
    }
}
