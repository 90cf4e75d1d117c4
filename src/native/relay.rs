//! The native relay driver: runs the target-independent [`Relay`] core on tokio.
//!
//! One task per relay. It drains what is due (claim -> send -> settle, batch
//! after batch), then sleeps until the first of:
//! - a local commit (the outbox's commit signal),
//! - the retry time of the oldest pending event, or the expiry of another
//!   relay's lease,
//! - the poll interval (default 1 s), so events committed by *another process*
//!   on the same file are noticed too (an idle poll is one small read; it
//!   claims only when something is pending, and a claim writes nothing
//!   either),
//! - another process letting the relay lease go (it died or shut down):
//!   a thread blocked on the lease's file lock wakes the relay at once,
//! - an explicit [`RelayHandle::flush`], or [`RelayHandle::shutdown`].
//!
//! Only one relay per file sends. For an [`Outbox`]'s store the lease is an
//! OS file lock next to the database, which the kernel drops when the process
//! dies, however it dies (`kill -9` included): a relay in another process
//! takes over within milliseconds, not after a lease time. Between relays of
//! one process, the lease also has an expiry (see [`RelayBuilder::lease`]).
//!
//! Shutdown is checked between batches only, so a batch on the wire is always
//! settled (or, if the process dies first, stays pending and is resent: the
//! server dedupes). The lease is released at shutdown so another relay can
//! start at once. A relay task that is aborted (or panics) in a process that
//! lives on keeps the lease: another relay of that process takes over once
//! the lease expires; relays of other processes wait until this process
//! releases it or closes the outbox.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::outbox::Outbox;
use super::sqlite::SqliteStore;
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::policy::{Jitter, RetryPolicy};
use crate::relay::{FlushReport, Relay, RelayConfig, RelayStatus};
use crate::store::{Claim, ClaimRequest, Settlement, Stats, Store};
use crate::time::Timestamp;
use crate::trace;
use crate::transport::Transport;

/// Default interval between polls for events committed by other processes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

impl Outbox {
    /// Configure a relay that delivers this outbox's events through `transport`
    /// and wakes at every commit made through this handle.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use edge_outbox::{Config, HttpTransport, Outbox, RetryPolicy};
    /// use edge_outbox::transport::credentials_fn;
    ///
    /// # async fn fetch_token(refresh: bool) -> edge_outbox::Result<String> { Ok(format!("t{refresh}")) }
    /// # async fn demo() -> edge_outbox::Result<()> {
    /// let outbox = Outbox::open("app.db", Config::new("http://127.0.0.1:8080/v1/events"))?;
    /// let transport = HttpTransport::builder("http://127.0.0.1:8080/v1/events")
    ///     .timeout(Duration::from_secs(10))          // whole push; keep it below the lease
    ///     .gzip(true)
    ///     .credentials(credentials_fn(|refresh: bool| async move {
    ///         // Asked at every send; `refresh` after a 401/403. Never stored in the outbox.
    ///         let token = fetch_token(refresh).await?;
    ///         Ok(vec![("authorization".to_owned(), format!("Bearer {token}"))])
    ///     }))
    ///     .build()?;
    /// let relay = outbox
    ///     .relay(transport)
    ///     .retry_policy(RetryPolicy::new().with_max_age(Some(Duration::from_secs(7 * 86_400))))
    ///     .spawn();                                   // wakes on every commit, on timers, every 1 s
    ///
    /// let status = relay.subscribe();                 // tokio::sync::watch of RelayStatus
    /// let report = relay.flush().await?;              // deliver what is due now
    /// println!("sent {}, dead {}, pending {}", report.sent, report.dead, report.pending);
    /// relay.shutdown().await?;                        // the batch in flight settles; lease released
    /// # drop(status);
    /// # Ok(()) }
    /// ```
    pub fn relay<T: Transport + 'static>(&self, transport: T) -> RelayBuilder<SqliteStore, T> {
        RelayBuilder::new(self.store().clone(), transport).wake_on(self.commit_notify())
    }
}

/// Configures and starts a relay task (see [`Outbox::relay`]).
pub struct RelayBuilder<S, T> {
    store: S,
    transport: T,
    config: RelayConfig,
    wake: Option<Arc<Notify>>,
    poll_interval: Duration,
    jitter: Option<Jitter>,
}

impl<S, T> std::fmt::Debug for RelayBuilder<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("config", &self.config)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl<S: Store + Clone + 'static, T: Transport + 'static> RelayBuilder<S, T> {
    /// A relay over any [`Store`] (the outbox's, or a test double).
    pub fn new(store: S, transport: T) -> Self {
        RelayBuilder {
            store,
            transport,
            config: RelayConfig::default(),
            wake: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            jitter: None,
        }
    }

    /// Replace the whole configuration.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Most events in one push (default 100).
    pub fn max_events(mut self, n: usize) -> Self {
        self.config = self.config.with_max_events(n);
        self
    }

