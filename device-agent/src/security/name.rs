//! What the agent's name may contain before it is logged or sent.
//!
//! The name comes from a flag, the environment or the host name, and travels in the bind
//! to the server, into both sides' logs and into `GetAgentInfo`. A newline in it forges log
//! lines, a few megabytes of it make lines of megabytes; so it is cut to printable ASCII
//! and a bounded length once, where the agent starts. Other text a peer controls (a trace
//! path in a refusal's log line) goes through the same function.

/// The longest name kept, in characters (all ASCII, so also bytes).
pub const MAX_NAME_CHARS: usize = 64;

/// `raw` as printable ASCII of at most [`MAX_NAME_CHARS`] characters: printable ASCII is
/// kept, a backslash is doubled, `\n`, `\r` and `\t` are escaped as such and every other
/// character as `\u{..}`; an escape that would not fit whole is left out, and so is the
/// rest.
pub fn printable_name(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_NAME_CHARS));
    let mut piece = String::new();
    for c in raw.chars() {
        piece.clear();
        match c {
            '\\' => piece.push_str("\\\\"),
            ' '..='~' => piece.push(c),
            '\n' => piece.push_str("\\n"),
            '\r' => piece.push_str("\\r"),
            '\t' => piece.push_str("\\t"),
            other => piece.extend(other.escape_unicode()),
        }
        if out.len() + piece.len() > MAX_NAME_CHARS {
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_are_kept() {
        for name in ["agent-0", "rack 7 / slot 3", "dmar-agent", &"x".repeat(MAX_NAME_CHARS)] {
            assert_eq!(printable_name(name), name);
        }
    }

    #[test]
    fn a_newline_cannot_forge_a_log_line() {
        let forged = "agent-0\n2025-01-01T00:00:00Z  INFO dmar-server: operator logged in";
        let name = printable_name(forged);
        assert!(!name.contains('\n') && name.starts_with("agent-0\\n2025"), "{name}");
        assert!(name.len() <= MAX_NAME_CHARS);
        assert_eq!(printable_name("a\r\tb\\c\u{1b}[31m\u{7f}é"), "a\\r\\tb\\\\c\\u{1b}[31m\\u{7f}\\u{e9}");
    }

    #[test]
    fn a_huge_name_is_capped() {
        let huge = "A".repeat(3 << 20);
        assert_eq!(printable_name(&huge), "A".repeat(MAX_NAME_CHARS));
        // Escapes are never cut in half.
        let escapes = "\u{1}".repeat(3 << 20);
        let name = printable_name(&escapes);
        assert_eq!(name, "\\u{1}".repeat(MAX_NAME_CHARS / 5));
        let all_printable = |s: &str| s.bytes().all(|b| (b' '..=b'~').contains(&b));
        assert!(all_printable(&name) && all_printable(&printable_name(&"é\n".repeat(3 << 20))));
    }
}
