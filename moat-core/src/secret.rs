//! A wrapper for secret values: `Debug` and `Display` print `****`.
//!
//! The value is reachable only through [`Secret::expose`], which the proxy
//! calls at its one injection site.

use std::fmt;

/// A secret value that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value. Call only where it must be used (injecting a header).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("ghp_realtoken".to_string());
        assert_eq!(format!("{s} {s:?} {s:#?}"), "**** **** ****");
        assert_eq!(s.expose(), "ghp_realtoken");
    }
}
