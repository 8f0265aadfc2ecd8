//! A point's tags, read from its series key when the point is encoded.
//!
//! A shard flushes one point per open (series, bucket) row, and a point
//! waits in the outbox (and in every checkpoint) until the sink confirms
//! it. As a map of owned strings a point's tags cost ~720 bytes in 14 heap
//! blocks (`series-memory`), built at every flush. [`Tags`] instead shares
//! the series key the shard already holds and a [`KeyLayout`] that names
//! its values: no allocation per point, and the names and values are laid
//! out only when the sink encodes the point.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::router::{KeyValues, MAX_KEY_VALUES, SharedKey};

/// A point's tags (OpenTSDB's name for labels), sorted by name, each name
/// once.
#[derive(Clone)]
pub struct Tags(Repr);

#[derive(Clone)]
enum Repr {
    /// Pairs sorted by name (from a map: a checkpoint, a test, an echo).
    Owned(Vec<(String, String)>),
    /// The values of a series key, named by a layout; checked by
    /// [`KeyLayout::tags`] when the point was made.
    Key {
        key: SharedKey,
        layout: Arc<KeyLayout>,
    },
}

/// How a series key's values become tags.
///
/// The key is one prefix byte (the router's rollup index, which the layout
/// does not read), then each value followed by a NUL byte, some written as a
/// reference to an earlier one ([`KeyValues`]). The layout names
/// the values in key order and adds constant tags (the router's
/// `rollup=<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Every tag, sorted by name.
    sorted: Vec<(String, Source)>,
    /// Per tag of `sorted`, its JSON ready to copy: `"name":` for a value
    /// from the key, `"name":"value"` for a constant.
    json: Vec<Box<[u8]>>,
    /// Values a key must hold.
    values: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// The key's value at this index.
    Value(usize),
    /// A constant.
    Fixed(String),
}

/// Why a [`KeyLayout`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Two tags have the same name.
    #[error("tag {0:?} is named twice")]
    Duplicate(String),
    /// More values than [`MAX_KEY_VALUES`].
    #[error("{0} values in a key (at most {MAX_KEY_VALUES})")]
    TooManyValues(usize),
}

impl KeyLayout {
    /// A layout naming a key's values `values` (in key order), plus the
    /// constant tags `fixed`.
    ///
    /// # Errors
    ///
    /// If a name appears twice, or there are more than [`MAX_KEY_VALUES`]
    /// values.
    pub fn new<'a>(
        values: impl IntoIterator<Item = &'a str>,
        fixed: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, LayoutError> {
        let mut sorted: Vec<(String, Source)> = values
            .into_iter()
            .enumerate()
            .map(|(i, name)| (name.to_owned(), Source::Value(i)))
            .collect();
        let values = sorted.len();
        if values > MAX_KEY_VALUES {
            return Err(LayoutError::TooManyValues(values));
        }
        sorted.extend(fixed.into_iter().map(|(n, v)| (n, Source::Fixed(v))));
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(LayoutError::Duplicate(w[0].0.clone()));
        }
        let json = sorted
            .iter()
            .map(|(name, source)| {
                let mut json = Vec::new();
                super::push_json_str(name, &mut json);
                json.push(b':');
                if let Source::Fixed(value) = source {
                    super::push_json_str(value, &mut json);
                }
                json.into_boxed_slice()
            })
            .collect();
        Ok(KeyLayout {
            sorted,
            json,
            values,
        })
    }

    /// The tags of the series `key`, sharing it; `None` if the key does not
    /// hold exactly this layout's values ([`KeyValues::parse`]).
    pub fn tags(self: &Arc<Self>, key: &SharedKey) -> Option<Tags> {
        let (_, values) = KeyValues::parse(key)?;
        if values.len() != self.values {
            return None;
        }
        Some(Tags(Repr::Key {
            key: key.clone(),
            layout: self.clone(),
        }))
    }
}

impl Tags {
    /// No tags.
    pub fn new() -> Self {
        Tags(Repr::Owned(Vec::new()))
    }

    /// Brings the key the tags are read from into cache ([`touch_key`]).
    #[inline]
    pub(crate) fn touch(&self) {
        if let Repr::Key { key, .. } = &self.0 {
            touch_key(key);
        }
    }

