//! Typed parsing of one pipeline-file section that reports every problem, not the first.
//!
//! serde stops at the first error. To collect them all, each section is deserialized
//! from the raw TOML value in a loop: unknown keys are gathered by `serde_ignored` (they do
//! not stop deserialization); on a type error the offending key is recorded and removed
//! from the raw value, on a missing required key a placeholder is put in, and the loop
//! runs again until the section deserializes. Only the first message per key is kept.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::{Table, Value};

/// One problem in a pipeline file: the key path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `data.context_len` or `capture.hookpoints[1]`.
    pub key: String,
    /// What is wrong and, where we can tell, how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// All problems found so far, at most one per key, in discovery order.
#[derive(Debug, Default, Clone)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Record `message` at `key` unless that key already has a problem.
    pub fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if !self.has(&key) {
            self.0.push(Problem {
                key,
                message: message.into(),
            });
        }
    }

    /// Whether `key` already has a problem.
    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|p| p.key == key)
    }

    /// No problems.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `a.b` + `c` with the dot only where needed.
pub fn join(prefix: &str, key: &str) -> String {
    match (prefix.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{key}"),
    }
}

/// "did you mean X?" for the closest candidate, if any is close: within two edits
/// (Damerau) or a Jaro-Winkler similarity above 0.8 (a shared prefix), the fewest edits
/// first.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(word, c),
                strsim::jaro_winkler(word, c),
                *c,
            )
        })
        .filter(|(d, jw, _)| *d <= 2 || *jw > 0.8)
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| format!("; did you mean {c}?"))
        .unwrap_or_default()
}

/// The field names of struct `T` (serde introspection: a deserializer that only records
/// what `deserialize_struct` asks for).
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Introspect<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Introspect<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("introspection"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("introspection"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Introspect(&mut fields));
    fields
}

/// The backticked words of a serde message after "expected".
fn expected_words(msg: &str) -> Vec<&str> {
    let Some(rest) = msg.split_once("expected").map(|(_, r)| r) else {
        return Vec::new();
    };
    rest.split('`').skip(1).step_by(2).collect()
}

/// The first backticked word of a serde message.
fn first_tick(msg: &str) -> Option<&str> {
    msg.split('`').nth(1)
}

