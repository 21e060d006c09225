//! Wake-ups across dispatcher replicas over Redis pub/sub: "work appeared in
//! this scope", "cancel this lease", "this worker was evicted". Redis carries
//! hints only; the store is the truth. While Redis is unreachable every
//! replica polls the queue at the fallback interval, so losing Redis slows
//! dispatch to the polling interval and loses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::Scope;

const CHANNEL: &str = "bulkhead.dispatcher.v1";
const OUTBOX: usize = 4096;

/// A hint from another replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Scope(Scope),
    Cancel {
        worker_id: String,
        task_id: String,
        attempt: u32,
        lease_epoch: u64,
    },
    Evict {
        worker_id: String,
    },
}

impl Message {
    fn encode(&self) -> String {
        match self {
            Message::Scope(Scope::Tenant(t)) => format!("s t {t}"),
            Message::Scope(Scope::Pool(p)) => format!("s p {p}"),
            Message::Cancel {
                worker_id,
                task_id,
                attempt,
                lease_epoch,
            } => format!("c {worker_id} {task_id} {attempt} {lease_epoch}"),
            Message::Evict { worker_id } => format!("e {worker_id}"),
        }
    }

    fn decode(s: &str) -> Option<Message> {
        let parts: Vec<&str> = s.split(' ').collect();
        Some(match parts.as_slice() {
            ["s", "t", t] if !t.is_empty() => Message::Scope(Scope::Tenant((*t).to_owned())),
            ["s", "p", p] if !p.is_empty() => Message::Scope(Scope::Pool((*p).to_owned())),
            ["c", w, t, a, e] => Message::Cancel {
                worker_id: (*w).to_owned(),
                task_id: (*t).to_owned(),
                attempt: a.parse().ok()?,
                lease_epoch: e.parse().ok()?,
            },
            ["e", w] => Message::Evict {
                worker_id: (*w).to_owned(),
            },
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct Shared {
    client: redis::Client,
    outbox: mpsc::Sender<String>,
    subscribed: AtomicBool,
}

/// The wake-up channel: Redis, or none (one replica; polling only).
#[derive(Debug, Clone)]
pub struct Wake {
    redis: Option<Arc<Shared>>,
    outbox_rx: Arc<std::sync::Mutex<Option<mpsc::Receiver<String>>>>,
}

impl Wake {
    /// No Redis: this replica relies on its own wake-ups and polling.
    pub fn none() -> Wake {
        Wake {
            redis: None,
            outbox_rx: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Redis at `url` (`redis://host:port`). Connects lazily and keeps
    /// reconnecting; never fails after a valid URL.
    pub fn redis(url: &str) -> Result<Wake, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (tx, rx) = mpsc::channel(OUTBOX);
        Ok(Wake {
            redis: Some(Arc::new(Shared {
                client,
                outbox: tx,
                subscribed: AtomicBool::new(false),
            })),
            outbox_rx: Arc::new(std::sync::Mutex::new(Some(rx))),
        })
    }

    /// Whether wake-ups from other replicas arrive now (Redis configured and
    /// subscribed). When not, the poller runs at the fallback interval.
    pub fn healthy(&self) -> bool {
        self.redis
            .as_ref()
            .is_some_and(|r| r.subscribed.load(Ordering::Relaxed))
    }

    fn publish(&self, m: Message) {
        if let Some(r) = &self.redis {
            // Full outbox: Redis is slow or down; polling covers the hint.
            let _ = r.outbox.try_send(m.encode());
        }
    }

    pub fn publish_scope(&self, scope: &Scope) {
        self.publish(Message::Scope(scope.clone()));
    }

    pub fn publish_cancel(&self, worker_id: &str, task_id: &str, attempt: u32, lease_epoch: u64) {
        self.publish(Message::Cancel {
            worker_id: worker_id.to_owned(),
            task_id: task_id.to_owned(),
            attempt,
            lease_epoch,
        });
    }

    pub fn publish_evict(&self, worker_id: &str) {
        self.publish(Message::Evict {
            worker_id: worker_id.to_owned(),
        });
    }

    /// Runs the publisher and the subscriber until `stop`, handing each
    /// message to `on_message`.
    pub async fn listen(
        &self,
        stop: CancellationToken,
        on_message: impl Fn(Message) + Send + Sync + 'static,
    ) {
        let Some(shared) = self.redis.clone() else {
            return;
        };
        let outbox = self
            .outbox_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(rx) = outbox {
            tokio::spawn(publish_loop(shared.clone(), rx, stop.clone()));
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match subscribe_once(&shared, &stop, &on_message).await {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => tracing::warn!("redis subscription ended; polling until it is back"),
                Err(e) => tracing::warn!(error = %e, "redis unavailable; polling until it is back"),
            }
            shared.subscribed.store(false, Ordering::Relaxed);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

async fn subscribe_once(
    shared: &Shared,
    stop: &CancellationToken,
    on_message: &(impl Fn(Message) + Send + Sync),
) -> Result<(), redis::RedisError> {
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), shared.client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timed out")))??;
    pubsub.subscribe(CHANNEL).await?;
    shared.subscribed.store(true, Ordering::Relaxed);
    tracing::info!("subscribed to dispatcher wake-ups on redis");
    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { return Ok(()) };
                match m.get_payload::<String>().ok().as_deref().and_then(Message::decode) {
                    Some(msg) => on_message(msg),
                    None => tracing::debug!("ignored a malformed wake-up"),
                }
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

async fn publish_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<String>,
    stop: CancellationToken,
) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            () = stop.cancelled() => return,
        };
        if conn.is_none() {
            let connect = tokio::time::timeout(
                Duration::from_millis(500),
                shared.client.get_multiplexed_async_connection(),
            )
            .await;
            match connect {
                Ok(Ok(c)) => conn = Some(c),
                // Drop the hint: while Redis is down every replica polls.
                _ => continue,
            }
        }
        if let Some(c) = conn.as_mut() {
            let sent = tokio::time::timeout(
                Duration::from_millis(500),
                redis::cmd("PUBLISH")
                    .arg(CHANNEL)
                    .arg(&msg)
                    .query_async::<i64>(c),
            )
            .await;
            if !matches!(sent, Ok(Ok(_))) {
                conn = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Scope(Scope::Tenant("acme".into())),
            Message::Scope(Scope::Pool("shared".into())),
            Message::Cancel {
                worker_id: "w-1".into(),
                task_id: "abc".into(),
                attempt: 2,
                lease_epoch: 7,
            },
            Message::Evict {
                worker_id: "w-2".into(),
            },
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode("s t"), None);
        assert_eq!(Message::decode("c w t 1 notanumber"), None);
        assert_eq!(Message::decode(""), None);
    }
}