    /// The tags as (name, value), sorted by name.
    pub fn iter(&self) -> Iter<'_> {
        match &self.0 {
            Repr::Owned(pairs) => Iter(IterRepr::Owned(pairs.iter())),
            Repr::Key { key, layout } => Iter(IterRepr::Key {
                values: KeyValues::split_unchecked(key),
                sorted: layout.sorted.iter(),
            }),
        }
    }

    /// Appends the tags as a JSON object, as serde_json writes their
    /// `Serialize` form. Tags read from a key are copied with the layout's
    /// JSON for the names, unless a value needs escaping (never one the
    /// router made): then, as for owned tags, each string is escaped.
    pub(super) fn write_json(&self, out: &mut Vec<u8>) {
        if let Repr::Key { key, layout } = &self.0 {
            let start = out.len();
            let values = KeyValues::split_unchecked(key);
            let mut plain = true;
            out.push(b'{');
            for (i, ((_, source), json)) in layout.sorted.iter().zip(&layout.json).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(json);
                if let Source::Value(v) = source {
                    out.push(b'"');
                    // Most values are written in full: one piece to copy.
                    let [head, dot, to] = values.pieces(*v);
                    plain &= super::json_plain(head);
                    out.extend_from_slice(head);
                    if !to.is_empty() {
                        plain &= super::json_plain(to);
                        out.extend_from_slice(dot);
                        out.extend_from_slice(to);
                    }
                    out.push(b'"');
                }
            }
            out.push(b'}');
            if plain {
                return;
            }
            out.truncate(start);
        }
        out.push(b'{');
        for (i, (name, value)) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            super::push_json_str(name, out);
            out.push(b':');
            super::push_json_str(&value, out);
        }
        out.push(b'}');
    }

    /// The value of tag `name`.
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Number of tags.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Owned(pairs) => pairs.len(),
            Repr::Key { layout, .. } => layout.sorted.len(),
        }
    }

    /// Whether there is no tag.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tags as an owned map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(n, v)| (n.to_owned(), v.into_owned()))
            .collect()
    }
}

/// Keys a loop over many of them brings into cache at once with
/// [`touch_key`].
pub(crate) const TOUCH_RUN: usize = 32;

/// Brings `key` into cache, ahead of its use in a loop over many keys.
///
/// Keys lie where the shard's dictionary allocated them, so each is a cache
/// miss (two lines for a ~70-byte key after its reference counts) wherever
/// many live series are flushed, encoded or checkpointed. A loop that uses
/// each key in turn waits for each miss in turn; reading both ends of every
/// key of a run of [`TOUCH_RUN`] first, in a loop this short, lets their
/// misses be under way at once. (A shard's flush of 100 000 rows: −49 %,
/// BENCHMARKS.md, session 7.) `black_box` only keeps the reads from being
/// optimized away: their values are not needed.
#[inline]
pub(crate) fn touch_key(key: &[u8]) {
    std::hint::black_box((key.first().copied(), key.last().copied()));
}

impl Default for Tags {
    fn default() -> Self {
        Tags::new()
    }
}

/// The tags of a point, sorted by name.
#[derive(Debug, Clone)]
pub struct Iter<'a>(IterRepr<'a>);

#[derive(Debug, Clone)]
enum IterRepr<'a> {
    Owned(std::slice::Iter<'a, (String, String)>),
    Key {
        /// The key's values, in key order; checked when the tags were made.
        values: KeyValues<'a>,
        sorted: std::slice::Iter<'a, (String, Source)>,
    },
}

impl<'a> Iterator for Iter<'a> {
    /// A value is copied only where its key holds it as a reference.
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            IterRepr::Owned(pairs) => pairs
                .next()
                .map(|(n, v)| (n.as_str(), Cow::Borrowed(v.as_str()))),
            IterRepr::Key { values, sorted } => sorted.next().map(|(name, source)| {
                let value = match source {
                    Source::Value(i) => values.get(*i),
                    Source::Fixed(v) => Cow::Borrowed(v.as_str()),
                };
                (name.as_str(), value)
            }),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.0 {
            IterRepr::Owned(pairs) => pairs.size_hint(),
            IterRepr::Key { sorted, .. } => sorted.size_hint(),
        }
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = (&'a str, Cow<'a, str>);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(map: BTreeMap<String, String>) -> Self {
        Tags(Repr::Owned(map.into_iter().collect()))
    }
}

impl FromIterator<(String, String)> for Tags {
    /// Sorted by name; of two pairs with one name, the last is kept (as a
    /// map would).
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        pairs.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

/// Equal when the (name, value) pairs are, however each side holds them.
impl PartialEq for Tags {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for Tags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A JSON object (a map in other formats), as OpenTSDB's `tags`.
impl Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Tags::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Arc<KeyLayout> {
        Arc::new(
            KeyLayout::new(
                ["zone", "customer", "type"],
                [("rollup".to_string(), "zone".to_string())],
            )
            .unwrap(),
        )
    }

    fn key(bytes: &[u8]) -> SharedKey {
        bytes.into()
    }

