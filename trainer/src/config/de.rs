//! A serde `Deserializer` over a `serde_yaml::Value` that remembers where it is, so that every
//! error names its key path (`train.schedule.gamma`, `peft.target_modules[1]`).
//!
//! serde's own errors carry no location once the YAML is a `Value` (and overrides only exist as
//! a `Value`), so this walks the tree itself. It also gives config-friendly behaviour:
//! - a null section (`peft:` with every key commented out) means "all defaults";
//! - a number or bool where a string is expected is taken as text (`output_dir: 2024`);
//! - unknown keys and enum values keep serde's list of what is valid, for suggestions.
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use serde_yaml::{Mapping, Value};

/// A deserialization error and the key path where it happened.
#[derive(Debug)]
pub(crate) struct DeError {
    /// Set by the innermost value that saw the error; outer levels leave it alone.
    pub path: Option<String>,
    pub kind: DeErrorKind,
}

#[derive(Debug)]
pub(crate) enum DeErrorKind {
    UnknownKey {
        key: String,
        valid: &'static [&'static str],
    },
    Invalid {
        expected: String,
        got: String,
    },
    Other(String),
}

impl DeError {
    fn new(kind: DeErrorKind) -> Self {
        DeError { path: None, kind }
    }

    fn at(mut self, path: &str) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_string());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let path = self.path.as_deref().unwrap_or("config");
        match &self.kind {
            DeErrorKind::UnknownKey { key, .. } => write!(f, "{path}: unknown key {key:?}"),
            DeErrorKind::Invalid { expected, got } => {
                write!(f, "{path}: expected {expected}, got {got}")
            }
            DeErrorKind::Other(msg) => write!(f, "{path}: {msg}"),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::new(DeErrorKind::Other(msg.to_string()))
    }

    fn invalid_type(unexp: Unexpected, exp: &dyn Expected) -> Self {
        DeError::new(DeErrorKind::Invalid {
            expected: exp.to_string(),
            got: describe(&unexp),
        })
    }

    fn invalid_value(unexp: Unexpected, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(DeErrorKind::Invalid {
            expected: one_of(expected),
            got: format!("{variant:?}"),
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(DeErrorKind::UnknownKey {
            key: field.to_string(),
            valid: expected,
        })
    }
}

fn one_of(variants: &[&str]) -> String {
    format!("one of {}", variants.join(", "))
}

/// A value as the user would recognise it in their YAML.
fn describe(unexp: &Unexpected) -> String {
    match unexp {
        Unexpected::Str(s) => format!("{s:?}"),
        Unexpected::Unsigned(u) => u.to_string(),
        Unexpected::Signed(i) => i.to_string(),
        // Debug keeps `1.0` and `1e-5` as such, where Display would print `1` and `0.00001`.
        Unexpected::Float(f) => format!("{f:?}"),
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unit | Unexpected::Option => "null".to_string(),
        Unexpected::Seq => "a list".to_string(),
        Unexpected::Map => "a mapping".to_string(),
        other => other.to_string(),
    }
}

/// `describe` for a whole YAML value.
pub(crate) fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (None, Some(i), _) => i.to_string(),
            (None, None, Some(f)) => format!("{f:?}"),
            _ => n.to_string(),
        },
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Deserialize `T` from the whole config `value`.
pub(crate) fn from_value<'de, T: de::Deserialize<'de>>(value: &Value) -> Result<T, DeError> {
    T::deserialize(PathDe {
        value,
        path: String::new(),
    })
}

struct PathDe<'v> {
    value: &'v Value,
    path: String,
}

impl<'de> Deserializer<'de> for PathDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let PathDe { value, path } = self;
        let result = match value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, Some(f)) => visitor.visit_f64(f),
                _ => Err(de::Error::custom(format!("unreadable number {n}"))),
            },
            Value::String(s) => visitor.visit_str(s),
            Value::Sequence(items) => visitor.visit_seq(Items {
                iter: items.iter().enumerate(),
                parent: &path,
            }),
            Value::Mapping(map) => visitor.visit_map(Entries {
                iter: map.iter(),
                parent: &path,
                pending: None,
            }),
            Value::Tagged(t) => Err(de::Error::custom(format!(
                "YAML tags are not supported (found {})",
                t.tag
            ))),
        };
        result.map_err(|e| e.at(&path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let value = self.value;
        match value {
            Value::Null => visitor.visit_none().map_err(|e: DeError| e.at(&self.path)),
            _ => visitor.visit_some(self),
        }
    }

    // Scalars are text where text is expected: `output_dir: 2024`, `--set model.path=123`. Not
    // a fraction: YAML has parsed it already, and its text would not be what was written
    // (`output_dir: 2024.10` is the number 2024.1, `1e3` 1000.0): refused, asking for quotes.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let value = self.value;
        let text = match value {
            Value::Number(n) if n.is_f64() => {
                return Err(DeError::new(DeErrorKind::Invalid {
                    expected: "text (YAML read a number here, which may not be spelled as written: quote it, e.g. \"2024.10\")".to_string(),
                    got: format!("the number {n}"),
                })
                .at(&self.path))
            }
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return self.deserialize_any(visitor),
        };
        visitor
            .visit_string(text)
            .map_err(|e: DeError| e.at(&self.path))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let value = self.value;
        match value {
            // An empty section: every key takes its default.
            Value::Null => {
                let empty = Mapping::new();
                visitor
                    .visit_map(Entries {
                        iter: empty.iter(),
                        parent: &self.path,
                        pending: None,
                    })
                    .map_err(|e| e.at(&self.path))
            }
            Value::Mapping(_) => self.deserialize_any(visitor),
            other => Err(DeError::new(DeErrorKind::Invalid {
                expected: "a section (a mapping of keys)".to_string(),
                got: describe_value(other),
            })
            .at(&self.path)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let value = self.value;
        let result = match value {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(DeError::new(DeErrorKind::Invalid {
                expected: one_of(variants),
                got: describe_value(other),
            })),
        };
        result.map_err(|e| e.at(&self.path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// The entries of a mapping; each value is deserialized at `parent.key`.
struct Entries<'v, 'p> {
    iter: serde_yaml::mapping::Iter<'v>,
    parent: &'p str,
    pending: Option<(&'v Value, String)>,
}

impl<'de> MapAccess<'de> for Entries<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let key = match key {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(DeError::new(DeErrorKind::Invalid {
                    expected: "text keys".to_string(),
                    got: format!("the key {}", describe_value(other)),
                })
                .at(self.parent))
            }
        };
        let path = join(self.parent, &key);
        let out = seed
            .deserialize(key.as_str().into_deserializer())
            .map_err(|e: DeError| e.at(&path))?;
        self.pending = Some((value, path));
        Ok(Some(out))
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, DeError> {
        let (value, path) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("a value was asked for before its key"))?;
        seed.deserialize(PathDe { value, path })
    }
}

/// The items of a list; item i is deserialized at `parent[i]`.
struct Items<'v, 'p> {
    iter: std::iter::Enumerate<std::slice::Iter<'v, Value>>,
    parent: &'p str,
}

impl<'de> SeqAccess<'de> for Items<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.iter.next() {
            None => Ok(None),
            Some((i, value)) => seed
                .deserialize(PathDe {
                    value,
                    path: format!("{}[{i}]", self.parent),
                })
                .map(Some),
        }
    }
}
