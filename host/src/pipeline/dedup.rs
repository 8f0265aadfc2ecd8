//! Recognising redelivered messages that were already counted.
//!
//! A message is counted when the pipeline routes it, and acknowledged at a
//! later checkpoint. If the connection dies in between (or the host
//! restarts), the broker redelivers it with `redelivered = true`, and
//! counting it again would double its samples. So the pipeline remembers the
//! identity of every counted message whose acknowledgement the broker has
//! not yet confirmed, and a redelivery whose identity it remembers is
//! skipped (and acknowledged).
//!
//! # The rule
//!
//! - A delivery the broker does not flag `redelivered` is never a
//!   duplicate: the broker has not handed it to anyone before.
//! - A message's identity is its publisher's `message_id` together with
//!   its body where it has one ([`identity`]), else its body alone. With
//!   `message_id`s unique per message (wagg's own publishers set them), a
//!   redelivery and a second, byte-identical message are told apart
//!   exactly; a publisher that reuses one id for different bodies loses
//!   nothing by it.
//! - Without a `message_id`, two byte-identical messages are one identity.
//!   A redelivered body is taken for the redelivery of an identical one that
//!   the checkpoint holds as counted but not confirmed acked. That is wrong
//!   exactly when the first was acked after that checkpoint, the second
//!   arrived before the next one, and the host died in between: the second
//!   is then dropped as a duplicate. Publishers that can send identical
//!   bodies (two POP hosts with the same counts) set `message_id`.
//!
//! Identities of the current connection are forgotten as confirmed acks
//! cover them. Those from an earlier connection (or from the checkpoint,
//! after a restart) are kept until the redeliveries are over: RabbitMQ
//! requeues unacknowledged messages at their place, ahead of newer ones, so
//! once a confirmed ack covers a fresh (not redelivered) message of the new
//! connection, no old one can come back.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::source::amqp::{Delivery, DeliveryTag};

/// Seeds the hash of a `message_id`, so that an id never equals the hash of
/// a body that happens to be the same bytes.
const MESSAGE_ID_SEED: u64 = 0x6d65_7373_6167_6569;

