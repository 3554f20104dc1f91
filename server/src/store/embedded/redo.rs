//! Redo records: each change a group of writes makes to one table of the main
//! database, encoded for the journal ([`super::journal`]) and applied again from
//! it after a crash. A record puts or removes one value, so applying it twice
//! changes nothing.

use super::backend;
use super::tables::Tables;
use crate::store::StoreError;

/// One change to one table of the main database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redo<'a> {
    /// `entries[(conv, seq)] = bytes`.
    Entry {
        /// Conversation.
        conv: &'a str,
        /// Seq.
        seq: u64,
        /// JSON of the entry.
        bytes: &'a [u8],
    },
    /// `entries[(conv, seq)]` removed (expiry).
    RemoveEntry {
        /// Conversation.
        conv: &'a str,
        /// Seq.
        seq: u64,
    },
    /// `seqs[conv] = (seq, time_ms)`.
    Seq {
        /// Conversation.
        conv: &'a str,
        /// Last seq.
        seq: u64,
        /// Its server time.
        time_ms: u64,
    },
    /// `convs[conv] = bytes`.
    Conv {
        /// Conversation.
        conv: &'a str,
        /// JSON of the record.
        bytes: &'a [u8],
    },
    /// `user_convs[(user, conv)] = ()`.
    UserConv {
        /// User.
        user: &'a str,
        /// Conversation.
        conv: &'a str,
    },
    /// `message_ids[(conv, sender, id)] = seq`.
    MessageId {
        /// Conversation.
        conv: &'a str,
        /// Sender.
        sender: &'a str,
        /// Client-chosen id.
        id: &'a str,
        /// Its seq.
        seq: u64,
    },
    /// `message_ids[(conv, sender, id)]` removed (expiry).
    RemoveMessageId {
        /// Conversation.
        conv: &'a str,
        /// Sender.
        sender: &'a str,
        /// Client-chosen id.
        id: &'a str,
    },
    /// `device_cursors[(user, device, conv)] = (delivered, read)`.
    DeviceCursor {
        /// User.
        user: &'a str,
        /// Device.
        device: &'a str,
        /// Conversation.
        conv: &'a str,
        /// Delivered and read.
        cursor: (u64, u64),
    },
    /// `user_cursors[(conv, user)] = (delivered, read)`.
    UserCursor {
        /// Conversation.
        conv: &'a str,
        /// User.
        user: &'a str,
        /// Delivered and read.
        cursor: (u64, u64),
    },
    /// `last_seen[user] = at_ms`.
    LastSeen {
        /// User.
        user: &'a str,
        /// Last seen, ms since the Unix epoch.
        at_ms: u64,
    },
}

/// A record's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Entry = 1,
    RemoveEntry,
    Seq,
    Conv,
    UserConv,
    MessageId,
    RemoveMessageId,
    DeviceCursor,
    UserCursor,
    LastSeen,
}

impl Tag {
    const ALL: [Tag; 10] = [
        Tag::Entry,
        Tag::RemoveEntry,
        Tag::Seq,
        Tag::Conv,
        Tag::UserConv,
        Tag::MessageId,
        Tag::RemoveMessageId,
        Tag::DeviceCursor,
        Tag::UserCursor,
        Tag::LastSeen,
    ];
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("a record field under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Reads fields off one record; every read checks the length left.
struct Fields<'a> {
    rest: &'a [u8],
}

fn corrupt(what: &str) -> StoreError {
    backend(format!("corrupt redo record: {what}"))
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(corrupt("cut short"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let raw = self.take(8)?;
        Ok(u64::from_le_bytes(raw.try_into().expect("8 bytes")))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let raw = self.take(4)?;
        let len = u32::from_le_bytes(raw.try_into().expect("4 bytes")) as usize;
        self.take(len)
    }

    fn str(&mut self) -> Result<&'a str, StoreError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| corrupt("a key is not UTF-8"))
    }
}

impl<'a> Redo<'a> {
    fn tag(&self) -> Tag {
        match self {
            Redo::Entry { .. } => Tag::Entry,
            Redo::RemoveEntry { .. } => Tag::RemoveEntry,
            Redo::Seq { .. } => Tag::Seq,
            Redo::Conv { .. } => Tag::Conv,
            Redo::UserConv { .. } => Tag::UserConv,
            Redo::MessageId { .. } => Tag::MessageId,
            Redo::RemoveMessageId { .. } => Tag::RemoveMessageId,
            Redo::DeviceCursor { .. } => Tag::DeviceCursor,
            Redo::UserCursor { .. } => Tag::UserCursor,
            Redo::LastSeen { .. } => Tag::LastSeen,
        }
    }

