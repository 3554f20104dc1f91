//! Presence: last-seen bookkeeping, `presence` requests, and publishing coalesced changes to each user's audience.

use super::*;

impl ChatService {
    /// Notes that `user` is seen now; written to the store with the next presence publication.
    pub fn record_last_seen(&self, user: &str) {
        self.presence.seen(user, self.clock.now_ms());
    }

    /// Writes the last-seen times noted since the last call; what fails is kept for the next.
    pub async fn write_last_seen(&self) {
        use futures_util::StreamExt as _;
        let seen = self.presence.take_seen();
        // Bounded: at shutdown every user of the server is due at once, and an unbounded
        // burst (16 K writes per server in the 200 K-device load run) times out in the store.
        // (Collected first: a lazy map closure over `&self` in the stream makes the
        // spawned presence task's future not `Send`.)
        let writes: Vec<_> = seen
            .iter()
            .map(|(user, at_ms)| self.store.record_last_seen(user, *at_ms))
            .collect();
        let results: Vec<_> = futures_util::stream::iter(writes)
            .buffered(LAST_SEEN_WRITES_CONCURRENCY)
            .collect()
            .await;
        for ((user, at_ms), result) in seen.iter().zip(results) {
            if let Err(e) = result {
                tracing::warn!(user, error = %e, "last seen not written; retrying");
                self.presence.seen(user, *at_ms);
            }
        }
    }

    /// The presence of `users` now: online if a device is connected here or (in a
    /// cluster) on a live server; last seen from the store.
    pub async fn presence_of(&self, users: &[String]) -> Result<Vec<PresenceState>, ProtocolError> {
        let mut online: Vec<bool> = users
            .iter()
            .map(|u| self.hub.devices_online(u) > 0)
            .collect();
        if let Some(fabric) = &self.fabric {
            let elsewhere: Vec<String> = users
                .iter()
                .zip(&online)
                .filter(|(_, here)| !**here)
                .map(|(u, _)| u.clone())
                .collect();
            if !elsewhere.is_empty() {
                let found = fabric.online_users(&elsewhere).await.map_err(|e| {
                    tracing::warn!(error = %e, "presence lookup failed");
                    registry_unavailable()
                })?;
                let mut found = found.into_iter();
                for here in online.iter_mut().filter(|here| !**here) {
                    *here = found.next().unwrap_or(false);
                }
            }
        }
        let seen = self.store.last_seen(users).await.map_err(reject)?;
        Ok(users
            .iter()
            .zip(online)
            .zip(seen)
            .map(|((user, online), last_seen_ms)| PresenceState {
                user: user.clone(),
                online,
                last_seen_ms,
            })
            .collect())
    }

