//! Names and sizes as users type them: `VOL`, `VOL@SNAP`, `64K`, `1G`.

use crate::error::{Error, Result};

/// Longest volume or snapshot name.
pub const NAME_BYTES_MAX: usize = 64;

/// Checks a volume or snapshot name: `[A-Za-z0-9._-]{1,64}`, and not `.` or `..`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if name == "." || name == ".." {
        return Err(Error::ReservedName {
            kind,
            name: name.to_string(),
        });
    }
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !ok_chars {
        return Err(Error::BadName {
            kind,
            name: name.chars().take(80).collect(),
        });
    }
    Ok(())
}

/// Splits `VOL@SNAP` into its parts; `VOL` alone gives `(VOL, None)`. Both parts are validated.
pub fn parse_target(text: &str) -> Result<(String, Option<String>)> {
    match text.split_once('@') {
        Some((vol, snap)) => {
            validate_name("volume", vol)?;
            validate_name("snapshot", snap)?;
            Ok((vol.to_string(), Some(snap.to_string())))
        }
        None => {
            validate_name("volume", text)?;
            Ok((text.to_string(), None))
        }
    }
}

/// Parses `4096`, `64K`, `1.5G`-free forms: an integer with an optional `K M G T` suffix
/// (powers of 1024; a trailing `B` or `iB` is accepted, e.g. `64KiB`).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || Error::BadSize(text.chars().take(80).collect());
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let too_large = || Error::SizeTooLarge(text.chars().take(80).collect());
    // Only digits: the parse fails only by overflowing.
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    n.checked_mul(1u64 << shift).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, want) in [
            ("4096", Some(4096)),
            ("64K", Some(65536)),
            ("64KiB", Some(65536)),
            ("1M", Some(1 << 20)),
            ("2G", Some(2 << 30)),
            ("1T", Some(1 << 40)),
            ("", None),
            ("K", None),
            ("-1", None),
            ("1.5G", None),
            ("12X", None),
            ("99999999999999999999", None),
            ("16777216T", None),
        ] {
            assert_eq!(parse_size(text).ok(), want, "{text}");
        }
        // Too large is said so, not "invalid".
        for text in ["99999999T", "99999999999999999999", "16777216T"] {
            assert!(
                matches!(parse_size(text), Err(Error::SizeTooLarge(_))),
                "{text}"
            );
        }
        assert!(matches!(parse_size("1.5G"), Err(Error::BadSize(_))));
    }

    #[test]
    fn names() {
        for good in ["a", "vol-1", "A.b_c", &"x".repeat(64)] {
            validate_name("volume", good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "a@b", &"x".repeat(65)] {
            assert!(validate_name("volume", bad).is_err(), "{bad}");
        }
        // Every character of "." and ".." is allowed: they are refused as reserved.
        for reserved in [".", ".."] {
            let e = validate_name("snapshot", reserved).unwrap_err();
            assert!(e.to_string().contains("are reserved"), "{e}");
        }
        assert_eq!(parse_target("v@s").unwrap(), ("v".into(), Some("s".into())));
        assert_eq!(parse_target("v").unwrap(), ("v".into(), None));
        assert!(parse_target("v@").is_err());
        assert!(parse_target("@s").is_err());
        assert!(parse_target("v@s@t").is_err());
    }
}