    /// Appends the record to `out`; [`decode_all`] reads it back unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.tag() as u8);
        match *self {
            Redo::Entry { conv, seq, bytes } => {
                put_bytes(out, conv.as_bytes());
                put_u64(out, seq);
                put_bytes(out, bytes);
            }
            Redo::RemoveEntry { conv, seq } => {
                put_bytes(out, conv.as_bytes());
                put_u64(out, seq);
            }
            Redo::Seq { conv, seq, time_ms } => {
                put_bytes(out, conv.as_bytes());
                put_u64(out, seq);
                put_u64(out, time_ms);
            }
            Redo::Conv { conv, bytes } => {
                put_bytes(out, conv.as_bytes());
                put_bytes(out, bytes);
            }
            Redo::UserConv { user, conv } => {
                put_bytes(out, user.as_bytes());
                put_bytes(out, conv.as_bytes());
            }
            Redo::MessageId {
                conv,
                sender,
                id,
                seq,
            } => {
                put_bytes(out, conv.as_bytes());
                put_bytes(out, sender.as_bytes());
                put_bytes(out, id.as_bytes());
                put_u64(out, seq);
            }
            Redo::RemoveMessageId { conv, sender, id } => {
                put_bytes(out, conv.as_bytes());
                put_bytes(out, sender.as_bytes());
                put_bytes(out, id.as_bytes());
            }
            Redo::DeviceCursor {
                user,
                device,
                conv,
                cursor,
            } => {
                put_bytes(out, user.as_bytes());
                put_bytes(out, device.as_bytes());
                put_bytes(out, conv.as_bytes());
                put_u64(out, cursor.0);
                put_u64(out, cursor.1);
            }
            Redo::UserCursor { conv, user, cursor } => {
                put_bytes(out, conv.as_bytes());
                put_bytes(out, user.as_bytes());
                put_u64(out, cursor.0);
                put_u64(out, cursor.1);
            }
            Redo::LastSeen { user, at_ms } => {
                put_bytes(out, user.as_bytes());
                put_u64(out, at_ms);
            }
        }
    }

    fn decode(f: &mut Fields<'a>) -> Result<Self, StoreError> {
        let raw = f.take(1)?[0];
        let tag = Tag::ALL
            .into_iter()
            .find(|t| *t as u8 == raw)
            .ok_or_else(|| corrupt(&format!("unknown tag {raw}")))?;
        Ok(match tag {
            Tag::Entry => Redo::Entry {
                conv: f.str()?,
                seq: f.u64()?,
                bytes: f.bytes()?,
            },
            Tag::RemoveEntry => Redo::RemoveEntry {
                conv: f.str()?,
                seq: f.u64()?,
            },
            Tag::Seq => Redo::Seq {
                conv: f.str()?,
                seq: f.u64()?,
                time_ms: f.u64()?,
            },
            Tag::Conv => Redo::Conv {
                conv: f.str()?,
                bytes: f.bytes()?,
            },
            Tag::UserConv => Redo::UserConv {
                user: f.str()?,
                conv: f.str()?,
            },
            Tag::MessageId => Redo::MessageId {
                conv: f.str()?,
                sender: f.str()?,
                id: f.str()?,
                seq: f.u64()?,
            },
            Tag::RemoveMessageId => Redo::RemoveMessageId {
                conv: f.str()?,
                sender: f.str()?,
                id: f.str()?,
            },
            Tag::DeviceCursor => Redo::DeviceCursor {
                user: f.str()?,
                device: f.str()?,
                conv: f.str()?,
                cursor: (f.u64()?, f.u64()?),
            },
            Tag::UserCursor => Redo::UserCursor {
                conv: f.str()?,
                user: f.str()?,
                cursor: (f.u64()?, f.u64()?),
            },
            Tag::LastSeen => Redo::LastSeen {
                user: f.str()?,
                at_ms: f.u64()?,
            },
        })
    }

