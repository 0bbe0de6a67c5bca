//! Client-controlled text on its way into a log line: capped and escaped, so that a peer
//! can neither forge log lines (a newline, a terminal escape) nor make one line megabytes
//! long.
//!
//! Not here: deciding which strings come from clients; each service wraps the ones it
//! logs.

use std::fmt;

/// Most characters of client text written to a log line; the rest is counted, not
/// written.
pub const CLIENT_TEXT_CHARS: usize = 64;

/// Client text as it may appear in a log line: at most [`CLIENT_TEXT_CHARS`] characters,
/// printable ASCII as is, everything else (control characters, `\`, quotes, non-ASCII)
/// escaped as Rust's `escape_default` does, and a cut marked with the bytes left out.
#[derive(Clone, Copy, Debug)]
pub struct ClientText<'a>(&'a str);

/// Wraps peer-supplied `text` for logging: `info!(agent = %client_text(&name), ..)`.
pub fn client_text(text: &str) -> ClientText<'_> {
    ClientText(text)
}

impl fmt::Display for ClientText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == CLIENT_TEXT_CHARS {
                return write!(f, "...(+{} bytes)", self.0.len() - i);
            }
            if c == ' ' || (c.is_ascii_graphic() && c != '\\' && c != '"' && c != '\'') {
                fmt::Write::write_char(f, c)?;
            } else {
                write!(f, "{}", c.escape_default())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_printable_text_is_unchanged() {
        assert_eq!(client_text("agent-7 (rack 2)").to_string(), "agent-7 (rack 2)");
        assert_eq!(client_text("").to_string(), "");
    }

    #[test]
    fn control_and_non_ascii_characters_are_escaped() {
        assert_eq!(client_text("a\nINFO forged").to_string(), "a\\nINFO forged");
        assert_eq!(client_text("\u{1b}[31mred\r").to_string(), "\\u{1b}[31mred\\r");
        assert_eq!(client_text("caf\u{e9} \\ \"q\"").to_string(), "caf\\u{e9} \\\\ \\\"q\\\"");
        assert!(!client_text("x\u{0}y\u{7f}z\u{2028}").to_string().chars().any(|c| c.is_control() || !c.is_ascii()));
    }

    #[test]
    fn long_text_is_cut_and_the_rest_counted() {
        let long = format!("{}\n{}", "a".repeat(10), "b".repeat(3 << 20));
        let shown = client_text(&long).to_string();
        assert!(shown.starts_with("aaaaaaaaaa\\nbbb"), "{shown}");
        assert!(shown.ends_with(&format!("...(+{} bytes)", long.len() - CLIENT_TEXT_CHARS)), "{shown}");
        assert!(shown.len() < 128, "{}", shown.len());
        // Exactly the cap: nothing cut.
        assert_eq!(client_text(&"c".repeat(CLIENT_TEXT_CHARS)).to_string(), "c".repeat(CLIENT_TEXT_CHARS));
        // Multi-byte characters are cut on a character boundary.
        let wide = "\u{e9}".repeat(CLIENT_TEXT_CHARS + 1);
        assert!(client_text(&wide).to_string().ends_with("...(+2 bytes)"));
    }
}
