//! Fan-out: an appended entry to its recipients' devices, here and on other servers, and push notifications for users with none connected.

use super::*;

impl ChatService {
    /// Fans an entry out to its recipients' connected devices (serialized once),
    /// here and, in a cluster, on other servers.
    ///
    /// Retries are published again: the first attempt may have been sequenced by a
    /// server that died before publishing. Device streams drop what they already have.
    /// In a cluster the entry is handed to the router, or queued in the outbox when
    /// the router does not take it (it is durable: the retry loop routes it once
    /// the router is back, and this server's peers re-read their sessions should
    /// it die first). An error only when the outbox is full: the entry is durable,
    /// and a retry with the same id routes it again.
    pub async fn publish(&self, appended: &Appended) -> Result<(), ProtocolError> {
        let routed = match &self.outbox {
            Some(outbox) => {
                let event = Routed::Entry(Arc::clone(&appended.entry));
                outbox
                    .forward(Arc::clone(&appended.recipients), event)
                    .await
                    .map(Some)
            }
            None => Ok(None),
        };
        if let Err(e) = &routed {
            crate::warn_throttled!(error = %e, seq = appended.entry.seq, conv = appended.entry.conv, "not routed to other servers");
        }
        self.publish_here(appended);
        if !appended.duplicate {
            match &routed {
                Ok(None) => self.notify_offline(appended, None),
                Ok(Some(Routing::Now(forwarded))) => self.notify_offline(appended, Some(forwarded)),
                // Notified once the router takes it (see `route_unrouted`).
                Ok(Some(Routing::Later)) => {}
                Err(_) => tracing::debug!("recipients' whereabouts unknown; no push notifications"),
            }
        }
        routed.map(|_| ()).map_err(|_| {
            ProtocolError::new(
                ErrorCode::Internal,
                "stored, but not yet routed to other servers; retry with the same message_id",
            )
        })
    }

    /// Offers the events waiting in the outbox to the router again (cluster mode;
    /// nothing otherwise), and sends the push notifications the entries among them
    /// were waiting for. Returns how many outbox slots it emptied.
    pub async fn route_unrouted(&self) -> usize {
        let Some(outbox) = &self.outbox else {
            return 0;
        };
        outbox
            .retry(|entry, recipients, forwarded| {
                if entry.body.is_message() {
                    self.notify_unplaced(entry, recipients, &forwarded.unplaced);
                }
            })
            .await
    }

    /// At shutdown, after the sessions closed: leaves the cluster if nothing is
    /// left unrouted (else the lease lapses and peers resync, as after a crash).
    pub async fn leave_cluster(&self) {
        let (Some(fabric), Some(outbox)) = (&self.fabric, &self.outbox) else {
            return;
        };
        if outbox.is_empty() {
            fabric.leave().await;
        } else {
            tracing::warn!(
                waiting = outbox.len(),
                "events still unrouted at shutdown (durable); peers resync once this server's lease lapses"
            );
        }
    }

    /// Hands a push notification for each recipient of a new message (sender
    /// excepted) with no device connected anywhere to the push sink.
    pub(super) fn notify_offline(&self, appended: &Appended, forwarded: Option<&Forwarded>) {
        let entry = &appended.entry;
        if !entry.body.is_message() {
            return;
        }
        match forwarded {
            Some(f) => self.notify_unplaced(entry, &appended.recipients, &f.unplaced),
            None => {
                let offline: Vec<String> = appended
                    .recipients
                    .iter()
                    .filter(|u| self.hub.devices_online(u) == 0)
                    .cloned()
                    .collect();
                self.notify_unplaced(entry, &appended.recipients, &offline);
            }
        }
    }

    /// Notifies each of `recipients` (sender excepted) listed in `unplaced` of `entry`.
    fn notify_unplaced(&self, entry: &Entry, recipients: &[String], unplaced: &[String]) {
        for user in recipients.iter().filter(|u| **u != entry.sender) {
            if unplaced.contains(user) {
                if let Some(notification) = Notification::of(entry, user) {
                    self.push.notify(notification);
                }
            }
        }
    }

    /// Fans an entry out to the devices connected to this server.
    pub(super) fn publish_here(&self, appended: &Appended) {
        let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&appended.entry)).to_json());
        let push = Push::Entry(Framed::new(Arc::clone(&appended.entry), frame));
        // Under the simulator, model what a multi-threaded runtime does for free: two
        // sends that commit in one order may fan out in the other.
        #[cfg(madsim)]
        if madsim::rand::random::<u8>() < 128 {
            let (hub, recipients) = (Arc::clone(&self.hub), Arc::clone(&appended.recipients));
            let delay = std::time::Duration::from_millis(u64::from(madsim::rand::random::<u8>()));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                hub.publish(&recipients, &push);
            });
            return;
        }
        self.hub.publish(&appended.recipients, &push);
    }
}
