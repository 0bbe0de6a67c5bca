//! Where in a text file something was found, as the strict file loaders (the policy, the
//! platform file) report it: a line and column, never the text itself.

/// A place in a file: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Location {
    /// The line and column of byte `offset` in `text` (an offset inside a character or past
    /// the end counts as the character or end it falls in).
    pub fn of(text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_characters_are_counted() {
        assert_eq!(Location::of("abc", 0), Location { line: 1, column: 1 });
        assert_eq!(Location::of("a\nbé\nc", 6), Location { line: 3, column: 1 });
        assert_eq!(Location::of("a\nbé", 4), Location { line: 2, column: 2 });
        assert_eq!(Location::of("a\nbéc", 5), Location { line: 2, column: 3 });
        assert_eq!(Location::of("a", 99), Location { line: 1, column: 2 });
    }
}