    /// Most event bytes in one push (default 512 KiB).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.config = self.config.with_max_bytes(n);
        self
    }

    /// Lease duration (default 30 s): how long another relay *of this process*
    /// waits after this one stops renewing it without releasing it (an
    /// aborted task). Between processes the lease of an [`Outbox`]'s store is
    /// an OS file lock that ends when the holding process dies, whatever
    /// this says; the length still bounds an expiry stored by a clock that
    /// ran ahead.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config = self.config.with_lease(lease);
        self
    }

    /// Backoff, `Retry-After` handling and max age.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.config = self.config.with_retry(policy);
        self
    }

    /// The lease owner's name (random by default).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.config = self.config.with_owner(owner);
        self
    }

    /// How often to look for events committed by other processes (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Wake at once when `notify` is notified (a commit).
    pub fn wake_on(mut self, notify: Arc<Notify>) -> Self {
        self.wake = Some(notify);
        self
    }

    /// A fixed jitter source, for reproducible tests.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = Some(jitter);
        self
    }

    /// Start the relay task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn(self) -> RelayHandle {
        let mut relay = Relay::new(OffThread(self.store), self.transport, self.config);
        if let Some(jitter) = self.jitter {
            relay = relay.with_jitter(jitter);
        }
        let (status_tx, status_rx) = watch::channel(RelayStatus::default());
        relay.set_observer(move |s: &RelayStatus| {
            status_tx.send_replace(s.clone());
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            relay,
            commands: rx,
            wake: self.wake.unwrap_or_default(),
            poll_interval: self.poll_interval,
            waiters: Vec::new(),
            stopping: false,
        };
        RelayHandle {
            commands,
            status: status_rx,
            task: tokio::spawn(driver.run()),
        }
    }
}

enum Command {
    Flush(oneshot::Sender<Result<FlushReport>>),
    Shutdown,
}

/// A running relay. Dropping it stops the relay gracefully in the background;
/// call [`RelayHandle::shutdown`] to wait for that.
#[derive(Debug)]
pub struct RelayHandle {
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<RelayStatus>,
    task: JoinHandle<Result<()>>,
}

impl RelayHandle {
    /// Deliver everything due now and report. Returns once nothing is pending,
    /// the oldest event waits for a retry time (see `next_attempt`), a batch
    /// failed, or another relay holds the lease.
    pub async fn flush(&self) -> Result<FlushReport> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The current status.
    pub fn status(&self) -> RelayStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (`changed().await`).
    pub fn subscribe(&self) -> watch::Receiver<RelayStatus> {
        self.status.clone()
    }

    /// Stop after the batch in flight (if any) is settled, release the lease
    /// and wait for the task to end. Nothing pending is lost.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.commands.send(Command::Shutdown);
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(Error::storage(format!("relay task failed: {e}"), None)),
        }
    }

    /// Stop the task at once, as a crash would: the batch in flight is not
    /// settled (its events stay pending and are resent later, which the server
    /// dedupes) and the lease is not released (another relay of this process
    /// waits for it to expire; relays of other processes wait until this
    /// process releases the file lock or closes the outbox). For tests of
    /// crash recovery; prefer [`RelayHandle::shutdown`].
    pub fn abort(self) {
        self.task.abort();
    }
}

struct Driver<S, T> {
    relay: Relay<OffThread<S>, T>,
    commands: mpsc::UnboundedReceiver<Command>,
    wake: Arc<Notify>,
    poll_interval: Duration,
    waiters: Vec<oneshot::Sender<Result<FlushReport>>>,
    stopping: bool,
}

impl<S: Store + Clone + 'static, T: Transport> Driver<S, T> {
    async fn run(mut self) -> Result<()> {
        let mut failed = false;
        let mut timer_only = false;
        loop {
            // A poll with nothing pending before and nothing pending now: skip
            // the claim (which would take the lease) and the relay's counts.
            // One small read instead; nothing is written to the file.
            let idle = timer_only
                && !failed
                && self.waiters.is_empty()
                && self.relay.status().next_attempt.is_none()
                && self.relay.status().lease_held_until.is_none()
                && self.relay.status().pending == 0
                && matches!(self.relay.store().pending(1).await, Ok(p) if p.is_empty());
            if !idle {
                let drained = self.drain().await;
                if let Err(e) = &drained {
                    trace::warning!(error = %e, "relay: flush failed, retrying later");
                }
                failed = drained.is_err();
                self.answer(drained);
            }
            if self.stopping {
                break;
            }
            let deadline = self.deadline(failed);
            let (command, timer) = tokio::select! {
                _ = self.wake.notified() => (None, false),
                command = self.commands.recv() => (Some(command), false),
                _ = tokio::time::sleep_until(deadline) => (None, true),
            };
            timer_only = timer;
            if let Some(command) = command {
                self.accept(command);
            }
            if self.stopping {
                break;
            }
        }
        self.relay.release_lease().await
    }

    fn accept(&mut self, command: Option<Command>) {
        match command {
            Some(Command::Flush(reply)) => self.waiters.push(reply),
            // Shutdown, or every handle dropped.
            Some(Command::Shutdown) | None => self.stopping = true,
        }
    }

    /// Deliver what is due now; commands are taken between batches so a
    /// shutdown never cuts a batch in half.
    async fn drain(&mut self) -> Result<FlushReport> {
        let (commands, waiters, stopping) =
            (&mut self.commands, &mut self.waiters, &mut self.stopping);
        self.relay
            .flush_while(|| {
                loop {
                    match commands.try_recv() {
                        Ok(Command::Flush(reply)) => waiters.push(reply),
                        Ok(Command::Shutdown) | Err(mpsc::error::TryRecvError::Disconnected) => {
                            *stopping = true;
                            break;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                    }
                }
                !*stopping
            })
            .await
    }

    fn answer(&mut self, drained: Result<FlushReport>) {
        let mut waiters = std::mem::take(&mut self.waiters).into_iter();
        match drained {
            Ok(report) => waiters.for_each(|w| {
                let _ = w.send(Ok(report.clone()));
            }),
            Err(e) => {
                let message = e.to_string();
                if let Some(first) = waiters.next() {
                    let _ = first.send(Err(e));
                }
                waiters.for_each(|w| {
                    let _ = w.send(Err(Error::storage(message.clone(), None)));
                });
            }
        }
    }

    /// When to look again if nothing wakes the relay earlier.
    fn deadline(&self, failed: bool) -> Instant {
        let now = Instant::now();
        let mut deadline = now + self.poll_interval;
        if failed {
            // The store itself failed (locked, disk full): try again after a
            // poll interval, however long the backoff of the events says.
            return deadline;
        }
        let status = self.relay.status();
        let wall = Timestamp::now();
        for at in [status.next_attempt, status.lease_held_until]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(now + at.since(wall));
        }
        deadline
    }
}