/// What recognises a delivery: its `message_id` and body if the publisher
/// set an id, else its body (see the module docs).
pub fn identity(d: &Delivery) -> u64 {
    match d.message_id() {
        Some(id) => {
            let mut h = xxhash_rust::xxh3::Xxh3::with_seed(MESSAGE_ID_SEED);
            // The id's length first: `ab` + `c…` and `a` + `bc…` differ.
            h.update(&(id.len() as u64).to_le_bytes());
            h.update(id.as_bytes());
            h.update(&d.body);
            h.digest()
        }
        None => xxhash_rust::xxh3::xxh3_64(&d.body),
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Dedup {
    generation: u64,
    /// Counted on this connection, not yet covered by a confirmed ack.
    pending: VecDeque<(DeliveryTag, u64)>,
    pending_set: HashMap<u64, u32>,
    /// Counted before this connection (or this process), never confirmed.
    older: HashSet<u64>,
    /// First delivery of this connection that was not a redelivery.
    first_fresh: Option<DeliveryTag>,
}

impl Dedup {
    /// Starts from the unconfirmed hashes a checkpoint held.
    pub fn restore(hashes: impl IntoIterator<Item = u64>) -> Self {
        Dedup {
            older: hashes.into_iter().collect(),
            ..Dedup::default()
        }
    }

    /// Whether a delivery was already counted.
    pub fn seen(&mut self, tag: DeliveryTag, redelivered: bool, hash: u64) -> bool {
        if tag.generation != self.generation {
            // A new connection: whatever was pending on the old one may come
            // back.
            self.generation = tag.generation;
            self.older.extend(self.pending.drain(..).map(|(_, h)| h));
            self.pending_set.clear();
            self.first_fresh = None;
        }
        if !redelivered {
            self.first_fresh.get_or_insert(tag);
            return false;
        }
        self.older.contains(&hash) || self.pending_set.contains_key(&hash)
    }

    /// Notes a counted delivery.
    pub fn counted(&mut self, tag: DeliveryTag, hash: u64) {
        self.pending.push_back((tag, hash));
        *self.pending_set.entry(hash).or_default() += 1;
    }

    /// The broker confirmed acknowledgements up to `tag`.
    pub fn acked(&mut self, tag: DeliveryTag) {
        while let Some(&(t, h)) = self.pending.front() {
            if t > tag {
                break;
            }
            self.pending.pop_front();
            if let Some(n) = self.pending_set.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    self.pending_set.remove(&h);
                }
            }
        }
        if self.first_fresh.is_some_and(|f| f <= tag) && !self.older.is_empty() {
            self.older = HashSet::new();
        }
    }

    /// Every hash still remembered, for the checkpoint.
    pub fn unconfirmed(&self) -> Vec<u64> {
        self.older
            .iter()
            .copied()
            .chain(self.pending.iter().map(|&(_, h)| h))
            .collect()
    }

    /// Number of hashes remembered.
    pub fn len(&self) -> usize {
        self.older.len() + self.pending.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(generation: u64, tag: u64) -> DeliveryTag {
        DeliveryTag { generation, tag }
    }

    #[test]
    fn a_redelivery_after_a_reconnect_is_recognised_until_fresh_messages_are_acked() {
        let mut d = Dedup::default();
        for i in 1..=3 {
            assert!(!d.seen(tag(1, i), false, 100 + i));
            d.counted(tag(1, i), 100 + i);
        }
        d.acked(tag(1, 1));
        // The connection dies before 2 and 3 are acked; they come back.
        assert!(d.seen(tag(2, 1), true, 102));
        assert!(d.seen(tag(2, 2), true, 103));
        // Acked long ago: a redelivery with its hash is new data.
        assert!(!d.seen(tag(2, 3), true, 101));
        d.counted(tag(2, 3), 101);
        assert!(!d.seen(tag(2, 4), false, 104));
        d.counted(tag(2, 4), 104);
        d.acked(tag(2, 2));
        assert!(d.seen(tag(2, 5), true, 103), "no fresh message acked yet");
        d.acked(tag(2, 4));
        assert!(d.is_empty());
    }

    #[test]
    fn identical_bodies_with_their_own_message_ids_are_two_identities() {
        let body = br#"{"pop":"p"}"#.to_vec();
        let with_id = |id: &str| {
            let mut d = Delivery::bare(body.clone(), true, tag(1, 1));
            d.properties = d.properties.with_message_id(id.into());
            identity(&d)
        };
        assert_ne!(with_id("a-1"), with_id("a-2"));
        assert_eq!(with_id("a-1"), with_id("a-1"));
        let bare = identity(&Delivery::bare(body.clone(), true, tag(1, 1)));
        assert_eq!(bare, xxhash_rust::xxh3::xxh3_64(&body));
        // An empty id is no id: the body identifies it.
        assert_eq!(with_id(""), bare);
        // An id that is the body's bytes is still not the body.
        assert_ne!(with_id(r#"{"pop":"p"}"#), bare);
        // One id reused for another body is another message.
        let mut other = Delivery::bare(b"{}".to_vec(), true, tag(1, 1));
        other.properties = other.properties.with_message_id("a-1".into());
        assert_ne!(identity(&other), with_id("a-1"));
    }

    #[test]
    fn a_restart_recognises_what_the_checkpoint_held() {
        let mut d = Dedup::restore([7, 8]);
        assert!(d.seen(tag(1, 1), true, 7));
        assert!(!d.seen(tag(1, 2), true, 9));
        assert!(!d.seen(tag(1, 3), false, 7), "not a redelivery: new data");
        d.counted(tag(1, 3), 7);
        assert_eq!(d.unconfirmed().len(), 3);
        d.acked(tag(1, 3));
        assert!(d.is_empty());
    }
}
