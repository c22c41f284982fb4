//! TOML config files, with an error an operator reads on one line: where
//! (line and column, counted from 1) and what, without the multi-line
//! excerpt `toml`'s own message draws.
extern crate std;

use std::format;
use std::string::String;

/// `text` as a `T`, or "line L, column C: what is wrong".
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let what = e.message().trim_end();
        match e.span() {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                format!("line {line}, column {column}: {what}")
            }
            None => what.into(),
        }
    })
}

/// 1-based line and column (in characters) of the byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Config {
        period: String,
    }

    #[test]
    fn names_the_line_column_and_key_on_one_line() {
        let error = parse::<Config>("period = \"1m\"\n\n  perod = \"2m\"\n").unwrap_err();
        assert!(
            error.starts_with("line 3, column 3: unknown field `perod`"),
            "{error}"
        );
        assert!(!error.contains('\n'), "{error}");
        assert_eq!(line_and_column("ab\ncé\nx", 7), (3, 1));
        assert_eq!(line_and_column("ab\ncé\nx", 3), (2, 1));
    }
}
