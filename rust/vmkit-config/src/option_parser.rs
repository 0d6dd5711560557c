//! The option-string grammar of Cloud Hypervisor v37 (`key=value,key2,...`).
//!
//! Behaviour follows v37's `option_parser` exactly (quotes are dropped, brackets
//! nest, `key=` reads as absent, last duplicate wins), so that error texts and
//! edge cases match what users of Cloud Hypervisor already see.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionParserError {
    UnknownOption(String),
    InvalidSyntax(String),
    Conversion(String, String),
}

impl fmt::Display for OptionParserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOption(name) => write!(f, "unknown option: {name}"),
            Self::InvalidSyntax(input) => write!(f, "invalid syntax:{input}"),
            Self::Conversion(field, value) => write!(f, "unable to convert {value} for {field}"),
        }
    }
}

impl std::error::Error for OptionParserError {}

pub type OptionParserResult<T> = Result<T, OptionParserError>;

struct OptionSlot<'a> {
    name: &'static str,
    value: Option<Cow<'a, str>>,
    requires_value: bool,
}

/// A registry of known keys and the values one option string gave them.
/// A short list scanned linearly: options have at most ~30 keys, and hashing
/// cost more than the whole parse. Values borrow from the input unless quote
/// removal changed them.
#[derive(Default)]
pub struct OptionParser<'a> {
    options: Vec<OptionSlot<'a>>,
}

fn unquote(raw: &str, has_quote: bool) -> Cow<'_, str> {
    if has_quote {
        Cow::Owned(raw.replace('"', ""))
    } else {
        Cow::Borrowed(raw)
    }
}

/// Splits at top-level commas: brackets nest, `"` toggles quoting and is dropped.
pub fn split_commas(input: &str) -> OptionParserResult<Vec<Cow<'_, str>>> {
    let text = input.trim();
    let mut items = Vec::new();
    let mut start = 0;
    let mut item_has_quote = false;
    let mut depth: i64 = 0;
    let mut in_quotes = false;
    // Quote removal is just dropping every `"` of an item, so items without
    // one are slices of the input.
    for (index, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(OptionParserError::InvalidSyntax(input.to_owned()));
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                item_has_quote = true;
            }
            ',' if depth == 0 && !in_quotes => {
                items.push(unquote(&text[start..index], item_has_quote));
                start = index + 1;
                item_has_quote = false;
            }
            _ => {}
        }
    }
    if depth != 0 || in_quotes {
        return Err(OptionParserError::InvalidSyntax(input.to_owned()));
    }
    items.push(unquote(&text[start..], item_has_quote));
    Ok(items)
}

