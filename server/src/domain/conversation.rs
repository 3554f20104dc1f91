//! Conversations and membership: who may do what, and what a change does.
//!
//! Every backend applies these rules, so the embedded store, Scylla and the
//! simulator's store agree on every accept and every refusal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::{
    validate_user_id, Body, ConvKind, ConvSummary, Entry, ErrorCode, MemberAction, ProtocolError,
};

/// The id of the one 1:1 conversation between `a` and `b`, whichever side opens it.
pub fn direct_conv_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("d:{lo}:{hi}")
}

/// The server time of the next entry of a conversation whose newest entry has
/// `last_time_ms`: the clock's `now_ms`, but never earlier, so clock skew between
/// servers never makes a conversation's times go backwards.
pub fn next_server_time(now_ms: u64, last_time_ms: u64) -> u64 {
    now_ms.max(last_time_ms)
}

/// The entry at `seq` recording that `by` (from `device`) made `action` on `users`.
/// Membership entries carry no client message id; theirs is `member-{seq}`, and
/// the idempotency index never holds it (only messages are indexed).
fn member_entry(
    conv: &str,
    seq: u64,
    by: &str,
    device: &str,
    server_time_ms: u64,
    action: MemberAction,
    users: Vec<String>,
) -> Entry {
    Entry {
        conv: conv.to_owned(),
        seq,
        message_id: format!("member-{seq}"),
        sender: by.to_owned(),
        sender_device: device.to_owned(),
        server_time_ms,
        body: Body::Members { action, users },
    }
}

/// One user's membership in a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Seq of the entry that (last) made the user a member.
    pub joined_seq: u64,
    /// Seq of the entry that removed the user, if they are no longer a member.
    pub left_seq: Option<u64>,
}

impl Membership {
    /// True while the user is a member.
    pub fn is_current(&self) -> bool {
        self.left_seq.is_none()
    }

    /// Highest seq the user may see (`u64::MAX` while a member).
    pub fn visible_until(&self) -> u64 {
        self.left_seq.unwrap_or(u64::MAX)
    }
}

/// A conversation's durable description (its order lives in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvRecord {
    /// The id.
    pub id: String,
    /// Direct or group.
    pub kind: ConvKind,
    /// Owner: may remove members.
    pub owner: String,
    /// Current and former members.
    pub members: BTreeMap<String, Membership>,
}

/// A requested change to a group's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// Any member adds users.
    Add(Vec<String>),
    /// The owner removes users.
    Remove(Vec<String>),
    /// The caller leaves.
    Leave,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(code, message)
}

