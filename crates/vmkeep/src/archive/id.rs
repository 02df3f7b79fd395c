//! Generation ids: the name of a generation's folder, a lowercase hyphenated UUID. The ids
//! vmkeep makes are UUIDv7 (time first, then random), so that their order as text is the
//! order in which the generations were made.

use std::borrow::Borrow;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The id of a generation. Only a valid id can be held (it is checked where it is made or
/// read), so every holder may use it as a folder name and as the 16 bytes of file headers.
/// Ordered as its text, which is the order of the generations.
#[derive(Clone)]
pub struct GenerationId {
    text: String,
    uuid: uuid::Uuid,
}

impl GenerationId {
    /// Parse `s`: a lowercase hyphenated UUID, the only form a generation folder has.
    pub fn parse(s: &str) -> Result<GenerationId> {
        match uuid::Uuid::try_parse(s) {
            Ok(uuid) if is_canonical(s) => Ok(GenerationId {
                text: s.to_string(),
                uuid,
            }),
            _ => Err(Error::usage(format!("{s:?} is not a generation id"))),
        }
    }

    /// Is `s` a generation id (a lowercase hyphenated UUID)?
    pub fn is_valid(s: &str) -> bool {
        uuid::Uuid::try_parse(s).is_ok() && is_canonical(s)
    }

    /// A new id that sorts after `after` (UUIDv7: time first, then random).
    pub fn new_after(after: Option<&GenerationId>) -> GenerationId {
        loop {
            let uuid = uuid::Uuid::now_v7();
            let id = GenerationId {
                text: uuid.hyphenated().to_string(),
                uuid,
            };
            if after.is_none_or(|a| id > *a) {
                return id;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The id as text (the folder name).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The 16 bytes of the id, as stored in file headers.
    pub fn bytes(&self) -> [u8; 16] {
        *self.uuid.as_bytes()
    }
}

/// The one text form of each UUID: 36 characters, lowercase.
fn is_canonical(s: &str) -> bool {
    s.len() == 36 && s == s.to_ascii_lowercase()
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for GenerationId {
    type Err = Error;
    fn from_str(s: &str) -> Result<GenerationId> {
        GenerationId::parse(s)
    }
}

// Equality, order and hash are those of the text, so that `Borrow<str>` holds.
impl PartialEq for GenerationId {
    fn eq(&self, other: &GenerationId) -> bool {
        self.text == other.text
    }
}
impl Eq for GenerationId {}
impl PartialOrd for GenerationId {
    fn partial_cmp(&self, other: &GenerationId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for GenerationId {
    fn cmp(&self, other: &GenerationId) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}
impl std::hash::Hash for GenerationId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}

impl PartialEq<str> for GenerationId {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}
impl PartialEq<&str> for GenerationId {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}
impl PartialEq<String> for GenerationId {
    fn eq(&self, other: &String) -> bool {
        self.text == *other
    }
}

impl std::ops::Deref for GenerationId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}
impl AsRef<str> for GenerationId {
    fn as_ref(&self) -> &str {
        &self.text
    }
}
impl AsRef<Path> for GenerationId {
    fn as_ref(&self) -> &Path {
        Path::new(&self.text)
    }
}
impl Borrow<str> for GenerationId {
    fn borrow(&self) -> &str {
        &self.text
    }
}
impl From<GenerationId> for String {
    fn from(id: GenerationId) -> String {
        id.text
    }
}

impl Serialize for GenerationId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GenerationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<GenerationId, D::Error> {
        let s = String::deserialize(d)?;
        GenerationId::parse(&s)
            .map_err(|_| serde::de::Error::custom(format_args!("{s:?} is not a generation id")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "0193a000-0000-7000-8000-000000000001";

    #[test]
    fn only_canonical_uuids_are_ids() {
        let id = GenerationId::parse(G).unwrap();
        assert_eq!(id.as_str(), G);
        assert_eq!(id, G);
        assert_eq!(id.to_string(), G);
        assert_eq!(id.bytes(), *uuid::Uuid::try_parse(G).unwrap().as_bytes());
        // Forms the uuid crate reads, but that are no generation folder's name.
        for bad in [
            "",
            "latest",
            "0193A000-0000-7000-8000-000000000001",
            "0193a000000070008000000000000001",
            "{0193a000-0000-7000-8000-000000000001}",
            "urn:uuid:0193a000-0000-7000-8000-000000000001",
            "../0193a000-0000-7000-8000-000000000001",
        ] {
            assert!(bad.parse::<GenerationId>().is_err(), "{bad:?} accepted");
            assert!(!GenerationId::is_valid(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_is_the_text_and_refuses_invalid_ids() {
        #[derive(Serialize, Deserialize)]
        struct T {
            id: GenerationId,
        }
        let t: T = toml::from_str(&format!("id = \"{G}\"")).unwrap();
        assert_eq!(toml::to_string(&t).unwrap(), format!("id = \"{G}\"\n"));
        let e = toml::from_str::<T>("id = \"latest\"").err().unwrap();
        assert!(e.to_string().contains("is not a generation id"), "{e}");
    }

    #[test]
    fn new_ids_sort_after_the_given_one() {
        let a = GenerationId::new_after(None);
        let b = GenerationId::new_after(Some(&a));
        assert!(b > a);
        assert!(GenerationId::is_valid(&a));
    }
}
