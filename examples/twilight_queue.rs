//! gateway-queue as twilight's identify queue.
//!
//! Written against twilight-gateway 0.16.0 (twilight-gateway-queue 0.16.0), whose trait is
//! `Queue::enqueue(&self, u32) -> oneshot::Receiver<()>`. twilight 0.17 has the same trait and
//! shard loop, so the module builds there too. 0.15 does not fit: its `Queue::request` returns a
//! boxed future. Dependencies:
//!
//! ```toml
//! twilight-gateway = "0.16"
//! reqwest = { version = "0.12.16", default-features = false }  # 0.13 fits as well
//! tokio = { version = "1", features = ["macros", "rt", "sync", "time"] }
//! tracing = "0.1"
//! fastrand = "2"
//! ```
//!
//! ```ignore
//! let url = reqwest::Url::parse("http://gateway-queue/")?;
//! let queue = GatewayQueue::new(url, std::env::var("QUEUE_AUTH_TOKEN").ok())?;
//! let config = ConfigBuilder::new(token, intents).queue(queue.clone()).build();
//! let shards = twilight_gateway::create_recommended(&http, config, |_, b| b.build()).await?;
//! tokio::select! {
//!     () = run(shards) => {}
//!     refusal = queue.refused() => return Err(refusal.into()),
//! }
//! ```
//!
//! A shard asks when Discord says HELLO and keeps its connection (and heartbeats) while it waits.
//! The request has no total timeout: the queue answers when the shard may identify, which can take
//! hours. TCP keepalive notices a queue host that vanished without closing the connection.
//! If the shard drops its receiver (it disconnected), the request is dropped and frees its place.
//!
//! twilight gives a queue no way to fail a shard: a closed channel makes the shard enqueue again at
//! once, so closing it on an error would turn a `401` into a request loop. This queue keeps the
//! channel open and asks again instead:
//! - `503` (the queue is restarting) and network errors, refused connections included: again
//!   after a delay that starts at 1 s and doubles up to 30 s, half of it random. Logged at INFO
//!   and WARN.
//! - any other status (a wrong URL or `QUEUE_AUTH_TOKEN`): an ERROR with the status and the start
//!   of the body, then again after a delay that starts at 30 s and doubles up to 10 min. The shard
//!   stays connected without identifying, so no dispatch events arrive. [`GatewayQueue::refused`]
//!   resolves, so `main` can stop instead of waiting for someone to fix the configuration. A shard
//!   left running identifies once the queue accepts it.

use reqwest::{Client, Response, StatusCode, Url};
use std::{
    collections::HashMap,
    fmt, mem,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use twilight_gateway::{queue::Queue, Event};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_LOGGED: usize = 200;

/// Identify queue that asks gateway-queue over HTTP. Cloning is cheap and shares the client.
#[derive(Clone)]
pub struct GatewayQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    url: Url,
    secret: Option<String>,
    refused_tx: watch::Sender<Option<Refusal>>,
    refused_rx: watch::Receiver<Option<Refusal>>,
}

/// The queue answered neither `200` nor `503`: its URL or the shared secret is wrong.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub shard: u32,
    pub status: StatusCode,
    pub body: String,
}

impl GatewayQueue {
    /// `url` is the queue's base, like `http://gateway-queue/`. `secret` is sent as a bearer token.
    ///
    /// # Errors
    ///
    /// When reqwest cannot build its client (no TLS backend or resolver could be set up).
    pub fn new(url: Url, secret: Option<String>) -> reqwest::Result<Self> {
        let client = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(60))
            .tcp_keepalive_interval(Duration::from_secs(15))
            .tcp_keepalive_retries(4)
            .no_proxy()
            .build()?;
        let (refused_tx, refused_rx) = watch::channel(None);
        let secret = secret.filter(|secret| !secret.is_empty());