impl<'a> OptionParser<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers keys that need `key=value`.
    pub fn add_all(&mut self, names: &[&'static str]) -> &mut Self {
        self.options.reserve(names.len());
        for &name in names {
            debug_assert!(self.slot(name).is_none(), "{name} registered twice");
            self.options.push(OptionSlot {
                name,
                value: None,
                requires_value: true,
            });
        }
        self
    }

    /// Registers keys that stand alone (`tty`, `off`).
    pub fn add_valueless(&mut self, name: &'static str) -> &mut Self {
        self.register(name, false);
        self
    }

    fn register(&mut self, name: &'static str, requires_value: bool) {
        match self.options.iter_mut().find(|slot| slot.name == name) {
            Some(slot) => slot.requires_value = requires_value,
            None => self.options.push(OptionSlot {
                name,
                value: None,
                requires_value,
            }),
        }
    }

    fn slot(&self, name: &str) -> Option<&OptionSlot<'a>> {
        self.options.iter().find(|slot| slot.name == name)
    }

    pub fn parse(&mut self, input: &'a str) -> OptionParserResult<()> {
        if input.trim().is_empty() {
            return Ok(());
        }
        for item in split_commas(input)? {
            let (name, value) = match item.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (item.as_ref(), None),
            };
            let slot = self
                .options
                .iter_mut()
                .find(|slot| slot.name == name)
                .ok_or_else(|| OptionParserError::UnknownOption(name.to_owned()))?;
            if !slot.requires_value {
                slot.value = Some(Cow::Borrowed(""));
                continue;
            }
            let Some(value) = value else {
                return Err(OptionParserError::InvalidSyntax(item.into_owned()));
            };
            let start = value.as_ptr() as usize - item.as_ptr() as usize;
            slot.value = Some(match &item {
                Cow::Borrowed(item) => Cow::Borrowed(item[start..].trim()),
                Cow::Owned(_) => Cow::Owned(value.trim().to_owned()),
            });
        }
        Ok(())
    }

    /// The value, or `None` when unset, unknown or empty (`key=` reads as absent).
    pub fn get(&self, name: &str) -> Option<String> {
        self.get_str(name).map(str::to_owned)
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.slot(name)
            .and_then(|slot| slot.value.as_deref())
            .filter(|value| !value.is_empty())
    }

    pub fn is_set(&self, name: &str) -> bool {
        self.slot(name).is_some_and(|slot| slot.value.is_some())
    }

    /// Converts through `FromStr`; any failure is reported as `Conversion(name, value)`.
    pub fn convert<T: FromStr>(&self, name: &str) -> OptionParserResult<Option<T>> {
        match self.get_str(name) {
            None => Ok(None),
            Some(value) => value
                .parse::<T>()
                .map(Some)
                .map_err(|_| OptionParserError::Conversion(name.to_owned(), value.to_owned())),
        }
    }

    /// Converts with a caller-supplied function (used for narrowing casts that
    /// v37 performs silently and vmkit checks).
    pub fn convert_with<T, F>(&self, name: &str, f: F) -> OptionParserResult<Option<T>>
    where
        F: FnOnce(&str) -> Option<T>,
    {
        match self.get_str(name) {
            None => Ok(None),
            Some(value) => f(value)
                .map(Some)
                .ok_or_else(|| OptionParserError::Conversion(name.to_owned(), value.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> OptionParser<'static> {
        let mut p = OptionParser::new();
        p.add_all(&[
            "size",
            "mergeable",
            "hotplug_method",
            "topology",
            "cmd",
            "extra",
        ])
        .add_valueless("tty");
        p
    }

    #[test]
    fn split_keeps_brackets_and_drops_quotes() {
        assert_eq!(
            split_commas("a=[1,2],b=\"x,y\"").unwrap(),
            vec!["a=[1,2]", "b=x,y"]
        );
        assert_eq!(split_commas("a\"b\"c").unwrap(), vec!["abc"]);
        assert_eq!(split_commas("\"\"").unwrap(), vec![""]);
        assert_eq!(split_commas("x=[\"a,b\"]").unwrap(), vec!["x=[a,b]"]);
    }

    #[test]
    fn split_rejects_unbalanced_input_with_original_text() {
        for bad in [
            "[a,b",
            "a]",
            "[a]]",
            "[[[a]]",
            "\"abc",
            " x=\"[\" ",
            "x=[\"]\"]",
        ] {
            assert_eq!(
                split_commas(bad),
                Err(OptionParserError::InvalidSyntax(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn parse_values_and_duplicates() {
        let mut p = parser();
        p.parse("size=1,size=2,extra=foo=bar,cmd=\"a,b,c\"")
            .unwrap();
        assert_eq!(p.get("size").as_deref(), Some("2"));
        assert_eq!(p.get("extra").as_deref(), Some("foo=bar"));
        assert_eq!(p.get("cmd").as_deref(), Some("a,b,c"));
        assert_eq!(p.get("mergeable"), None);
        assert!(!p.is_set("mergeable"));
    }

    #[test]
    fn empty_value_is_absent_but_set() {
        let mut p = parser();
        p.parse("size=").unwrap();
        assert!(p.is_set("size"));
        assert_eq!(p.get("size"), None);
        assert_eq!(p.convert::<u64>("size"), Ok(None));
    }

    #[test]
    fn values_are_trimmed_after_quote_removal() {
        let mut p = parser();
        p.parse("size=\" 12 \"").unwrap();
        assert_eq!(p.get("size").as_deref(), Some("12"));
    }

    #[test]
    fn valueless_options() {
        let mut p = parser();
        p.parse("tty=foo").unwrap();
        assert!(p.is_set("tty"));
        assert_eq!(p.get("tty"), None);
    }

    #[test]
    fn blank_input_sets_nothing() {
        let mut p = parser();
        p.parse("").unwrap();
        p.parse("   ").unwrap();
        assert!(!p.is_set("size"));
    }

    #[test]
    fn errors() {
        let cases = [
            ("foo=1", OptionParserError::UnknownOption("foo".into())),
            ("size=1,", OptionParserError::UnknownOption("".into())),
            (",size=1", OptionParserError::UnknownOption("".into())),
            (
                "size=1,,mergeable=on",
                OptionParserError::UnknownOption("".into()),
            ),
            ("=x", OptionParserError::UnknownOption("".into())),
            (
                "size=1, mergeable=on",
                OptionParserError::UnknownOption(" mergeable".into()),
            ),
            ("size = 1", OptionParserError::UnknownOption("size ".into())),
            ("size", OptionParserError::InvalidSyntax("size".into())),
            ("\"si\"ze", OptionParserError::InvalidSyntax("size".into())),
        ];
        for (input, expected) in cases {
            assert_eq!(parser().parse(input), Err(expected), "{input}");
        }
        assert_eq!(
            OptionParserError::UnknownOption(String::new()).to_string(),
            "unknown option: "
        );
        assert_eq!(
            OptionParserError::InvalidSyntax("x".into()).to_string(),
            "invalid syntax:x"
        );
    }

    #[test]
    fn conversion_error_names_key_and_value() {
        let mut p = parser();
        p.parse("size=abc").unwrap();
        let err = p.convert::<u64>("size").unwrap_err();
        assert_eq!(err.to_string(), "unable to convert abc for size");
    }

    #[test]
    fn nested_brackets_kept() {
        let mut p = parser();
        p.parse("topology=[[1,2],[3,4]]").unwrap();
        assert_eq!(p.get("topology").as_deref(), Some("[[1,2],[3,4]]"));
    }
}
