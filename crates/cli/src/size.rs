//! Parsing sizes (`64M`, `1.5G`, `4096`) and byte values (`0x5a`, `90`) from the command line.

/// The size syntax as `--help` (through `concat!`) and the size errors both say it: one text,
/// so the two cannot list different suffixes.
macro_rules! size_syntax {
    () => {
        "a number with an optional fraction and an optional suffix K, M, G, T, P or E (powers of \
         1024; lower case and KiB, MiB, ... accepted; B for bytes), e.g. 64M, 1.5G, 512K, or a \
         plain byte count (also 0x hex)"
    };
}
pub(crate) use size_syntax;

/// [`size_syntax!`] as a constant, for messages.
pub const SIZE_SYNTAX: &str = size_syntax!();

/// Parses a size the way `qemu-img` does ([`SIZE_SYNTAX`]). The result must be a whole number
/// of bytes. Hex (`0x...`) is accepted for plain byte counts, which helps with offsets.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|e| format!("invalid size {s:?}: {e}"));
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" | "kiB" => 10,
        "m" | "M" | "MiB" => 20,
        "g" | "G" | "GiB" => 30,
        "t" | "T" | "TiB" => 40,
        "p" | "P" | "PiB" => 50,
        "e" | "E" | "EiB" => 60,
        _ => return Err(format!("invalid size {s:?}: unknown suffix {suffix:?}; a size is {SIZE_SYNTAX}")),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(format!("invalid size {s:?}: no number"));
    }
    let too_big = || format!("invalid size {s:?}: too large");
    let int_val: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| too_big())? };
    let mut bytes = int_val.checked_mul(1u64 << shift).ok_or_else(too_big)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(format!("invalid size {s:?}: too many decimals"));
        }
        let f: u128 = frac.parse().map_err(|_| format!("invalid size {s:?}"))?;
        let scaled = f * (1u128 << shift);
        let denom = 10u128.pow(frac.len() as u32);
        if !scaled.is_multiple_of(denom) {
            return Err(format!("invalid size {s:?}: not a whole number of bytes"));
        }
        bytes =
            bytes.checked_add(u64::try_from(scaled / denom).map_err(|_| too_big())?).ok_or_else(too_big)?;
    }
    Ok(bytes)
}

/// Parses a size that must fit a `u32` (block sizes).
pub fn parse_size_u32(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("{s:?} is too large"))
}

/// Parses one byte: decimal (`90`) or hex (`0x5a`).
pub fn parse_byte(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("invalid byte {s:?}: expected 0..255 or 0x00..0xff"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("100B"), Ok(100));
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    /// Every suffix the syntax text names is accepted, in both cases and as KiB..., and the
    /// error for an unknown one carries that same text.
    #[test]
    fn the_syntax_text_and_the_parser_agree() {
        // The suffixes as the text lists them: "suffix K, M, G, T, P or E (".
        let list = SIZE_SYNTAX.split_once("suffix ").unwrap().1.split_once(" (").unwrap().0;
        let named: Vec<&str> = list.split([',', ' ']).filter(|w| !w.is_empty() && *w != "or").collect();
        assert_eq!(named, ["K", "M", "G", "T", "P", "E"], "{SIZE_SYNTAX}");
        for (i, suffix) in named.iter().enumerate() {
            let shift = 10 * (i as u32 + 1);
            for s in [suffix.to_string(), suffix.to_lowercase(), format!("{suffix}iB")] {
                assert_eq!(parse_size(&format!("1{s}")), Ok(1u64 << shift), "1{s}");
            }
        }
        assert_eq!(parse_size("7B"), Ok(7));
        let e = parse_size("12Q").unwrap_err();
        assert!(e.contains(SIZE_SYNTAX), "{e}");
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_byte("0x5a"), Ok(0x5a));
        assert_eq!(parse_byte("90"), Ok(90));
        assert!(parse_byte("256").is_err());
    }
}
