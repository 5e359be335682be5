//! The mismatch report a peer sends after a blob it got from this node did not match its
//! digest: `POST /spegel/v1/mismatch/<digest>` ([`MISMATCH_REPORT_PATH`]). It only queues this
//! node's own verification of its copy ([`Integrity`]); the copy is withdrawn only if this
//! node's hash disagrees, never on the word of a client. The verification is paced and cached,
//! so reports cannot make a node hash without bound.

use std::sync::Arc;

use tracing::{info, warn};

use super::Registry;
use crate::{
    http::{Handler, Request, Response},
    oci::Digest,
    store::{Integrity, MISMATCH_REPORT_PATH, Trigger},
};

/// The registry with the mismatch report route in front of it.
pub struct CheckedRegistry {
    /// Serves everything but the report route.
    pub registry: Registry,
    /// Verifies the blobs peers report.
    pub integrity: Arc<Integrity>,
}

impl CheckedRegistry {
    fn report(&self, req: &Request, digest: &str) -> Response {
        if req.method != "POST" {
            return Response::empty(405).header("Allow", "POST");
        }
        if let Some(auth) = &self.registry.auth
            && !auth.verify(req.header("authorization"))
        {
            return Response::empty(401).header("WWW-Authenticate", r#"Basic realm="spegel""#);
        }
        let digest: Digest = match digest.parse() {
            Ok(d) => d,
            Err(_) => return Response::empty(400),
        };
        let remote = req.remote.map(|a| a.ip().to_string()).unwrap_or_default();
        if self.integrity.schedule(&digest, Trigger::Report) {
            info!(%digest, %remote, "a peer reports a blob from here did not match its digest; verifying it");
        } else {
            warn!(%digest, %remote, "mismatch report not queued (already queued, or queue full)");
        }
        // Accepted, whatever the queue did: the reporter learns nothing about the verdict.
        Response::empty(202)
    }
}

#[async_trait::async_trait]
impl Handler for CheckedRegistry {
    async fn handle(&self, req: &Request) -> Response {
        match req.path.strip_prefix(MISMATCH_REPORT_PATH) {
            Some(digest) => self.report(req, digest),
            None => self.registry.handle(req).await,
        }
    }

    fn label(&self, req: &Request) -> &'static str {
        self.registry.label(req)
    }

    fn log_served(&self, label: &'static str) -> bool {
        self.registry.log_served(label)
    }

    fn reserved(&self, req: &Request) -> bool {
        Handler::reserved(&self.registry, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{oci::Filters, store::MemoryStore};

    fn checked(store: Arc<MemoryStore>, integrity: Arc<Integrity>) -> CheckedRegistry {
        CheckedRegistry {
            registry: Registry {
                store,
                filters: Filters::new(&[], &[]).unwrap(),
                mirror: None,
                auth: None,
                ready: Arc::new(|| true),
                activity: Default::default(),
                searching: Default::default(),
            },
            integrity,
        }
    }

    fn request(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            headers: Vec::new(),
            keep_alive: false,
            has_body: false,
            remote: None,
        }
    }

    #[tokio::test]
    async fn a_report_only_queues_a_verification() {
        let store = Arc::new(MemoryStore::new());
        let bad = Digest::sha256_of(b"expected");
        store.add_blob_as(&bad, "application/octet-stream", b"corrupt!".to_vec());
        let good = store.add_blob("application/octet-stream", b"intact".to_vec());
        let integrity = Integrity::new(0);
        let reg = checked(store.clone(), integrity.clone());
        let path = |d: &Digest| format!("{MISMATCH_REPORT_PATH}{d}");
        assert_eq!(reg.handle(&request("GET", &path(&bad))).await.status, 405);
        assert_eq!(
            reg.handle(&request("POST", &format!("{MISMATCH_REPORT_PATH}nonsense")))
                .await
                .status,
            400
        );
        assert_eq!(reg.handle(&request("POST", &path(&good))).await.status, 202);
        assert_eq!(reg.handle(&request("POST", &path(&bad))).await.status, 202);
        // Nothing is decided by the report itself.
        assert!(!integrity.is_corrupt(&bad));
        let task = tokio::spawn(integrity.clone().run(store.clone()));
        for _ in 0..500 {
            if integrity.is_corrupt(&bad) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            integrity.is_corrupt(&bad),
            "the node's own hash found the corruption"
        );
        assert!(
            !integrity.is_corrupt(&good),
            "an intact blob stays whatever a peer says"
        );
        task.abort();
    }
}
