//! `--set key=value` overrides and sweep-point assignments on the raw TOML table.
//!
//! Decision: keys are TOML dotted keys (`train.optimizer.lr`, `sweep."run.seed"`); values
//! are parsed as TOML values (`3`, `1e-4`, `true`, `[1, 2]`, `{ kind = "topk", k = 8 }`)
//! and fall back to a plain string when they do not parse (`model.source=local:/tmp/m`).
//! Decision: assigning a table to a key that holds a table merges them key by key, except
//! when the new table has a `kind` (a tagged union such as `sae.arch` or
//! `train.optimizer`): that replaces the old table, so keys of another variant do not
//! leak into it.

use toml::{Table, Value};

/// One `key = value` assignment: the key path and the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The key path, one segment per table level.
    pub path: Vec<String>,
    /// The value.
    pub value: Value,
}

impl Assignment {
    /// The key path joined with dots.
    pub fn key(&self) -> String {
        self.path.join(".")
    }
}

/// Parse `a.b.c=value`. Errors name the argument and what is wrong.
pub fn parse_set(arg: &str) -> Result<Assignment, String> {
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| format!("--set {arg}: expected KEY=VALUE, e.g. train.batch_tokens=8192"))?;
    let path = parse_key(key.trim()).map_err(|e| format!("--set {arg}: {e}"))?;
    Ok(Assignment {
        path,
        value: parse_value(raw.trim()),
    })
}

/// Split a dotted key (`a.b."c.d"`) into its segments, with TOML's own key syntax.
pub fn parse_key(key: &str) -> Result<Vec<String>, String> {
    if key.is_empty() {
        return Err("empty key".to_string());
    }
    let doc: Table = toml::from_str(&format!("{key} = 0"))
        .map_err(|_| format!("'{key}' is not a key path like train.batch_tokens"))?;
    let mut path = Vec::new();
    let mut table = &doc;
    loop {
        // Each level of the parsed one-key document holds exactly one entry.
        let Some((k, v)) = table.iter().next() else {
            return Err(format!("'{key}' is not a key path"));
        };
        path.push(k.clone());
        match v {
            Value::Table(t) => table = t,
            _ => return Ok(path),
        }
    }
}

/// A command-line value as TOML, else as a string.
pub fn parse_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Set `path` to `value` in `root`, creating missing tables on the way. Fails when an
/// intermediate key holds something that is not a table.
pub fn assign(root: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".to_string());
    };
    let mut table = root;
    for (i, seg) in parents.iter().enumerate() {
        let entry = table
            .entry(seg.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            other => {
                return Err(format!(
                    "{} is a {}, not a table, so {} cannot be set",
                    path[..=i].join("."),
                    other.type_str(),
                    path.join(".")
                ))
            }
        };
    }
    match (table.get_mut(last), value) {
        (Some(Value::Table(old)), Value::Table(new)) if !new.contains_key("kind") => {
            merge(old, new);
        }
        (_, value) => {
            table.insert(last.clone(), value);
        }
    }
    Ok(())
}

/// Merge `new` into `old` with the rule of [`assign`].
fn merge(old: &mut Table, new: Table) {
    for (k, v) in new {
        match (old.get_mut(&k), v) {
            (Some(Value::Table(o)), Value::Table(n)) if !n.contains_key("kind") => merge(o, n),
            (_, v) => {
                old.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_parse_as_toml_or_string() {
        assert_eq!(parse_value("3"), Value::Integer(3));
        assert_eq!(parse_value("1e-4"), Value::Float(1e-4));
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(
            parse_value("local:/tmp/m"),
            Value::String("local:/tmp/m".into())
        );
        assert_eq!(parse_value("\"x y\""), Value::String("x y".into()));
        let arr = parse_value("[\"blocks.0.hook_mlp_out\", \"blocks.1.hook_attn_out\"]");
        assert_eq!(arr.as_array().map(|a| a.len()), Some(2));
        let t = parse_value("{ kind = \"topk\", k = 8 }");
        assert_eq!(t.get("k"), Some(&Value::Integer(8)));
    }

    #[test]
    fn keys_split_with_quotes() {
        assert_eq!(parse_key("a.b").unwrap(), vec!["a", "b"]);
        assert_eq!(
            parse_key("sweep.\"run.seed\"").unwrap(),
            vec!["sweep", "run.seed"]
        );
        assert!(parse_key("a..b").is_err());
        assert!(parse_key("").is_err());
        assert!(parse_set("novalue").is_err());
    }

    #[test]
    fn assign_merges_plain_tables_and_replaces_tagged_ones() {
        let mut t: Table =
            toml::from_str("[sae]\nexpansion_factor = 8\narch = { kind = \"topk\", k = 32 }\n")
                .unwrap();
        assign(
            &mut t,
            &["sae".into()],
            parse_value("{ expansion_factor = 2 }"),
        )
        .unwrap();
        assert_eq!(t["sae"]["expansion_factor"].as_integer(), Some(2));
        assert_eq!(t["sae"]["arch"]["k"].as_integer(), Some(32));
        assign(
            &mut t,
            &["sae".into(), "arch".into()],
            parse_value("{ kind = \"relu_l1\", l1_coefficient = 5.0 }"),
        )
        .unwrap();
        assert!(t["sae"]["arch"].get("k").is_none());
        assert!(assign(
            &mut t,
            &["sae".into(), "expansion_factor".into(), "x".into()],
            Value::Integer(1)
        )
        .is_err());
    }

    proptest! {
        #[test]
        fn set_roundtrips_integers_and_plain_strings(
            key in "[a-z][a-z_]{0,8}(\\.[a-z][a-z_]{0,8}){0,3}",
            n in any::<i64>(),
            s in "[a-z][a-z0-9:/_-]{0,20}",
        ) {
            let a = parse_set(&format!("{key}={n}")).unwrap();
            prop_assert_eq!(a.key(), key.clone());
            prop_assert_eq!(&a.value, &Value::Integer(n));
            let b = parse_set(&format!("{key}={s}")).unwrap();
            // A bare word is a string unless TOML reads it as a boolean, number or date.
            if !matches!(s.as_str(), "true" | "false" | "inf" | "nan") {
                prop_assert_eq!(b.value, Value::String(s.clone()));
            }
            let mut t = Table::new();
            assign(&mut t, &a.path, a.value.clone()).unwrap();
            let mut cur = &Value::Table(t);
            for seg in &a.path { cur = &cur[seg.as_str()]; }
            prop_assert_eq!(cur, &Value::Integer(n));
        }
    }
}