/// Deserialize `T` from `value` (the section `section`), recording every problem.
/// `None` when the section could not be built.
pub fn section<T: DeserializeOwned>(
    section: &str,
    mut value: Value,
    probs: &mut Problems,
) -> Option<T> {
    const PLACEHOLDERS: usize = 6;
    let placeholder = |i: usize| match i {
        0 => Value::String("placeholder".into()),
        1 => Value::Integer(1),
        2 => Value::Float(1.0),
        3 => Value::Boolean(false),
        4 => Value::Array(Vec::new()),
        _ => Value::Table(Table::new()),
    };
    let fields = field_names::<T>();
    let mut filled: Option<(Vec<String>, usize)> = None;
    for _ in 0..256 {
        let mut unknown = Vec::new();
        let mut on_unknown = |p: serde_ignored::Path| unknown.push(p.to_string());
        let de = serde_ignored::Deserializer::new(value.clone(), &mut on_unknown);
        let res: Result<T, serde_path_to_error::Error<toml::de::Error>> =
            serde_path_to_error::deserialize(de);
        for u in unknown {
            let hint = if u.contains('.') {
                String::new()
            } else {
                suggest(&u, fields)
            };
            probs.add(join(section, &u), format!("unknown key{hint}"));
        }
        match res {
            Ok(t) => return Some(t),
            Err(e) => {
                let mut path: Vec<String> = Vec::new();
                for seg in e.path().iter() {
                    match seg {
                        serde_path_to_error::Segment::Map { key } => path.push(key.clone()),
                        serde_path_to_error::Segment::Seq { .. } => break,
                        _ => {}
                    }
                }
                let msg = e.inner().message().to_string();
                let key_of = |p: &[String]| join(section, &p.join("."));
                if msg.starts_with("missing field") {
                    let Some(field) = first_tick(&msg) else {
                        probs.add(key_of(&path), msg);
                        return None;
                    };
                    let mut full = path.clone();
                    full.push(field.to_string());
                    // A key missing inside a placeholder is the placeholder's fault, not the
                    // file's: stop here (the key already has its problem).
                    if let Some((p, _)) = &filled {
                        if full.len() > p.len() && full.starts_with(p) {
                            return None;
                        }
                    }
                    // Try the next placeholder type for this key.
                    let next = match &filled {
                        Some((p, i)) if *p == full => i + 1,
                        _ => 0,
                    };
                    if next == 0 {
                        probs.add(key_of(&full), "required key is missing");
                    }
                    if next >= PLACEHOLDERS
                        || set_at(&mut value, &full, placeholder(next)).is_none()
                    {
                        return None;
                    }
                    filled = Some((full, next));
                    continue;
                }
                let (key_path, message) = if msg.starts_with("unknown field") {
                    let field = first_tick(&msg).unwrap_or("?").to_string();
                    let expected = expected_words(&msg);
                    let hint = suggest(&field, &expected);
                    let mut full = path.clone();
                    full.push(field);
                    (full, format!("unknown key{hint}"))
                } else if msg.starts_with("unknown variant") {
                    let word = first_tick(&msg).unwrap_or("?");
                    let expected = expected_words(&msg);
                    (
                        path.clone(),
                        format!(
                            "'{word}' is not one of {}{}",
                            expected.join(", "),
                            suggest(word, &expected)
                        ),
                    )
                } else {
                    (path.clone(), msg.clone())
                };
                if let Some((p, i)) = filled.take() {
                    // A placeholder of the wrong type: try the next one quietly.
                    if p == path || (!path.is_empty() && p.starts_with(&path)) {
                        if i + 1 >= PLACEHOLDERS
                            || set_at(&mut value, &p, placeholder(i + 1)).is_none()
                        {
                            return None;
                        }
                        filled = Some((p, i + 1));
                        continue;
                    }
                }
                probs.add(key_of(&key_path), message);
                if remove_at(&mut value, &key_path).is_none()
                    && remove_at(&mut value, &path).is_none()
                {
                    return None;
                }
            }
        }
    }
    None
}

/// Set `path` in a table value; `None` if the path does not lead through tables.
fn set_at(value: &mut Value, path: &[String], v: Value) -> Option<()> {
    let (last, parents) = path.split_last()?;
    let mut cur = value;
    for seg in parents {
        cur = cur.as_table_mut()?.get_mut(seg)?;
    }
    cur.as_table_mut()?.insert(last.clone(), v);
    Some(())
}

/// Remove `path` from a table value; `None` if there was nothing to remove.
fn remove_at(value: &mut Value, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut cur = value;
    for seg in parents {
        cur = cur.as_table_mut()?.get_mut(seg)?;
    }
    cur.as_table_mut()?.remove(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::DataConfig;

    #[test]
    fn collects_unknown_type_and_missing_at_once() {
        let v: Value = toml::from_str(
            "files = [\"a.txt\"]\ncontext_len = \"long\"\nn_tokenz = 5\nprepend_boss = true\n",
        )
        .unwrap();
        let mut probs = Problems::default();
        let d: Option<DataConfig> = section("data", v, &mut probs);
        assert!(d.is_some());
        let keys: Vec<_> = probs.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"data.context_len"), "{probs:?}");
        assert!(keys.contains(&"data.n_tokens"), "{probs:?}");
        assert!(keys.contains(&"data.n_tokenz"), "{probs:?}");
        assert!(keys.contains(&"data.prepend_boss"), "{probs:?}");
        let bos = probs
            .0
            .iter()
            .find(|p| p.key == "data.prepend_boss")
            .unwrap();
        assert!(bos.message.contains("did you mean prepend_bos?"), "{bos}");
        assert_eq!(probs.0.len(), 4, "{probs:?}");
    }

    #[test]
    fn field_names_lists_struct_fields() {
        let f = field_names::<DataConfig>();
        assert!(f.contains(&"context_len") && f.contains(&"shuffle_seed"));
    }
}
