//! CBOR diagnostic notation (RFC 8949 §8) and a deterministic-encoding check (§4.2.1).
//! Test vectors state each frame's meaning in diagnostic notation; implementers in any
//! language can compare against it.

use ciborium::Value;

/// Renders CBOR bytes in diagnostic notation.
pub fn diagnostic(bytes: &[u8]) -> Result<String, String> {
    let v: Value = ciborium::de::from_reader(bytes).map_err(|e| e.to_string())?;
    let mut out = String::new();
    write_value(&v, &mut out);
    Ok(out)
}

fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::Integer(i) => out.push_str(&i128::from(*i).to_string()),
        Value::Bytes(b) => {
            out.push_str("h'");
            out.push_str(&hex::encode(b));
            out.push('\'');
        }
        Value::Float(f) => out.push_str(&format!("{f:?}")),
        Value::Text(s) => {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Null => out.push_str("null"),
        Value::Tag(t, inner) => {
            out.push_str(&format!("{t}("));
            write_value(inner, out);
            out.push(')');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Map(entries) => {
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(k, out);
                out.push_str(": ");
                write_value(val, out);
            }
            out.push('}');
        }
        _ => out.push_str("undefined"),
    }
}

/// Checks that `bytes` is deterministically encoded: shortest integer and length forms,
/// definite lengths, and map keys in bytewise order of their encodings (RFC 8949 §4.2.1).
pub fn check_deterministic(bytes: &[u8]) -> Result<(), String> {
    let v: Value = ciborium::de::from_reader(bytes).map_err(|e| e.to_string())?;
    check_keys(&v)?;
    let mut again = Vec::new();
    ciborium::ser::into_writer(&v, &mut again).map_err(|e| e.to_string())?;
    if again != bytes {
        return Err("not in shortest form".into());
    }
    Ok(())
}

fn check_keys(v: &Value) -> Result<(), String> {
    match v {
        Value::Map(entries) => {
            let mut prev: Option<Vec<u8>> = None;
            for (k, val) in entries {
                let mut enc = Vec::new();
                ciborium::ser::into_writer(k, &mut enc).map_err(|e| e.to_string())?;
                if let Some(p) = &prev {
                    if *p >= enc {
                        return Err(format!("map key {k:?} out of order or repeated"));
                    }
                }
                prev = Some(enc);
                check_keys(val)?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(check_keys),
        Value::Tag(_, inner) => check_keys(inner),
        _ => Ok(()),
    }
}
