//! A disk that fails under the embedded store: sends are refused with
//! `internal` and nothing is acknowledged, `/healthz` and `/readyz` answer 503
//! naming the store, and once the disk takes writes again the store reopens by
//! itself with every acknowledged message in place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chatproof_server::limits::Limits;
use chatproof_server::store::embedded::{EmbeddedStore, Opener};
use chatproof_server::store::StoreError;
use serde_json::json;

use crate::harness::*;

/// An in-memory disk whose writes and fsyncs fail while `failing` is set.
#[derive(Debug, Default)]
struct FlakyDisk {
    bytes: Mutex<Vec<u8>>,
    failing: AtomicBool,
}

#[derive(Debug)]
struct Handle(Arc<FlakyDisk>);

impl Handle {
    fn check(&self) -> std::io::Result<()> {
        match self.0.failing.load(Ordering::SeqCst) {
            true => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device (test)",
            )),
            false => Ok(()),
        }
    }
}

impl redb::StorageBackend for Handle {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.bytes.lock().unwrap().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let bytes = self.0.bytes.lock().unwrap();
        let at = offset as usize;
        out.copy_from_slice(&bytes[at..at + out.len()]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.0.bytes.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.check()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        let at = offset as usize;
        self.0.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

async fn status(server: &TestServer, path: &str) -> HttpReply {
    http(server, "GET", path, None, Vec::new()).await
}

/// The store fails while the disk is full and recovers by itself afterwards.
#[tokio::test]
async fn full_disk_refuses_sends_reports_unhealthy_and_recovers() {
    let disk = Arc::new(FlakyDisk::default());
    let journal = Arc::new(FlakyDisk::default());
    let (for_store, for_journal) = (Arc::clone(&disk), Arc::clone(&journal));
    let dir = tempfile::tempdir().unwrap();
    let opener = Opener {
        main: Box::new(move || {
            redb::Builder::new()
                .create_with_backend(Handle(Arc::clone(&for_store)))
                .map_err(|e| StoreError::Backend(e.to_string()))
        }),
        journal: Box::new(move || Ok(Box::new(Handle(Arc::clone(&for_journal))))),
    };
    let store = Arc::new(EmbeddedStore::with_opener(opener).unwrap());
    let server = TestServer::start_on_store(dir, Limits::default(), store).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    send(&mut alice, &conv, "before", "kept").await;
    assert_eq!(status(&server, "/healthz").await.status, 200);

    disk.failing.store(true, Ordering::SeqCst);
    journal.failing.store(true, Ordering::SeqCst);
    for attempt in 0..3 {
        let refused = alice
            .request(json!({"op": "send", "conv": &conv, "message_id": "during", "text": "x"}))
            .await
            .unwrap();
        assert_eq!(err_code(refused), "internal", "attempt {attempt}");
    }
    for path in ["/healthz", "/readyz"] {
        let health = status(&server, path).await;
        assert_eq!(health.status, 503, "{path}");
        let body = health.json();
        assert!(
            body["message"].as_str().unwrap().contains("store"),
            "{path}: {body}"
        );
    }

    disk.failing.store(false, Ordering::SeqCst);
    journal.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        status(&server, "/healthz").await.status,
        200,
        "reopened by the probe"
    );
    let during = send(&mut alice, &conv, "during", "x").await;
    let after = send(&mut alice, &conv, "after", "y").await;
    assert_eq!(
        (during["seq"].as_u64(), after["seq"].as_u64()),
        (Some(3), Some(4)),
        "no seq was used by the refused attempts"
    );
    let page = ok(alice
        .request(json!({"op": "sync", "conv": &conv, "after": 0}))
        .await
        .unwrap());
    let ids: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message_id"].as_str())
        .collect();
    assert!(ids.ends_with(&["before", "during", "after"]), "{ids:?}");
}
