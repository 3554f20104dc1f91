//! Fan-out: an appended entry to its recipients' devices, here and on other servers, and push notifications for users with none connected.

use super::*;

impl ChatService {
    /// Fans an entry out to its recipients' connected devices (serialized once),
    /// here and, in a cluster, on other servers.
    ///
    /// Retries are published again: the first attempt may have been sequenced by a
    /// server that died before publishing. Device streams drop what they already have.
    /// In a cluster this returns once the router accepted the event, so an
    /// acknowledged message has been routed even if this server dies next; an
    /// error means it was not (the entry is durable; a retry publishes it again).
    pub async fn publish(&self, appended: &Appended) -> Result<(), ProtocolError> {
        let routed = match &self.fabric {
            Some(fabric) => {
                let event = Routed::Entry(Arc::clone(&appended.entry));
                fabric
                    .forward(Arc::clone(&appended.recipients), event)
                    .await
                    .map(Some)
            }
            None => Ok(None),
        };
        if let Err(e) = &routed {
            self.metrics.fabric.dropped.inc();
            crate::warn_throttled!(error = %e, seq = appended.entry.seq, conv = appended.entry.conv, "not routed to other servers");
        }
        self.publish_here(appended);
        if !appended.duplicate {
            match &routed {
                Ok(forwarded) => self.notify_offline(appended, forwarded.as_ref()),
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

    /// Hands a push notification for each recipient of a new message (sender
    /// excepted) with no device connected anywhere to the push sink.
    pub(super) fn notify_offline(&self, appended: &Appended, forwarded: Option<&Forwarded>) {
        let entry = &appended.entry;
        if !entry.body.is_message() {
            return;
        }
        let offline = |user: &&String| match forwarded {
            Some(f) => f.unplaced.contains(user),
            None => self.hub.devices_online(user) == 0,
        };
        for user in appended.recipients.iter().filter(|u| **u != entry.sender) {
            if offline(&user) {
                if let Some(notification) = Notification::of(entry, user) {
                    self.push.notify(notification);
                }
            }
        }
    }

    /// Fans an entry out to the devices connected to this server.
    pub(super) fn publish_here(&self, appended: &Appended) {
        let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&appended.entry)).to_json());
        let push = Push::Entry(Arc::clone(&appended.entry), frame);
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
