//! A question's id as its file gives it: a string, or an integer (many benchmarks number their
//! questions). It is one question whichever way it is written (17 and "17" are the same id: they
//! repeat each other in a file, pair across reports, seed the same sampler); the outputs write it
//! back as it was read, so `{"id": 17}` comes back as 17 and joins its benchmark's rows.
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

#[derive(Clone)]
pub struct ItemId {
    text: String,
    /// Read as a JSON integer (then `text` is its decimal form).
    number: bool,
}

impl ItemId {
    /// A string id.
    pub fn text(text: impl Into<String>) -> ItemId {
        ItemId {
            text: text.into(),
            number: false,
        }
    }

    /// The id a JSON value gives: a string or an integer (null and other types: why not).
    pub fn from_json(value: &Value) -> Result<ItemId, String> {
        match value {
            Value::String(s) => Ok(ItemId::text(s.clone())),
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(ItemId {
                text: n.to_string(),
                number: true,
            }),
            other => Err(format!("`id` must be a string or an integer, not {other}")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<&str> for ItemId {
    fn from(text: &str) -> ItemId {
        ItemId::text(text)
    }
}

impl std::ops::Deref for ItemId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl Borrow<str> for ItemId {
    fn borrow(&self) -> &str {
        &self.text
    }
}

// (by the text alone, as `str` compares and hashes, so maps of ItemId are looked up by &str)
impl PartialEq for ItemId {
    fn eq(&self, other: &ItemId) -> bool {
        self.text == other.text
    }
}

impl Eq for ItemId {}

impl Hash for ItemId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}

impl PartialOrd for ItemId {
    fn partial_cmp(&self, other: &ItemId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ItemId {
    fn cmp(&self, other: &ItemId) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

/// As the file writes it: `17` or `"q17"` (messages quote string ids only).
impl std::fmt::Debug for ItemId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.number {
            true => f.write_str(&self.text),
            false => write!(f, "{:?}", self.text),
        }
    }
}

impl std::fmt::Display for ItemId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for ItemId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (
            self.number,
            self.text.parse::<i64>(),
            self.text.parse::<u64>(),
        ) {
            (true, Ok(n), _) => s.serialize_i64(n),
            (true, _, Ok(n)) => s.serialize_u64(n),
            _ => s.serialize_str(&self.text),
        }
    }
}

impl<'de> Deserialize<'de> for ItemId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ItemId, D::Error> {
        ItemId::from_json(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_back_as_read_and_one_id_either_way() {
        for line in [
            r#"17"#,
            r#""17""#,
            r#""q7""#,
            r#"-3"#,
            r#"18446744073709551615"#,
        ] {
            let id: ItemId = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&id).unwrap(), line);
        }
        let (number, text): (ItemId, ItemId) = (
            serde_json::from_str("17").unwrap(),
            serde_json::from_str("\"17\"").unwrap(),
        );
        assert_eq!(number, text);
        let mut seen = std::collections::HashMap::new();
        seen.insert(number.clone(), 1);
        assert_eq!(seen.get("17"), Some(&1));
        assert_eq!(format!("id {number:?} and {text:?}"), "id 17 and \"17\"");
        for bad in ["1.5", "null", "[1]", "true"] {
            let e = serde_json::from_str::<ItemId>(bad).unwrap_err().to_string();
            assert!(e.contains("`id` must be a string or an integer"), "{e}");
        }
    }
}