        Ok(Self {
            inner: Arc::new(Inner {
                client,
                url,
                secret,
                refused_tx,
                refused_rx,
            }),
        })
    }

    /// Resolves with the first refusal since the queue was created, or the next one.
    pub async fn refused(&self) -> Refusal {
        let mut refused = self.inner.refused_rx.clone();
        loop {
            if let Some(refusal) = refused.borrow_and_update().clone() {
                return refusal;
            }
            refused.changed().await.expect("the queue holds the sender");
        }
    }

    /// Asks until the queue lets `shard` identify. Dropping the future drops the request.
    async fn wait_for_grant(&self, shard: u32) {
        let mut url = self.inner.url.clone();
        url.query_pairs_mut()
            .append_pair("shard", &shard.to_string());
        let mut unavailable = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut refused = Backoff::new(Duration::from_secs(30), Duration::from_secs(600));

        loop {
            let response = self
                .authorized(self.inner.client.get(url.clone()))
                .send()
                .await;
            let delay = match response {
                Ok(response) if response.status() == StatusCode::OK => return,
                Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    let delay = unavailable.next();
                    tracing::info!(shard, retry_in = ?delay, "gateway-queue is restarting");
                    delay
                }
                Ok(response) => {
                    let refusal = Refusal::read(shard, response).await;
                    let delay = refused.next();
                    tracing::error!(
                        shard, status = %refusal.status, body = %refusal.body, retry_in = ?delay,
                        "gateway-queue refused the request: check its URL and QUEUE_AUTH_TOKEN",
                    );
                    self.inner.refused_tx.send_replace(Some(refusal));
                    delay
                }
                Err(error) => {
                    let delay = unavailable.next();
                    tracing::warn!(shard, ?error, retry_in = ?delay, "gateway-queue unreachable");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.inner.secret {
            Some(secret) => request.bearer_auth(secret),
            None => request,
        }
    }
}

impl Queue for GatewayQueue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        let (mut tx, rx) = oneshot::channel();
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tx.closed() => {}
                () = queue.wait_for_grant(shard) => {
                    _ = tx.send(());
                }
            }
        });
        rx
    }
}

impl fmt::Debug for GatewayQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayQueue")
            .field("url", &self.inner.url.as_str())
            .finish_non_exhaustive()
    }
}

impl Refusal {
    async fn read(shard: u32, mut response: Response) -> Self {
        let status = response.status();
        let body = match tokio::time::timeout(BODY_TIMEOUT, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                String::from_utf8_lossy(&chunk[..chunk.len().min(BODY_LOGGED)]).into_owned()
            }
            _ => String::new(),
        };
        Self {
            shard,
            status,
            body,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gateway-queue refused shard {}: {} {}",
            self.shard, self.status, self.body
        )
    }
}

impl std::error::Error for Refusal {}

/// Exponential backoff, half of each delay random.
struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    const fn new(first: Duration, cap: Duration) -> Self {
        Self { next: first, cap }
    }

    fn next(&mut self) -> Duration {
        let full = self.next;
        self.next = (full * 2).min(self.cap);
        full / 2 + full.mul_f64(fastrand::f64()) / 2
    }
}

// Lease mode ------------------------------------------------------------------------------

/// What ended a shard's hold on its bucket.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Outcome {
    Ready,
    InvalidSession,
    Closed,
}

impl Outcome {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::InvalidSession => "invalid_session",
            Self::Closed => "closed",
        }
    }
}

/// [`GatewayQueue`] for a server in lease mode: a grant holds the shard's bucket until the shard
/// reports with `POST /release?shard=N&outcome=...` or `LEASE_TIMEOUT` passes. Use it only against
/// a server with lease mode on. Add one line to each shard's loop:
///
/// ```ignore
/// while let Some(item) = shard.next_event(EventTypeFlags::all()).await {
///     let Ok(event) = item else {
///         tracing::warn!(source = ?item.unwrap_err(), "error receiving event");
///         continue;
///     };
///     shard.config().queue().observe(shard.id().number(), &event);
///     // the bot's own handling
/// }
/// ```
///
/// The wanted flags must include `READY` and `GATEWAY_INVALIDATE_SESSION` (close frames always
/// arrive). `observe` ends the hold on READY (`ready`), on op 9 (`invalid_session`) and on a
/// close (`closed`); it sends nothing when the shard holds no lease, as after a RESUME. The queue
/// releases by itself where twilight tells it: a grant the shard stopped waiting for, and a shard
/// that asks again with a lease still held (its last attempt never reached READY). A release is
/// sent before the shard's next request. One that fails is logged at WARN and dropped:
/// `LEASE_TIMEOUT` ends the hold then, as it does when the process dies, the `Shard` is dropped,
/// or the loop stops polling before READY.
#[derive(Clone, Debug)]
pub struct LeasedGatewayQueue {
    queue: GatewayQueue,
    leases: Arc<Mutex<HashMap<u32, Lease>>>,
}

