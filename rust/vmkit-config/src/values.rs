//! Value types of option strings (v37 semantics), each a `FromStr`.
//!
//! Where v37 silently corrupts a value (ByteSized overflow, narrowing casts of
//! integer lists), vmkit fails the conversion instead.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::option_parser::split_commas;

/// A value that does not read as its type. Option strings report only the key
/// and raw value (`unable to convert <value> for <key>`), so it carries nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidValue;

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid value")
    }
}

impl std::error::Error for InvalidValue {}

/// `on`/`true`/`off`/`false`, case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Toggle(pub bool);

impl FromStr for Toggle {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        // v37 lowercases with Unicode rules; no non-ASCII character lowercases
        // into these words' letters, so an ASCII comparison accepts the same set.
        let is = |word: &str| s.eq_ignore_ascii_case(word);
        if is("on") || is("true") {
            Ok(Toggle(true))
        } else if is("off") || is("false") || s.is_empty() {
            Ok(Toggle(false))
        } else {
            Err(InvalidValue)
        }
    }
}

/// A byte count with an optional `K`, `M` or `G` suffix (uppercase only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSized(pub u64);

impl FromStr for ByteSized {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let s = s.trim();
        // v37 takes the shift from the last character, then strips every suffix letter.
        let shift = match s.chars().last() {
            Some('K') => 10,
            Some('M') => 20,
            Some('G') => 30,
            _ => 0,
        };
        let digits = s.trim_end_matches(['K', 'M', 'G']);
        let n: u64 = digits.parse().map_err(|_| InvalidValue)?;
        if shift > 0 && n > (u64::MAX >> shift) {
            return Err(InvalidValue);
        }
        Ok(ByteSized(n << shift))
    }
}

/// `[1,3-5,7]`: inclusive ranges, brackets optional, no sorting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegerList(pub Vec<u64>);

/// The most elements a list may expand to. v37 expands any range, so
/// `cpus=[0-4000000000]` has it allocate 32 GB; no list vmkit takes (vCPU,
/// host CPU, segment and fd numbers) can use more than this.
pub const MAX_LIST_ELEMENTS: u64 = 1 << 16;

impl FromStr for IntegerList {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let body = s.trim().trim_matches(['[', ']']);
        let mut values = Vec::new();
        for element in body.split(',') {
            let parts: Vec<&str> = element.split('-').collect();
            match parts.as_slice() {
                [_] if values.len() as u64 >= MAX_LIST_ELEMENTS => return Err(InvalidValue),
                [single] => values.push(single.parse::<u64>().map_err(|_| InvalidValue)?),
                [start, end] => {
                    let start = start.parse::<u64>().map_err(|_| InvalidValue)?;
                    let end = end.parse::<u64>().map_err(|_| InvalidValue)?;
                    if start >= end {
                        return Err(InvalidValue);
                    }
                    if end - start >= MAX_LIST_ELEMENTS - values.len() as u64 {
                        return Err(InvalidValue);
                    }
                    values.extend(start..=end);
                }
                _ => return Err(InvalidValue),
            }
        }
        Ok(IntegerList(values))
    }
}

impl IntegerList {
    /// Narrows every element, failing where v37 would have truncated.
    pub fn narrow<T: TryFrom<u64>>(self) -> Option<Vec<T>> {
        self.0.into_iter().map(|v| T::try_from(v).ok()).collect()
    }
}

/// `[a,b,c]`: never fails; brackets stripped, split on commas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl FromStr for StringList {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let body = s.trim().trim_matches(['[', ']']);
        Ok(StringList(body.split(',').map(str::to_owned).collect()))
    }
}

/// `[k@v,k@v]`: a bracketed list of `key@value` pairs (v37's `Tuple`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairList<K, V>(pub Vec<(K, V)>);

impl<K: FromStr, V: PairValue> FromStr for PairList<K, V> {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let s = s.trim();
        let body = s
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .ok_or(InvalidValue)?;
        let mut pairs = Vec::new();
        for element in split_commas(body).map_err(|_| InvalidValue)? {
            let parts: Vec<&str> = element.split('@').collect();
            let [key, value] = parts.as_slice() else {
                return Err(InvalidValue);
            };
            pairs.push((
                key.parse::<K>().map_err(|_| InvalidValue)?,
                V::parse_value(value)?,
            ));
        }
        Ok(PairList(pairs))
    }
}

