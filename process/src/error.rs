//! How the binaries render an error for one line of output: the error and its causes.

/// `outer: inner: innermost`, skipping a cause whose text the line already ends with
/// (tonic's transport errors repeat their source). A file's error says which file; its
/// cause says why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_follow_the_error_once_each() {
        let e = E("reading certs/ca.pem", Some(Box::new(E("no such file", None))));
        assert_eq!(error_chain(&e), "reading certs/ca.pem: no such file");
        let repeated = E("transport error: refused", Some(Box::new(E("refused", None))));
        assert_eq!(error_chain(&repeated), "transport error: refused");
    }
}