fn check_distinct_users(users: &[String]) -> Result<(), ProtocolError> {
    let mut seen = std::collections::BTreeSet::new();
    for user in users {
        validate_user_id(user)?;
        if !seen.insert(user.as_str()) {
            return Err(err(
                ErrorCode::DuplicateMember,
                format!("user {user:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

impl ConvRecord {
    /// A new direct conversation opened by `opener`; both join at seq 1.
    pub fn new_direct(opener: &str, peer: &str) -> Result<Self, ProtocolError> {
        validate_user_id(peer)?;
        if opener == peer {
            return Err(err(
                ErrorCode::BadRequest,
                "a direct conversation needs two different users",
            ));
        }
        let joined = Membership {
            joined_seq: 1,
            left_seq: None,
        };
        Ok(Self {
            id: direct_conv_id(opener, peer),
            kind: ConvKind::Direct,
            owner: opener.to_owned(),
            members: [(opener.to_owned(), joined), (peer.to_owned(), joined)].into(),
        })
    }

    /// A new group owned by `owner` with `others`; all join at seq 1.
    pub fn new_group(
        id: String,
        owner: &str,
        others: &[String],
        members_max: usize,
    ) -> Result<Self, ProtocolError> {
        check_distinct_users(others)?;
        if others.iter().any(|u| u == owner) {
            return Err(err(
                ErrorCode::DuplicateMember,
                "the creator is a member already; do not list them",
            ));
        }
        if others.len() + 1 > members_max {
            return Err(err(
                ErrorCode::TooManyMembers,
                format!("a group holds at most {members_max} members, the creator included"),
            ));
        }
        let joined = Membership {
            joined_seq: 1,
            left_seq: None,
        };
        let mut members: BTreeMap<String, Membership> =
            others.iter().map(|u| (u.clone(), joined)).collect();
        members.insert(owner.to_owned(), joined);
        Ok(Self {
            id,
            kind: ConvKind::Group,
            owner: owner.to_owned(),
            members,
        })
    }

    /// Current members, sorted.
    pub fn current_members(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.is_current())
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// `user`'s membership, current or former.
    pub fn membership(&self, user: &str) -> Option<Membership> {
        self.members.get(user).copied()
    }

    /// Ok when `user` is a current member, else `not_member`.
    pub fn require_member(&self, user: &str) -> Result<(), ProtocolError> {
        match self.members.get(user) {
            Some(m) if m.is_current() => Ok(()),
            _ => Err(err(
                ErrorCode::NotMember,
                format!("user {user:?} is not a member of {}", self.id),
            )),
        }
    }

    /// Ok when `user` is or was a member (may read up to where they left).
    pub fn require_reader(&self, user: &str) -> Result<Membership, ProtocolError> {
        self.membership(user).ok_or_else(|| {
            err(
                ErrorCode::NotMember,
                format!("user {user:?} is not a member of {}", self.id),
            )
        })
    }

    /// Validates `change` by `by` and applies it as the entry at `seq`.
    ///
    /// Returns the entry's action and users, and the users who must receive
    /// the entry (members after the change plus anyone it removed).
    pub fn apply_change(
        &mut self,
        by: &str,
        change: &GroupChange,
        seq: u64,
        members_max: usize,
    ) -> Result<(MemberAction, Vec<String>, Vec<String>), ProtocolError> {
        if self.kind != ConvKind::Group {
            return Err(err(
                ErrorCode::NotGroup,
                "membership of a direct conversation cannot change",
            ));
        }
        self.require_member(by)?;
        let (action, users) = match change {
            GroupChange::Add(users) => {
                check_distinct_users(users)?;
                if users.is_empty() {
                    return Err(err(ErrorCode::BadRequest, "no users to add"));
                }
                if let Some(u) = users
                    .iter()
                    .find(|u| self.members.get(*u).is_some_and(Membership::is_current))
                {
                    return Err(err(
                        ErrorCode::DuplicateMember,
                        format!("user {u:?} is already a member"),
                    ));
                }
                let after = self.current_members().len() + users.len();
                if after > members_max {
                    return Err(err(
                        ErrorCode::TooManyMembers,
                        format!(
                            "a group holds at most {members_max} members; this would make {after}"
                        ),
                    ));
                }
                (MemberAction::Add, users.clone())
            }
            GroupChange::Remove(users) => {
                check_distinct_users(users)?;
                if users.is_empty() {
                    return Err(err(ErrorCode::BadRequest, "no users to remove"));
                }
                if by != self.owner {
                    return Err(err(
                        ErrorCode::Forbidden,
                        "only the group owner may remove members",
                    ));
                }
                if let Some(u) = users.iter().find(|u| self.require_member(u).is_err()) {
                    return Err(err(
                        ErrorCode::NotMember,
                        format!("user {u:?} is not a member"),
                    ));
                }
                if users.iter().any(|u| u == by) {
                    return Err(err(ErrorCode::BadRequest, "use leave to remove yourself"));
                }
                (MemberAction::Remove, users.clone())
            }
            GroupChange::Leave => (MemberAction::Leave, vec![by.to_owned()]),
        };
        let before = self.current_members();
        for user in &users {
            let joined = Membership {
                joined_seq: seq,
                left_seq: None,
            };
            match action {
                MemberAction::Add => {
                    self.members.insert(user.clone(), joined);
                }
                _ => {
                    let m = self.members.get_mut(user).expect("validated member");
                    m.left_seq = Some(seq);
                }
            }
        }
        if action == MemberAction::Leave && by == self.owner {
            if let Some(next_owner) = self.current_members().first() {
                self.owner = next_owner.clone();
            }
        }
        let mut recipients = self.current_members();
        recipients.extend(before.into_iter().filter(|u| !self.members[u].is_current()));
        recipients.sort();
        Ok((action, users, recipients))
    }

    /// The entry that opens this new conversation: seq 1, `create` by the owner
    /// from `device` at `server_time_ms`, naming the current members (who are its
    /// recipients).
    pub fn create_entry(&self, device: &str, server_time_ms: u64) -> Entry {
        let users = self.current_members();
        let (owner, create) = (&self.owner, MemberAction::Create);
        member_entry(&self.id, 1, owner, device, server_time_ms, create, users)
    }

    /// Validates `change` by `by` and applies it as the entry at `seq` (see
    /// [`Self::apply_change`]); returns that entry, sent from `device` at
    /// `server_time_ms`, and the users who must receive it.
    pub fn change_entry(
        &mut self,
        by: &str,
        device: &str,
        change: &GroupChange,
        seq: u64,
        members_max: usize,
        server_time_ms: u64,
    ) -> Result<(Entry, Vec<String>), ProtocolError> {
        let (action, users, recipients) = self.apply_change(by, change, seq, members_max)?;
        let entry = member_entry(&self.id, seq, by, device, server_time_ms, action, users);
        Ok((entry, recipients))
    }

    /// The conversation as `user` sees it; `None` if they never were a member.
    pub fn summary_for(&self, user: &str, last_seq: u64) -> Option<ConvSummary> {
        let m = self.membership(user)?;
        Some(ConvSummary {
            conv: self.id.clone(),
            kind: self.kind,
            owner: self.owner.clone(),
            members: self.current_members(),
            last_seq,
            joined_seq: m.joined_seq,
            left_seq: m.left_seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Group limits, duplicates, ownership and non-members are enforced.
    #[test]
    fn group_rules() {
        let mut g = ConvRecord::new_group("g:a".into(), "o", &users(&["a", "b"]), 4).unwrap();
        assert_eq!(
            ConvRecord::new_group("g:x".into(), "o", &users(&["a", "a"]), 4)
                .unwrap_err()
                .code,
            ErrorCode::DuplicateMember
        );
        assert_eq!(
            ConvRecord::new_group("g:x".into(), "o", &users(&["a", "b", "c", "d"]), 4)
                .unwrap_err()
                .code,
            ErrorCode::TooManyMembers
        );
        let add = GroupChange::Add(users(&["c", "d"]));
        assert_eq!(
            g.apply_change("a", &add, 2, 4).unwrap_err().code,
            ErrorCode::TooManyMembers
        );
        let add = GroupChange::Add(users(&["c"]));
        assert_eq!(
            g.apply_change("zed", &add, 2, 4).unwrap_err().code,
            ErrorCode::NotMember
        );
        let (_, _, to) = g.apply_change("a", &add, 2, 4).unwrap();
        assert_eq!(to, users(&["a", "b", "c", "o"]));
        assert_eq!(g.membership("c").unwrap().joined_seq, 2);
        let remove = GroupChange::Remove(users(&["b"]));
        assert_eq!(
            g.apply_change("a", &remove, 3, 4).unwrap_err().code,
            ErrorCode::Forbidden
        );
        let (_, _, to) = g.apply_change("o", &remove, 3, 4).unwrap();
        assert!(
            to.contains(&"b".to_owned()),
            "the removed user receives the removal"
        );
        assert_eq!(g.membership("b").unwrap().left_seq, Some(3));
        assert_eq!(
            g.require_member("b").unwrap_err().code,
            ErrorCode::NotMember
        );
        g.apply_change("o", &GroupChange::Leave, 4, 4).unwrap();
        assert_eq!(g.owner, "a", "ownership passes on when the owner leaves");
    }

    /// A new conversation's entry is seq 1, `create` by the owner, naming every member.
    #[test]
    fn create_entry_names_every_member() {
        let g = ConvRecord::new_group("g:a".into(), "o", &users(&["b", "a"]), 4).unwrap();
        let entry = g.create_entry("o-phone", 70);
        assert_eq!((entry.seq, entry.server_time_ms), (1, 70));
        assert_eq!(
            (entry.sender.as_str(), entry.sender_device.as_str()),
            ("o", "o-phone")
        );
        assert_eq!(entry.message_id, "member-1");
        let Body::Members {
            action,
            users: named,
        } = entry.body
        else {
            panic!("a create entry records membership");
        };
        assert_eq!(action, MemberAction::Create);
        assert_eq!(named, users(&["a", "b", "o"]));
    }

    /// A change's entry names the users it concerns and goes to the removed too.
    #[test]
    fn change_entry_records_the_change() {
        let mut g = ConvRecord::new_group("g:a".into(), "o", &users(&["a", "b"]), 4).unwrap();
        let remove = GroupChange::Remove(users(&["b"]));
        let (entry, to) = g.change_entry("o", "o-1", &remove, 5, 4, 90).unwrap();
        assert_eq!(to, users(&["a", "b", "o"]));
        assert_eq!((entry.conv.as_str(), entry.seq), ("g:a", 5));
        assert_eq!(entry.message_id, "member-5");
        assert_eq!((entry.sender.as_str(), entry.server_time_ms), ("o", 90));
        assert_eq!(
            entry.body,
            Body::Members {
                action: MemberAction::Remove,
                users: users(&["b"])
            }
        );
        assert_eq!(g.membership("b").unwrap().left_seq, Some(5));
        let refused = g.change_entry("a", "a-1", &remove, 6, 4, 91).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden);
    }

    /// Server times follow the clock but never go back.
    #[test]
    fn server_times_never_go_back() {
        assert_eq!(next_server_time(10, 7), 10);
        assert_eq!(next_server_time(5, 7), 7, "a slow clock does not go back");
    }

    /// Direct ids do not depend on who opens the conversation.
    #[test]
    fn direct_ids_are_symmetric() {
        assert_eq!(
            direct_conv_id("bob", "alice"),
            direct_conv_id("alice", "bob")
        );
        assert!(ConvRecord::new_direct("a", "a").is_err());
    }
}