#[derive(Debug, Default)]
struct Lease {
    held: bool,
    releasing: Option<JoinHandle<()>>,
}

impl LeasedGatewayQueue {
    /// As [`GatewayQueue::new`].
    ///
    /// # Errors
    ///
    /// When reqwest cannot build its client.
    pub fn new(url: Url, secret: Option<String>) -> reqwest::Result<Self> {
        Ok(Self {
            queue: GatewayQueue::new(url, secret)?,
            leases: Arc::default(),
        })
    }

    /// As [`GatewayQueue::refused`].
    pub async fn refused(&self) -> Refusal {
        self.queue.refused().await
    }

    /// Releases `shard`'s lease if `event` ends its identify attempt.
    pub fn observe(&self, shard: u32, event: &Event) {
        let outcome = match event {
            Event::Ready(_) => Outcome::Ready,
            Event::GatewayInvalidateSession(_) => Outcome::InvalidSession,
            Event::GatewayClose(_) => Outcome::Closed,
            _ => return,
        };
        self.release(shard, outcome);
    }

    /// Sends the release in the background if `shard` holds a lease.
    pub fn release(&self, shard: u32, outcome: Outcome) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let lease = leases.entry(shard).or_default();
        if mem::take(&mut lease.held) {
            lease.releasing = Some(tokio::spawn(
                self.queue.clone().post_release(shard, outcome),
            ));
        }
    }

    fn hold(&self, shard: u32) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(shard)
            .or_default()
            .held = true;
    }

    fn take_releasing(&self, shard: u32) -> Option<JoinHandle<()>> {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases
            .get_mut(&shard)
            .and_then(|lease| lease.releasing.take())
    }
}

impl Queue for LeasedGatewayQueue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        self.release(shard, Outcome::Closed);
        let releasing = self.take_releasing(shard);
        let (mut tx, rx) = oneshot::channel();
        let queue = self.clone();
        tokio::spawn(async move {
            if let Some(releasing) = releasing {
                _ = releasing.await;
            }
            tokio::select! {
                () = tx.closed() => return,
                () = queue.queue.wait_for_grant(shard) => {}
            }
            queue.hold(shard);
            if tx.send(()).is_err() {
                queue.release(shard, Outcome::Closed);
            }
        });
        rx
    }
}

impl GatewayQueue {
    async fn post_release(self, shard: u32, outcome: Outcome) {
        let mut url = self
            .inner
            .url
            .join("release")
            .expect("a relative path joins any base");
        url.query_pairs_mut()
            .append_pair("shard", &shard.to_string())
            .append_pair("outcome", outcome.as_str());
        let request = self
            .authorized(self.inner.client.post(url))
            .timeout(RELEASE_TIMEOUT);
        let outcome = outcome.as_str();

        match request.send().await {
            Ok(response) if response.status().is_success() => {
                tracing::debug!(shard, outcome, "released the bucket");
            }
            Ok(response) => {
                let refusal = Refusal::read(shard, response).await;
                tracing::warn!(
                    shard, outcome, status = %refusal.status, body = %refusal.body,
                    "gateway-queue refused the release; LEASE_TIMEOUT ends the hold",
                );
            }
            Err(error) => {
                tracing::warn!(
                    shard,
                    outcome,
                    ?error,
                    "release failed; LEASE_TIMEOUT ends the hold"
                );
            }
        }
    }
}
