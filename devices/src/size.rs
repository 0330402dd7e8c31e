//! Sizes on the command line: bytes, or a number with a binary suffix.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error(
        "'{0}' is not a size: use bytes or a number with K, M, G or T (binary units), e.g. 512M"
    )]
    Invalid(String),
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parses "4096", "64K", "512M", "2G", "1T" (also "512MiB", "512m").
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => SizeError::Overflow(s.to_string()),
            _ => SizeError::Invalid(s.to_string()),
        })?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Invalid(s.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size(" 1T "), Ok(1 << 40));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "M", "12Q", "-1", "1.5G", "0x10", "1 G"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }
}