/// How the value half of a `key@value` pair is read.
pub trait PairValue: Sized {
    fn parse_value(s: &str) -> Result<Self, InvalidValue>;
}

impl PairValue for u64 {
    fn parse_value(s: &str) -> Result<Self, InvalidValue> {
        s.parse().map_err(|_| InvalidValue)
    }
}

impl PairValue for Vec<usize> {
    fn parse_value(s: &str) -> Result<Self, InvalidValue> {
        s.parse::<IntegerList>()?.narrow().ok_or(InvalidValue)
    }
}

/// `T:C:D:P` CPU topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopologyParts(pub [u8; 4]);

impl FromStr for TopologyParts {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 4 {
            return Err(InvalidValue);
        }
        let mut out = [0u8; 4];
        for (slot, part) in out.iter_mut().zip(parts) {
            *slot = part.parse().map_err(|_| InvalidValue)?;
        }
        Ok(TopologyParts(out))
    }
}

/// An Ethernet address, shown as lowercase `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address text was refused (the JSON error text carries it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacParseError {
    input: String,
    reason: Option<String>,
}

impl fmt::Display for MacParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "The provided MAC address is invalid: parsing of {} into a MAC address failed",
            self.input
        )?;
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        Ok(())
    }
}

impl MacAddr {
    /// A random locally administered unicast address (first byte 0x2e, as v37).
    pub fn random() -> Self {
        let mut bytes = [0u8; 6];
        getrandom::getrandom(&mut bytes).expect("the OS random source is unavailable");
        bytes[0] = 0x2e;
        MacAddr(bytes)
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let fail = |reason: Option<String>| MacParseError {
            input: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(fail(None));
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(fail(None));
            }
            if !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(fail(Some("invalid digit found in string".to_owned())));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|e| fail(Some(e.to_string())))?;
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toggle() {
        for (s, v) in [
            ("on", true),
            ("off", false),
            ("true", true),
            ("false", false),
            ("ON", true),
            ("OFF", false),
            ("True", true),
            ("False", false),
        ] {
            assert_eq!(s.parse::<Toggle>(), Ok(Toggle(v)), "{s}");
        }
        for s in ["yes", "1", "0", " on", "maybe"] {
            assert!(s.parse::<Toggle>().is_err(), "{s}");
        }
    }

    #[test]
    fn byte_sized_verified_examples() {
        let ok = [
            ("1024", 1024u64),
            ("1K", 1024),
            ("2M", 2097152),
            ("4G", 4294967296),
            ("0K", 0),
            ("  2M  ", 2097152),
            ("+5", 5),
            ("1KM", 1048576),
            ("1MK", 1024),
            ("1GG", 1073741824),
            ("18446744073709551615", u64::MAX),
        ];
        for (s, v) in ok {
            assert_eq!(s.parse::<ByteSized>(), Ok(ByteSized(v)), "{s}");
        }
        for s in [
            "1k",
            "1m",
            "1T",
            "0x10",
            "-1",
            "2 M",
            "",
            "K",
            "xyzK",
            "18446744073709551616",
            // v37 wraps this to 0; vmkit refuses it.
            "17179869184G",
            "18014398509481984K",
        ] {
            assert!(s.parse::<ByteSized>().is_err(), "{s}");
        }
        assert_eq!(
            "17179869183G".parse::<ByteSized>(),
            Ok(ByteSized(17179869183 << 30))
        );
    }

