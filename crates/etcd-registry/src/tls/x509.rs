//! Just enough DER reading to explain why a certificate cannot be used: its
//! X.509 version, validity and extended key usage. Acceptance itself is
//! decided by rustls (what tonic runs at connect); this only names the cause.

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CertInfo {
    /// 1, 2 or 3.
    pub(super) version: u8,
    /// Seconds since the Unix epoch, and as written (UTC).
    pub(super) not_before: (i64, String),
    pub(super) not_after: (i64, String),
    /// The extendedKeyUsage purposes (DER OID contents), `None` without the
    /// extension (any purpose).
    pub(super) ext_key_usage: Option<Vec<Vec<u8>>>,
}

/// id-kp-clientAuth, 1.3.6.1.5.5.7.3.2.
pub(super) const CLIENT_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 2];
/// id-kp-serverAuth, 1.3.6.1.5.5.7.3.1.
pub(super) const SERVER_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 1];
/// anyExtendedKeyUsage, 2.5.29.37.0.
pub(super) const ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0];
/// id-ce-extKeyUsage, 2.5.29.37.
const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT` (version) and `[3] EXPLICIT` (extensions) in a TBSCertificate.
const CTX0: u8 = 0xa0;
const CTX3: u8 = 0xa3;

/// One TLV: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    // Multi-byte tags never occur in the parts of a certificate read here.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = tlv(input)?;
    (t == tag).then_some((content, rest))
}

/// Reads a DER certificate; `None` if it is not one.
pub(super) fn parse(der: &[u8]) -> Option<CertInfo> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let (version, rest) = match tlv(tbs)? {
        (CTX0, explicit, rest) => {
            let (int, _) = expect(explicit, INTEGER)?;
            (int.last().copied()?.checked_add(1)?, rest)
        }
        _ => (1, tbs),
    };
    let (_serial, rest) = expect(rest, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, rest) = expect(rest, SEQUENCE)?;
    let (t1, c1, after) = tlv(validity)?;
    let (t2, c2, _) = tlv(after)?;
    let not_before = time(t1, c1)?;
    let not_after = time(t2, c2)?;
    let (_subject, rest) = expect(rest, SEQUENCE)?;
    let (_spki, mut rest) = expect(rest, SEQUENCE)?;
    let mut ext_key_usage = None;
    // issuerUniqueID [1], subjectUniqueID [2], extensions [3].
    while let Some((tag, content, next)) = tlv(rest) {
        if tag == CTX3 {
            ext_key_usage = eku(content)?;
        }
        rest = next;
    }
    Some(CertInfo {
        version,
        not_before,
        not_after,
        ext_key_usage,
    })
}

/// The extendedKeyUsage purposes in `[3] { SEQUENCE OF Extension }`.
#[allow(clippy::option_option)]
fn eku(explicit: &[u8]) -> Option<Option<Vec<Vec<u8>>>> {
    let (mut exts, _) = expect(explicit, SEQUENCE)?;
    while !exts.is_empty() {
        let (ext, next) = expect(exts, SEQUENCE)?;
        exts = next;
        let (oid, rest) = expect(ext, OID)?;
        if oid != EXT_KEY_USAGE {
            continue;
        }
        let rest = match tlv(rest)? {
            (BOOLEAN, _, rest) => rest,
            _ => rest,
        };
        let (value, _) = expect(rest, OCTET_STRING)?;
        let (mut purposes, _) = expect(value, SEQUENCE)?;
        let mut out = Vec::new();
        while !purposes.is_empty() {
            let (p, next) = expect(purposes, OID)?;
            out.push(p.to_vec());
            purposes = next;
        }
        return Some(Some(out));
    }
    Some(None)
}

/// A UTCTime or GeneralizedTime (DER: seconds present, `Z`) as seconds since
/// the epoch, and as text.
fn time(tag: u8, content: &[u8]) -> Option<(i64, String)> {
    let s = std::str::from_utf8(content).ok()?;
    let digits = s.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| digits.get(r)?.parse::<i64>().ok();
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = num(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let month = num(rest..rest + 2)?;
    let day = num(rest + 2..rest + 4)?;
    let hour = num(rest + 4..rest + 6)?;
    let minute = num(rest + 6..rest + 8)?;
    let second = num(rest + 8..rest + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let text = format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC");
    Some((secs, text))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn times_parse_in_both_forms() {
        assert_eq!(
            time(UTC_TIME, b"700101000001Z"),
            Some((1, "1970-01-01 00:00:01 UTC".to_owned()))
        );
        assert_eq!(
            time(GENERALIZED_TIME, b"20380119031408Z").map(|t| t.0),
            Some(2_147_483_648)
        );
        assert_eq!(time(UTC_TIME, b"7001010000Z"), None);
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(parse(b"not DER"), None);
        assert_eq!(parse(&[0x30, 0x82, 0xff]), None);
    }
}
