//! Writing manifests back as YAML that Kubernetes reads the same way.
//!
//! Why not `serde_yaml::to_string`: it writes YAML 1.2, where `no`, `yes`, `on`, `off`, `y` and `n` are
//! plain strings and stay unquoted, but `kubectl` and the API server read YAML 1.1 (go-yaml through
//! sigs.k8s.io/yaml), where they are booleans: `args: ["--appendonly", "no"]` would come back as
//! `false` and the manifest would be refused. This writer quotes every string that is not obviously a
//! string in both versions, so `meshlet inject | kubectl apply -f -` keeps every value as it was.

use serde_json::Value;

/// One document in block style, ending with a newline.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_mapping(&mut out, value, 0),
        Value::Array(items) if !items.is_empty() => write_sequence(&mut out, value, 0),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

fn write_mapping(out: &mut String, value: &Value, indent: usize) {
    let Value::Object(map) = value else { return };
    for (index, (key, child)) in map.iter().enumerate() {
        // The first entry of a mapping inside a sequence item follows the "- " on the same line.
        if index > 0 || !out.ends_with("- ") {
            push_indent(out, indent);
        }
        out.push_str(&string_text(key));
        out.push(':');
        write_child(out, child, indent, indent + 2);
    }
}

fn write_sequence(out: &mut String, value: &Value, indent: usize) {
    let Value::Array(items) = value else { return };
    for item in items {
        push_indent(out, indent);
        out.push_str("- ");
        match item {
            Value::Object(map) if !map.is_empty() => write_mapping(out, item, indent + 2),
            Value::Array(inner) if !inner.is_empty() => {
                out.pop();
                out.push('\n');
                write_sequence(out, item, indent + 2);
            }
            scalar => {
                out.push_str(&scalar_text(scalar));
                out.push('\n');
            }
        }
    }
}

/// After `key:`: a nested mapping on the next lines, a sequence at the key's indentation (the usual
/// Kubernetes style), or a scalar on the same line.
fn write_child(out: &mut String, child: &Value, key_indent: usize, nested_indent: usize) {
    match child {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_mapping(out, child, nested_indent);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_sequence(out, child, key_indent);
        }
        scalar => {
            out.push(' ');
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string_text(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

/// Words that YAML 1.1 reads as booleans or null when unquoted.
const YAML_1_1_WORDS: [&str; 10] = [
    "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~",
];

/// A string plain when it cannot be read as anything else in YAML 1.1 or 1.2 (it starts with a letter
/// and holds only letters, digits and `_ . / -`), double-quoted otherwise. JSON string escapes are
/// valid YAML double-quoted escapes.
fn string_text(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !YAML_1_1_WORDS.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    fn parse(text: &str) -> Value {
        Value::deserialize(serde_yaml::Deserializer::from_str(text)).unwrap()
    }

    #[test]
    fn round_trips_and_quotes_what_yaml_1_1_would_misread() {
        let value = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "redis", "annotations": {"meshlet.io/opaque-ports": "6379", "on": "off"}},
            "spec": {
                "containers": [{
                    "name": "redis",
                    "args": ["--save", "", "--appendonly", "no", "yes", "Y", "1_000", "=", "1e3", "a: b", "multi\nline"],
                    "ports": [{"containerPort": 6379}],
                    "env": [],
                    "resources": {},
                    "matrix": [[1, 2], []],
                }],
                "hostNetwork": false,
                "priority": null,
            },
        });
        let text = to_yaml(&value);
        assert_eq!(parse(&text), value, "{text}");
        for word in [
            "\"no\"",
            "\"yes\"",
            "\"Y\"",
            "\"1_000\"",
            "\"=\"",
            "\"on\": \"off\"",
            "\"6379\"",
            "\"\"",
        ] {
            assert!(text.contains(word), "{word} not quoted in:\n{text}");
        }
        assert!(
            text.contains("\n  containers:\n  - args:\n    - \"--save\"\n"),
            "{text}"
        );
        assert!(text.contains("\n    matrix:\n    -\n      - 1\n"), "{text}");
    }

    #[test]
    fn empty_and_scalar_documents() {
        assert_eq!(to_yaml(&json!({})), "{}\n");
        assert_eq!(to_yaml(&json!("no")), "\"no\"\n");
        assert_eq!(
            parse(&to_yaml(&json!([{"a": []}, 1]))),
            json!([{"a": []}, 1])
        );
    }
}