    /// Makes the change in `tables`; true when it replaced (or removed) a value.
    pub fn apply(&self, t: &mut Tables<'_>) -> Result<bool, StoreError> {
        let replaced = match *self {
            Redo::Entry { conv, seq, bytes } => t
                .entries
                .insert((conv, seq), bytes)
                .map_err(backend)?
                .is_some(),
            Redo::RemoveEntry { conv, seq } => {
                t.entries.remove((conv, seq)).map_err(backend)?.is_some()
            }
            Redo::Seq { conv, seq, time_ms } => t
                .seqs
                .insert(conv, (seq, time_ms))
                .map_err(backend)?
                .is_some(),
            Redo::Conv { conv, bytes } => t.convs.insert(conv, bytes).map_err(backend)?.is_some(),
            Redo::UserConv { user, conv } => t
                .user_convs
                .insert((user, conv), ())
                .map_err(backend)?
                .is_some(),
            Redo::MessageId {
                conv,
                sender,
                id,
                seq,
            } => t
                .message_ids
                .insert((conv, sender, id), seq)
                .map_err(backend)?
                .is_some(),
            Redo::RemoveMessageId { conv, sender, id } => t
                .message_ids
                .remove((conv, sender, id))
                .map_err(backend)?
                .is_some(),
            Redo::DeviceCursor {
                user,
                device,
                conv,
                cursor,
            } => t
                .device_cursors
                .insert((user, device, conv), cursor)
                .map_err(backend)?
                .is_some(),
            Redo::UserCursor { conv, user, cursor } => t
                .user_cursors
                .insert((conv, user), cursor)
                .map_err(backend)?
                .is_some(),
            Redo::LastSeen { user, at_ms } => {
                t.last_seen.insert(user, at_ms).map_err(backend)?.is_some()
            }
        };
        Ok(replaced)
    }
}

/// Every record of one group's value, in the order they were made.
pub fn decode_all(group: &[u8]) -> impl Iterator<Item = Result<Redo<'_>, StoreError>> {
    let mut fields = Fields { rest: group };
    std::iter::from_fn(move || {
        if fields.rest.is_empty() {
            return None;
        }
        let record = Redo::decode(&mut fields);
        if record.is_err() {
            fields.rest = &[]; // Nothing after a corrupt record can be framed.
        }
        Some(record)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Redo<'static>> {
        vec![
            Redo::Entry {
                conv: "d:a:b",
                seq: 7,
                bytes: b"{\"x\":1}",
            },
            Redo::RemoveEntry {
                conv: "g:1",
                seq: 1,
            },
            Redo::Seq {
                conv: "d:a:b",
                seq: 7,
                time_ms: 1_700_000_000_000,
            },
            Redo::Conv {
                conv: "g:1",
                bytes: b"",
            },
            Redo::UserConv {
                user: "alice",
                conv: "g:1",
            },
            Redo::MessageId {
                conv: "g:1",
                sender: "alice",
                id: "m-\u{e9}",
                seq: u64::MAX,
            },
            Redo::RemoveMessageId {
                conv: "g:1",
                sender: "alice",
                id: "m",
            },
            Redo::DeviceCursor {
                user: "bob",
                device: "phone",
                conv: "g:1",
                cursor: (5, 3),
            },
            Redo::UserCursor {
                conv: "g:1",
                user: "bob",
                cursor: (5, 4),
            },
            Redo::LastSeen {
                user: "bob",
                at_ms: 42,
            },
        ]
    }

    /// Every kind of record reads back as written, in order.
    #[test]
    fn records_round_trip() {
        let records = every_kind();
        assert_eq!(records.len(), Tag::ALL.len(), "one of each kind");
        let mut group = Vec::new();
        for r in &records {
            r.encode(&mut group);
        }
        let back: Vec<Redo<'_>> = decode_all(&group).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, records);
    }

    /// A record cut short or with an unknown tag is an error, never a wrong value.
    #[test]
    fn damaged_records_are_refused() {
        let mut group = Vec::new();
        every_kind()[0].encode(&mut group);
        for cut in 1..group.len() {
            let results: Vec<_> = decode_all(&group[..cut]).collect();
            assert_eq!(results.len(), 1, "cut at {cut}");
            assert!(results[0].is_err(), "cut at {cut}");
        }
        let results: Vec<_> = decode_all(&[0xEE, 0, 0]).collect();
        assert!(
            matches!(&results[..], [Err(StoreError::Backend(why))] if why.contains("unknown tag"))
        );
    }
}