    /// `presence`: the current state of some users, and a subscription to their changes.
    pub async fn presence_request(
        &self,
        caller: &Caller,
        req: PresenceRequest,
    ) -> Result<Reply, ProtocolError> {
        if req.users.is_empty() || req.users.len() > self.limits.presence_users_max {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                format!(
                    "\"users\" must list 1-{} users",
                    self.limits.presence_users_max
                ),
            ));
        }
        let mut users = req.users;
        for user in &users {
            validate_user_id(user)?;
        }
        users.sort();
        users.dedup();
        if req.watch {
            match &self.fabric {
                Some(fabric) => fabric.watch(&caller.user, &users).await.map_err(|e| {
                    tracing::warn!(error = %e, "presence subscription failed");
                    registry_unavailable()
                })?,
                None => {
                    let ttl_ms =
                        u64::try_from(crate::cluster::WATCH_TTL.as_millis()).unwrap_or(u64::MAX);
                    let now = self.clock.now_ms();
                    if !self.presence.watch_locally(
                        &caller.user,
                        &users,
                        now,
                        now.saturating_add(ttl_ms),
                    ) {
                        return Err(ProtocolError::new(
                            ErrorCode::Overloaded,
                            "too many presence subscriptions on this server; ask again without \"watch\" or later",
                        ));
                    }
                }
            }
        }
        let states = self.presence_of(&users).await?;
        Ok(Reply::Presence { users: states })
    }

    /// Who hears of `user`'s presence changes: contacts and watchers, not `user`.
    /// Conversations are read through `members`, once per publication round.
    pub(super) async fn presence_audience(
        &self,
        user: &str,
        members: &RoundMembers,
    ) -> Result<Vec<String>, String> {
        let mut audience = std::collections::BTreeSet::new();
        let ids = self
            .store
            .conversation_ids_of(user)
            .await
            .map_err(|e| e.to_string())?;
        for id in ids {
            let current = match members.get(&id) {
                Some(current) => current,
                None => {
                    let state = self
                        .store
                        .conversation(&id)
                        .await
                        .map_err(|e| e.to_string())?;
                    let current = state.map(|s| Arc::from(s.record.current_members()));
                    members.insert(id, current.clone());
                    current
                }
            };
            if let Some(current) = current.filter(|c| c.iter().any(|m| m == user)) {
                audience.extend(current.iter().cloned());
            }
        }
        match &self.fabric {
            Some(fabric) => {
                audience.extend(fabric.watchers(user).await.map_err(|e| e.to_string())?)
            }
            None => audience.extend(self.presence.local_watchers(user, self.clock.now_ms())),
        }
        audience.remove(user);
        Ok(audience.into_iter().collect())
    }

    /// Publishes the users marked changed since the last call, each once, with
    /// its state read now. What cannot be published now is kept for the next call.
    pub async fn publish_presence(&self) {
        self.write_last_seen().await;
        let users = self.presence.take_changed();
        if users.is_empty() {
            return;
        }
        let mut states = match self.presence_of(&users).await {
            Ok(states) => states,
            Err(_) => {
                users.iter().for_each(|u| self.presence.mark_changed(u));
                return;
            }
        };
        // A user whose last device here left but who is online on another server
        // did not change for anyone: that server speaks for them, and publishes
        // their going offline once its own registration is out of the registry.
        // (Publishing "online" here could reach a watcher after that server's
        // "offline", when the registration read here was the one being deleted.)
        states.retain(|s| !s.online || self.hub.devices_online(&s.user) > 0);
        let members = RoundMembers::default();
        let members = &members;
        let audience_of = |state: PresenceState| async move {
            match self.presence_audience(&state.user, members).await {
                Ok(audience) => Some((Arc::new(state), audience)),
                Err(e) => {
                    tracing::warn!(user = state.user, error = %e, "presence audience unknown; retrying");
                    self.presence.mark_changed(&state.user);
                    None
                }
            }
        };
        // Each audience reads the store (and Redis in a cluster): overlap a bounded number.
        use futures_util::StreamExt as _;
        let found: Vec<Option<(Arc<PresenceState>, Vec<String>)>> =
            futures_util::stream::iter(states)
                .map(audience_of)
                .buffer_unordered(PRESENCE_PUBLISH_CONCURRENCY)
                .collect()
                .await;
        let published: Vec<(Arc<PresenceState>, Vec<String>)> = found
            .into_iter()
            .flatten()
            .filter(|(_, audience)| !audience.is_empty())
            .filter(|(state, _)| !self.hub.admit_presence(&[Arc::clone(state)]).is_empty())
            .collect();
        // Here: one push per recipient holding every change it hears of this round,
        // so a round costs each device one queue slot, however many contacts changed.
        let mut batches: std::collections::BTreeMap<&str, Vec<Arc<PresenceState>>> =
            std::collections::BTreeMap::new();
        for (state, audience) in &published {
            for user in audience {
                batches.entry(user).or_default().push(Arc::clone(state));
            }
        }
        for (user, batch) in batches {
            let push = Push::Presence(batch.into());
            self.hub.publish(&[user.to_owned()], &push);
        }
        self.metrics
            .presence_published
            .inc_by(published.len() as u64);
        // Elsewhere: through the fabric, one event per changed user.
        if let Some(outbox) = &self.outbox {
            let forwards = published.into_iter().map(|(state, audience)| async move {
                let routed = outbox
                    .forward(audience.into(), Routed::Presence(state))
                    .await;
                if let Err(e) = routed {
                    crate::warn_throttled!(error = %e, "presence change not routed to other servers");
                }
            });
            futures_util::stream::iter(forwards)
                .for_each_concurrent(PRESENCE_PUBLISH_CONCURRENCY, |forward| forward)
                .await;
        }
    }
}

/// The current members of each conversation a presence round has read: the
/// 2,000 members of four 500-member groups coming online read four records,
/// not 2,000. Lives for one round, so membership is as fresh as the round.
#[derive(Default)]
pub(super) struct RoundMembers {
    read: std::sync::Mutex<std::collections::HashMap<String, Option<Arc<[String]>>>>,
}

impl RoundMembers {
    /// The members of `conv` if this round read it (`Some(None)`: it does not exist).
    fn get(&self, conv: &str) -> Option<Option<Arc<[String]>>> {
        self.read
            .lock()
            .expect("round members lock")
            .get(conv)
            .cloned()
    }

    fn insert(&self, conv: String, members: Option<Arc<[String]>>) {
        self.read
            .lock()
            .expect("round members lock")
            .insert(conv, members);
    }
}