/// A [`ClaimRequest`] that owns its owner name, to move into the blocking pool.
struct OwnedClaimRequest {
    owner: String,
    request: ClaimRequest<'static>,
}

impl From<ClaimRequest<'_>> for OwnedClaimRequest {
    fn from(request: ClaimRequest<'_>) -> Self {
        OwnedClaimRequest {
            owner: request.owner.to_owned(),
            request: ClaimRequest {
                owner: "",
                ..request
            },
        }
    }
}

impl OwnedClaimRequest {
    fn borrow(&self) -> ClaimRequest<'_> {
        ClaimRequest {
            owner: &self.owner,
            ..self.request.clone()
        }
    }
}

/// Runs the relay's store calls (claim, settle, counts, lease) on tokio's
/// blocking pool. SQLite works synchronously: on the runtime's own threads it
/// would stall the app's other tasks, and the HTTP client's connection task,
/// which must write the next push while the previous one is being settled.
#[derive(Clone)]
struct OffThread<S>(S);

impl<S: Store + Clone + 'static> OffThread<S> {
    async fn run<R, F, Fut>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(S) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<R>>,
    {
        let store = self.0.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(f(store)))
            .await
            .map_err(|e| Error::storage(format!("store task failed: {e}"), None))?
    }
}

impl<S: Store + Clone + 'static> Store for OffThread<S> {
    fn client_id(&self) -> &str {
        self.0.client_id()
    }

    async fn enqueue(&self, events: Vec<crate::NewEvent>) -> Result<Vec<crate::Event>> {
        self.0.enqueue(events).await
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim> {
        let request = OwnedClaimRequest::from(request);
        self.run(move |store| async move { store.claim(request.borrow()).await })
            .await
    }

    async fn settle(&self, outcomes: Vec<Settlement>, now: Timestamp) -> Result<()> {
        self.run(move |store| async move { store.settle(outcomes, now).await })
            .await
    }

    /// One trip to the blocking pool for both (the store's own
    /// `settle_and_claim`), not one each: the relay does this beside every
    /// push, and each hand-off is two thread wake-ups.
    async fn settle_and_claim(
        &self,
        outcomes: Vec<Settlement>,
        now: Timestamp,
        request: ClaimRequest<'_>,
    ) -> Result<Result<Claim>> {
        let request = OwnedClaimRequest::from(request);
        self.run(move |store| async move {
            store
                .settle_and_claim(outcomes, now, request.borrow())
                .await
        })
        .await
    }

    async fn release_lease(&self, owner: &str) -> Result<()> {
        let owner = owner.to_owned();
        self.run(move |store| async move { store.release_lease(&owner).await })
            .await
    }

    async fn stats(&self) -> Result<Stats> {
        self.run(|store| async move { store.stats().await }).await
    }

    async fn pending(&self, limit: usize) -> Result<Vec<crate::Event>> {
        self.0.pending(limit).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<crate::Event>> {
        self.0.dead_letters(limit).await
    }

    async fn get(&self, id: EventId) -> Result<Option<crate::Event>> {
        self.0.get(id).await
    }

    async fn retry(&self, id: EventId, now: Timestamp) -> Result<bool> {
        self.0.retry(id, now).await
    }

    async fn retry_now(&self, now: Timestamp) -> Result<u64> {
        self.0.retry_now(now).await
    }

    async fn discard(&self, id: EventId) -> Result<bool> {
        self.0.discard(id).await
    }

    async fn prune_sent(&self, before: Timestamp) -> Result<u64> {
        self.0.prune_sent(before).await
    }
}
