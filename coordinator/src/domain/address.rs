//! Replica addresses: the one normal form (`scheme://host:port`) under which the membership
//! compares them and the teacher pool dials them.

/// An address that is not `http(s)://host:port`; the message says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadAddress(pub String);

/// Normalises a replica address to `scheme://host:port` (lowercase scheme and host): the
/// scheme must be `http` or `https`, the port explicit, and there must be no path or query.
pub fn normalize_address(address: &str) -> Result<String, BadAddress> {
    let bad = |why: &str| BadAddress(format!("address `{address}` {why}"));
    let trimmed = address.trim();
    if trimmed.is_empty() {
        return Err(BadAddress("address is empty".into()));
    }
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|e| bad(&format!("is not a URI ({e})")))?;
    let scheme = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => "http",
        Some(s) if s.eq_ignore_ascii_case("https") => "https",
        Some(s) => return Err(bad(&format!("has scheme `{s}`; expected http or https"))),
        None => {
            return Err(bad(
                "has no scheme; expected http://HOST:PORT or https://HOST:PORT",
            ));
        }
    };
    let host = match uri.host() {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => return Err(bad("has no host")),
    };
    let Some(port) = uri.port_u16() else {
        // `http` drops a port that does not fit in 16 bits: tell that apart from none.
        let authority = uri.authority().map_or("", |a| a.as_str());
        let host_end = authority.rfind(']').map_or(0, |i| i + 1);
        let has_port = authority.get(host_end..).is_some_and(|s| s.contains(':'));
        return Err(bad(if has_port {
            "has an invalid port"
        } else {
            "has no port"
        }));
    };
    if port == 0 {
        return Err(bad("has port 0"));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(bad(
            "has a path or query; expected only scheme, host and port",
        ));
    }
    Ok(format!("{scheme}://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalise_to_scheme_host_and_port() {
        for (given, want) in [
            ("http://h:1", "http://h:1"),
            ("  HTTP://Teacher-1:50051/ ", "http://teacher-1:50051"),
            ("https://10.0.0.5:443", "https://10.0.0.5:443"),
            ("http://[FE80::1]:9", "http://[fe80::1]:9"),
        ] {
            assert_eq!(normalize_address(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn malformed_addresses_say_what_is_wrong() {
        for (addr, want) in [
            ("", "address is empty"),
            (
                "h:1",
                "address `h:1` has no scheme; expected http://HOST:PORT or https://HOST:PORT",
            ),
            (
                "ftp://h:1",
                "address `ftp://h:1` has scheme `ftp`; expected http or https",
            ),
            ("http://h", "address `http://h` has no port"),
            ("http://h:0", "address `http://h:0` has port 0"),
            (
                "http://h:1/x",
                "address `http://h:1/x` has a path or query; expected only scheme, host and port",
            ),
            (
                "http://h:1?q",
                "address `http://h:1?q` has a path or query; expected only scheme, host and port",
            ),
            (
                "http://h:99999",
                "address `http://h:99999` has an invalid port",
            ),
            ("http://[::1]", "address `http://[::1]` has no port"),
        ] {
            assert_eq!(
                normalize_address(addr),
                Err(BadAddress(want.into())),
                "{addr}"
            );
        }
        let err = normalize_address("http://").unwrap_err();
        assert!(
            err.0.starts_with("address `http://` is not a URI ("),
            "{err}"
        );
    }
}