    #[test]
    fn integer_list() {
        let ok: [(&str, &[u64]); 7] = [
            ("[1,3,5]", &[1, 3, 5]),
            ("[0,2-4,7]", &[0, 2, 3, 4, 7]),
            ("[[1]]", &[1]),
            ("1,3", &[1, 3]),
            ("3", &[3]),
            ("[+01]", &[1]),
            ("[3,1,1]", &[3, 1, 1]),
        ];
        for (s, v) in ok {
            assert_eq!(s.parse::<IntegerList>(), Ok(IntegerList(v.to_vec())), "{s}");
        }
        for s in [
            "[5-3]", "[5-5]", "[1-2-3]", "[]", "", "[1,]", "1-", "-1", "[1, 2]", "[a]",
        ] {
            assert!(s.parse::<IntegerList>().is_err(), "{s}");
        }
    }

    /// Found by the option_string fuzz target: a huge range made the
    /// parser allocate gigabytes (and take seconds) before any check.
    #[test]
    fn integer_lists_longer_than_the_limit_are_refused_at_once() {
        let started = std::time::Instant::now();
        for s in ["[0-1111111111]", "[0-18446744073709551615]", "[5,0-65535]"] {
            assert!(s.parse::<IntegerList>().is_err(), "{s}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let longest = format!("[0-{}]", MAX_LIST_ELEMENTS - 1);
        let list: IntegerList = longest.parse().unwrap();
        assert_eq!(list.0.len() as u64, MAX_LIST_ELEMENTS);
        let many_singles = vec!["1"; MAX_LIST_ELEMENTS as usize + 1].join(",");
        assert!(many_singles.parse::<IntegerList>().is_err());
    }

    #[test]
    fn integer_list_narrowing() {
        let list: IntegerList = "[255,256]".parse().unwrap();
        assert_eq!(list.clone().narrow::<u8>(), None);
        assert_eq!(list.narrow::<u16>(), Some(vec![255u16, 256]));
    }

    #[test]
    fn string_list() {
        let cases: [(&str, &[&str]); 4] = [
            ("[foo,bar,baz]", &["foo", "bar", "baz"]),
            ("foo,bar", &["foo", "bar"]),
            ("[]", &[""]),
            (" [ a , b ] ", &[" a ", " b "]),
        ];
        for (s, v) in cases {
            let expected: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            assert_eq!(s.parse::<StringList>(), Ok(StringList(expected)), "{s}");
        }
    }

    #[test]
    fn pair_lists() {
        let p: PairList<u64, u64> = "[0@25,1@20]".parse().unwrap();
        assert_eq!(p.0, vec![(0, 25), (1, 20)]);
        let p: PairList<u8, Vec<usize>> = "[0@[0,2],1@0-3]".parse().unwrap();
        assert_eq!(p.0, vec![(0, vec![0, 2]), (1, vec![0, 1, 2, 3])]);
        let p: PairList<String, u64> = "[@42]".parse().unwrap();
        assert_eq!(p.0, vec![(String::new(), 42)]);
        let p: PairList<String, u64> = "[a@1, b@2]".parse().unwrap();
        assert_eq!(p.0, vec![("a".into(), 1), (" b".into(), 2)]);
        for s in [
            "foo@42",
            "[]",
            "[foo@ 42]",
            "[42 @1]",
            "[a@[1,2]],b@[3,4]]",
            "[foo42]",
            "[a@b@c]",
        ] {
            assert!(s.parse::<PairList<u64, u64>>().is_err(), "{s}");
        }
        assert!("[256@1]".parse::<PairList<u8, Vec<usize>>>().is_err());
    }

    #[test]
    fn topology() {
        assert_eq!("2:2:1:2".parse(), Ok(TopologyParts([2, 2, 1, 2])));
        for s in ["2:2:1", "2:2:1:2:1", "a:1:1:1", "256:1:1:1", ""] {
            assert!(s.parse::<TopologyParts>().is_err(), "{s}");
        }
    }

    #[test]
    fn mac() {
        let mac: MacAddr = "DE:ad:be:ef:12:34".parse().unwrap();
        assert_eq!(mac.to_string(), "de:ad:be:ef:12:34");
        for s in [
            "de:ad:be:ef:12",
            "de:ad:be:ef:12:345",
            "+e:ad:be:ef:12:34",
            "zz:ad:be:ef:12:34",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
        let random = MacAddr::random();
        assert_eq!(random.0[0], 0x2e);
    }
}