    #[test]
    fn a_key_reads_as_tags_sorted_by_name() {
        let tags = layout()
            .tags(&key(b"\x01example.com\x001042\0A\0"))
            .unwrap();
        let pairs: Vec<_> = tags.iter().collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_ref())).collect();
        assert_eq!(
            pairs,
            [
                ("customer", "1042"),
                ("rollup", "zone"),
                ("type", "A"),
                ("zone", "example.com")
            ]
        );
        assert_eq!(tags.len(), 4);
        assert_eq!(tags.get("type").as_deref(), Some("A"));
        assert_eq!(tags.get("host"), None);
        // The same tags held as a map are equal, and encode the same.
        let owned = Tags::from(tags.to_map());
        assert_eq!(tags, owned);
        assert_eq!(
            serde_json::to_string(&tags).unwrap(),
            serde_json::to_string(&owned).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&tags).unwrap(),
            r#"{"customer":"1042","rollup":"zone","type":"A","zone":"example.com"}"#
        );
        let back: Tags = serde_json::from_str(&serde_json::to_string(&tags).unwrap()).unwrap();
        assert_eq!(back, tags);
    }

    #[test]
    fn json_is_serde_jsons_whether_or_not_a_value_needs_escaping() {
        let layout = Arc::new(
            KeyLayout::new(["z\"one", "customer"], [("rollup".into(), "r\\1".into())]).unwrap(),
        );
        for k in [
            &b"\x01example.com\x001042\0"[..],
            b"\x01\0\0",
            b"\x01quo\"te\0tab\there\0",
            b"\x01back\\slash\0\x1f\0",
            "\x01ü€\0/\u{7f}\0".as_bytes(),
        ] {
            let tags = layout.tags(&key(k)).unwrap();
            let mut ours = Vec::new();
            tags.write_json(&mut ours);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&tags).unwrap()
            );
            // The same tags held as a map take the escaping path.
            let mut owned = Vec::new();
            Tags::from(tags.to_map()).write_json(&mut owned);
            assert_eq!(
                String::from_utf8(owned).unwrap(),
                serde_json::to_string(&tags).unwrap()
            );
        }
    }

    #[test]
    fn values_written_as_references_read_in_full() {
        let layout = Arc::new(KeyLayout::new(["zone", "record", "apex", "pop"], []).unwrap());
        let key: SharedKey =
            crate::router::encode_key(1, ["ex.com", "www.ex.com", "ex.com", "lga"]).into();
        assert_eq!(
            &key[..],
            b"\x01ex.com\0www\x01\0\x01\0lga\0",
            "written shorter"
        );
        let tags = layout.tags(&key).unwrap();
        let expect = [
            ("apex", "ex.com"),
            ("pop", "lga"),
            ("record", "www.ex.com"),
            ("zone", "ex.com"),
        ];
        let pairs: Vec<_> = tags.iter().collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_ref())).collect();
        assert_eq!(pairs, expect);
        let mut ours = Vec::new();
        tags.write_json(&mut ours);
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            r#"{"apex":"ex.com","pop":"lga","record":"www.ex.com","zone":"ex.com"}"#
        );
        assert_eq!(tags, Tags::from(tags.to_map()));
    }

    #[test]
    fn empty_values_are_values() {
        let tags = layout().tags(&key(b"\x01\0\0\0")).unwrap();
        assert_eq!(tags.get("zone").as_deref(), Some(""));
        assert_eq!(tags.get("type").as_deref(), Some(""));
    }

    #[test]
    fn a_key_that_does_not_fit_the_layout_has_no_tags() {
        let layout = layout();
        for bad in [
            &b""[..],
            b"\x01",
            b"\x01a\0b\0",           // two values for three names
            b"\x01a\0b\0c\0d\0",     // four
            b"\x01a\0b\0c",          // no terminating NUL
            b"\x01a\0\xff\xfe\0c\0", // not UTF-8
            b"\x01a\0b\0\x04\0",     // a reference to a later value
            b"\x01a\0b\x01c\0d\0",   // a reference byte inside a value
            b"\x01\0b\x01\0c\0",     // a reference to an empty value
            b"\x01a\0b\x01\0\x02\0", // a reference to a reference
        ] {
            assert!(layout.tags(&key(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_layout_refuses_a_name_twice_and_too_many_values() {
        assert_eq!(
            KeyLayout::new(["a", "rollup"], [("rollup".into(), "x".into())]),
            Err(LayoutError::Duplicate("rollup".into()))
        );
        assert_eq!(
            KeyLayout::new(["a", "b", "a"], []),
            Err(LayoutError::Duplicate("a".into()))
        );
        let names: Vec<String> = (0..=MAX_KEY_VALUES).map(|i| format!("t{i}")).collect();
        assert_eq!(
            KeyLayout::new(names.iter().map(String::as_str), []),
            Err(LayoutError::TooManyValues(MAX_KEY_VALUES + 1))
        );
        let names = &names[..MAX_KEY_VALUES];
        let layout = Arc::new(KeyLayout::new(names.iter().map(String::as_str), []).unwrap());
        let key: Vec<u8> = std::iter::once(0)
            .chain(names.iter().flat_map(|n| n.bytes().chain([0])))
            .collect();
        let tags = layout.tags(&key.into()).unwrap();
        assert!(tags.iter().all(|(n, v)| n == v), "{tags:?}");
    }

    #[test]
    fn pairs_collect_sorted_with_the_last_of_a_name_kept() {
        let tags: Tags = [("b", "1"), ("a", "2"), ("b", "3")]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let pairs: Vec<_> = tags.iter().collect();
        assert_eq!(pairs, [("a", "2".into()), ("b", "3".into())]);
    }
}
