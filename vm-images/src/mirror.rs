//! Finds the Debian archive mirror the system already uses, from its apt
//! sources, so no mirror host is written anywhere in this project.

use std::path::Path;

use crate::Error;

/// Environment variable that overrides the detected mirror.
pub const MIRROR_ENV: &str = "CREST_DEBIAN_MIRROR";

/// One `deb` source: its URI and suites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
}

/// Parses deb822 `.sources` text: every stanza with `Types: deb`.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in stanza.lines() {
            let line = line.trim_end();
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let words = || v.split_whitespace().map(str::to_string).collect::<Vec<_>>();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = words(),
                "uris" => uris = words(),
                "suites" => suites = words(),
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if enabled && types.iter().any(|t| t == "deb") {
            for uri in uris {
                out.push(Source {
                    uri,
                    suites: suites.clone(),
                });
            }
        }
    }
    out
}

/// Parses one-line style `sources.list` text (`deb [opts] URI suite comp…`).
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = if rest.starts_with('[') {
            match rest.split_once(']') {
                Some((_, r)) => r.trim_start(),
                None => continue,
            }
        } else {
            rest
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(Source {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// A plain release suite (`bookworm`, `sid`, `stable`): no `-updates`,
/// `-security`, `-backports`, and not a security archive path.
fn is_main_archive(s: &Source) -> bool {
    let plain_suite = s
        .suites
        .iter()
        .any(|x| !x.contains('-') && !x.contains('/') && !x.is_empty());
    plain_suite
        && !s.uri.contains("security")
        && (s.uri.starts_with("http://") || s.uri.starts_with("https://"))
}

/// Picks the main archive URI from a list of sources.
pub fn pick(sources: &[Source]) -> Option<String> {
    sources
        .iter()
        .find(|s| is_main_archive(s))
        .map(|s| s.uri.trim_end_matches('/').to_string())
}

/// Reads the system's apt sources under `etc_apt` (normally `/etc/apt`).
pub fn system_sources(etc_apt: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    if let Ok(t) = std::fs::read_to_string(etc_apt.join("sources.list")) {
        out.extend(parse_one_line(&t));
    }
    let mut entries: Vec<_> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for p in entries {
        let Ok(t) = std::fs::read_to_string(&p) else {
            continue;
        };
        match p.extension().and_then(|e| e.to_str()) {
            Some("sources") => out.extend(parse_deb822(&t)),
            Some("list") => out.extend(parse_one_line(&t)),
            _ => {}
        }
    }
    out
}

/// The mirror to use: an explicit value (flag), else `$CREST_DEBIAN_MIRROR`,
/// else the system's main archive source.
pub fn detect(explicit: Option<&str>) -> Result<String, Error> {
    if let Some(m) = explicit.filter(|m| !m.is_empty()) {
        return Ok(m.trim_end_matches('/').to_string());
    }
    if let Ok(m) = std::env::var(MIRROR_ENV) {
        if !m.is_empty() {
            return Ok(m.trim_end_matches('/').to_string());
        }
    }
    pick(&system_sources(Path::new("/etc/apt"))).ok_or(Error::NoMirror)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb
# http://example.invalid/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn deb822_skips_security() {
        let s = parse_deb822(DEB822);
        assert_eq!(s.len(), 2);
        assert_eq!(pick(&s).as_deref(), Some("http://mirror.example/debian"));
    }

    #[test]
    fn one_line_with_options() {
        let text = "# comment\ndeb http://m.example/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n\
                    deb-src http://m.example/debian bookworm main\n";
        let s = parse_one_line(text);
        assert_eq!(s.len(), 2);
        assert_eq!(pick(&s).as_deref(), Some("http://m.example/debian"));
    }

    #[test]
    fn system_sources_reads_both_styles() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sources.list.d")).unwrap();
        std::fs::write(d.path().join("sources.list.d/debian.sources"), DEB822).unwrap();
        std::fs::write(
            d.path().join("sources.list.d/other.list.disabled"),
            "deb http://nope/ x main\n",
        )
        .unwrap();
        let s = system_sources(d.path());
        assert_eq!(s.len(), 2);
    }
}
