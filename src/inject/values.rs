//! Parsing of annotation values: port lists and Kubernetes resource quantities.
//!
//! Annotations are user input that the API server does not check, so every parser here returns a reason
//! instead of failing the injection: the caller turns it into an admission warning and keeps the default.

/// Port ranges are the ones `meshlet init` takes, so what the injector accepts, init accepts.
pub use crate::init::rules::PortRange;

/// Most entries a port list may hold; bounds the work and the size of the generated arguments.
const MAX_PORT_ENTRIES: usize = 256;

/// Parses `"8080,9000-9010"` (spaces allowed around entries; empty string = no ports).
pub fn parse_port_list(value: &str) -> Result<Vec<PortRange>, String> {
    let mut ranges = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if ranges.len() == MAX_PORT_ENTRIES {
            return Err(format!("more than {MAX_PORT_ENTRIES} entries"));
        }
        let range: PortRange = entry
            .parse()
            .map_err(|e: crate::init::rules::PortRangeError| e.to_string())?;
        ranges.push(range);
    }
    Ok(ranges)
}

/// Formats ranges back into the canonical comma-separated form (`8080,9000-9010`).
pub fn format_port_list(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Most single ports a port list may expand to (the proxy's `--opaque-ports` takes ports, not ranges).
pub const MAX_EXPANDED_PORTS: usize = 1024;

/// Expands ranges into single ports, sorted and de-duplicated.
pub fn expand_ports(ranges: &[PortRange]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for range in ranges {
        let count = usize::from(range.last - range.first) + 1;
        if ports.len() + count > MAX_EXPANDED_PORTS {
            return Err(format!("expands to more than {MAX_EXPANDED_PORTS} ports"));
        }
        ports.extend(range.first..=range.last);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Parses a Kubernetes resource quantity (`250m`, `1.5`, `128Mi`, `1e3`) into its value in base units, so
/// that a request can be compared with its limit. Negative quantities are rejected: no proxy resource
/// may be negative.
pub fn parse_quantity(text: &str) -> Result<f64, String> {
    let invalid = || format!("{text:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)");
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 || number.contains('+')
    {
        return Err(invalid());
    }
    let base: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let power = exponent
                .strip_prefix(['e', 'E'])
                .and_then(|p| p.parse::<i32>().ok())
                .filter(|p| (-30..=30).contains(p))
                .ok_or_else(invalid)?;
            10f64.powi(power)
        }
    };
    Ok(base * multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_accept_ports_and_ranges() {
        let ranges = parse_port_list(" 8080, 9000-9002 ,,").unwrap();
        assert_eq!(format_port_list(&ranges), "8080,9000-9002");
        assert_eq!(expand_ports(&ranges).unwrap(), vec![8080, 9000, 9001, 9002]);
        assert!(parse_port_list("").unwrap().is_empty());
    }

    #[test]
    fn port_lists_reject_bad_entries() {
        for bad in ["0", "70000", "http", "10-5", "1-", "-3"] {
            assert!(parse_port_list(bad).is_err(), "{bad} accepted");
        }
        assert!(expand_ports(&parse_port_list("1-2000").unwrap()).is_err());
    }

    #[test]
    fn quantities_parse_to_base_units() {
        assert_eq!(parse_quantity("100m").unwrap(), 0.1);
        assert_eq!(parse_quantity("2").unwrap(), 2.0);
        assert_eq!(parse_quantity("64Mi").unwrap(), 64.0 * 1024.0 * 1024.0);
        assert_eq!(parse_quantity("1e3").unwrap(), 1000.0);
        assert_eq!(parse_quantity("1.5Gi").unwrap(), 1.5 * 1024f64.powi(3));
        for bad in ["", "abc", "-1", "1.2.3", "10mb", "Mi", "1e99", "."] {
            assert!(parse_quantity(bad).is_err(), "{bad} accepted");
        }
    }
}
