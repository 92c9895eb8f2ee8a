//! The two exposition formats `/metrics` answers in. `prometheus-client`
//! writes OpenMetrics only, where a counter family `x` has the series
//! `x_total`; the Prometheus text format (0.0.4), which `promtool check
//! metrics`, older scrapers and `curl` users read, names the family after
//! its series. A Prometheus server asks for OpenMetrics in its `Accept`
//! header and gets it; anyone else gets the text format.

/// The content type of each answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header prefers OpenMetrics: its quality
/// above 0 and at least the text format's (`text/plain`, `text/*` or
/// `*/*`, whichever matches best). Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,...`.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    // The quality of each media range (1 unless it says q=).
    let ranges: Vec<(String, f32)> = accept
        .split(',')
        .map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q =
                parts.find_map(|p| p.strip_prefix("q=")).and_then(|q| q.parse::<f32>().ok()).unwrap_or(1.0);
            (media, q)
        })
        .collect();
    // The most specific range that matches decides (RFC 9110, 12.5.1).
    let quality = |media: &str| {
        let (kind, _) = media.split_once('/').unwrap_or((media, ""));
        let wildcard = format!("{kind}/*");
        [media, wildcard.as_str(), "*/*"]
            .iter()
            .find_map(|wanted| ranges.iter().filter(|(m, _)| m == wanted).map(|(_, q)| *q).reduce(f32::max))
            .unwrap_or(0.0)
    };
    let openmetrics = ranges
        .iter()
        .filter(|(m, _)| m == "application/openmetrics-text")
        .map(|(_, q)| *q)
        .reduce(f32::max)
        .unwrap_or(0.0);
    openmetrics > 0.0 && openmetrics >= quality("text/plain")
}

/// `openmetrics` (as `prometheus-client` writes it) in the Prometheus text
/// format: a counter's or info's HELP and TYPE name its series (`_total`,
/// `_info`; info becomes a gauge), HELP text unescapes `\"`, and `# UNIT`
/// and `# EOF` go. Series lines are the same in both formats.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // prometheus-client writes each family's TYPE right after its HELP.
            let kind = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .and_then(|t| t.split_once(' '))
                .filter(|(typed, _)| *typed == name)
                .map(|(_, kind)| kind);
            let (series, kind) = family_in_text(name, kind);
            out.push_str(&format!("# HELP {series} {}\n", help.replace("\\\"", "\"")));
            if let Some(kind) = kind {
                lines.next();
                out.push_str(&format!("# TYPE {series} {kind}\n"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let (series, kind) = family_in_text(name, Some(kind));
            out.push_str(&format!("# TYPE {series} {}\n", kind.unwrap_or("untyped")));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A family's name and type in the text format.
fn family_in_text<'a>(name: &str, kind: Option<&'a str>) -> (String, Option<&'a str>) {
    match kind {
        Some("counter") => (format!("{name}_total"), kind),
        Some("info") => (format!("{name}_info"), Some("gauge")),
        Some("unknown") => (name.to_owned(), Some("untyped")),
        _ => (name.to_owned(), kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_curl_does_not() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0, text/plain")));
        // The preference the q-values say (red team round 30, F3).
        assert!(!wants_openmetrics(Some("text/plain;q=1.0,application/openmetrics-text;q=0.1")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0.2,text/plain;q=0.9")));
        assert!(wants_openmetrics(Some("application/openmetrics-text;q=0.2,*/*;q=0.1")));
        assert!(wants_openmetrics(Some("Application/OpenMetrics-Text")));
    }

    #[test]
    fn counters_and_infos_are_named_after_their_series() {
        let openmetrics = "# HELP d_drops Packets \\\"dropped\\\".\n# TYPE d_drops counter\n\
             d_drops_total{reason=\"x\"} 3\n# HELP d_build Build.\n# TYPE d_build info\n\
             d_build_info{version=\"1\"} 1\n# HELP d_up Gauge.\n# TYPE d_up gauge\n# UNIT d_up seconds\n\
             d_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP d_drops_total Packets \"dropped\".\n# TYPE d_drops_total counter\n\
             d_drops_total{reason=\"x\"} 3\n# HELP d_build_info Build.\n# TYPE d_build_info gauge\n\
             d_build_info{version=\"1\"} 1\n# HELP d_up Gauge.\n# TYPE d_up gauge\nd_up 1\n"
        );
    }
}
