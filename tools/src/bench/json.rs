//! A minimal JSON value for the bench report (the VMM has no serde).

use std::fmt::{self, Write};

use super::stats::Spread;

/// A JSON value.
#[derive(Clone, Debug)]
pub enum Json {
    /// `true` / `false`.
    Bool(bool),
    /// A number (non-finite numbers are written as `null`).
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in insertion order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs.
    pub fn obj<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Json)>) -> Self {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A string value.
    pub fn str(s: impl Into<String>) -> Self {
        Json::Str(s.into())
    }

    /// A number value.
    pub fn num(v: impl Into<f64>) -> Self {
        Json::Num(v.into())
    }

    /// `{"n", "p10", "p50", "p90"}`.
    pub fn spread(s: Spread) -> Self {
        Json::obj([
            ("n", Json::num(s.n as f64)),
            ("p10", Json::Num(s.p10)),
            ("p50", Json::Num(s.p50)),
            ("p90", Json::Num(s.p90)),
        ])
    }

    fn write(&self, out: &mut String, indent: usize) -> fmt::Result {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            Json::Bool(b) => write!(out, "{b}")?,
            Json::Num(v) if !v.is_finite() => out.push_str("null"),
            Json::Num(v) if v.fract() == 0.0 && v.abs() < 1e15 => write!(out, "{}", *v as i64)?,
            Json::Num(v) => write!(out, "{}", (v * 1000.0).round() / 1000.0)?,
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32)?,
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    item.write(out, indent + 1)?;
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            Json::Obj(pairs) if pairs.is_empty() => out.push_str("{}"),
            Json::Obj(pairs) => {
                out.push_str("{\n");
                for (i, (k, v)) in pairs.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    Json::Str(k.clone()).write(out, indent + 1)?;
                    out.push_str(": ");
                    v.write(out, indent + 1)?;
                    out.push_str(if i + 1 < pairs.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
        Ok(())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.write(&mut out, 0)?;
        f.write_str(&out)
    }
}
