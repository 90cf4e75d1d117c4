//! The relay lease of a [`SqliteStore`](super::SqliteStore): who may send.
//!
//! Between processes it is an exclusive OS advisory lock (`flock` on Unix,
//! `LockFileEx` on Windows) on a sidecar file next to the database,
//! `<database>-outbox.lock`. The kernel drops it when the holding process
//! dies, however it dies (`kill -9`, a crash, power to the process cut), so
//! a relay in another process takes over at once instead of waiting out a
//! lease written into the file. Nothing about the lease is written to the
//! database: a claim is a pure read.
//!
//! Between relays of one process (two relays on one `Outbox`, or two
//! `Outbox` handles on the same file) the lock is held once for the process,
//! and an owner plus an expiry, kept in memory, say which relay may send. A
//! relay task that is aborted or panics leaves that entry behind; another
//! relay of the process takes over once it expires (the relay's lease
//! length), as [`ClaimRequest::lease_holds`] says. Meanwhile this process
//! keeps the file lock: relays in *other* processes wait until a relay of
//! this one releases it or the last handle on the file is dropped.
//!
//! A relay that finds the lock held by another process gets
//! [`Claim::LeaseHeld`](crate::Claim::LeaseHeld) with `until = now + lease`
//! (a live holder's lock has no expiry; that is the longest an unrenewed
//! lease could run) and a background thread starts waiting on the lock
//! itself. The moment the holder dies or lets go, that thread wakes the
//! relays of this file (their commit signal), so takeover does not wait for
//! the next poll.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::store::ClaimRequest;
use crate::time::Timestamp;
use crate::trace;

/// One per database file per process (see [`FileLease::for_database`]).
pub(crate) struct FileLease {
    /// The sidecar lock file; `None` for an in-memory or temporary database,
    /// which no other process can open.
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// The commit signals of every handle on this file: woken when the lock
    /// is freed by another process.
    wakers: Mutex<Vec<Weak<Notify>>>,
}

#[derive(Default)]
struct State {
    /// The locked lock file while this process holds the lock.
    file: Option<File>,
    /// The relay of this process that may send, and until when.
    holder: Option<(String, Timestamp)>,
    /// A background thread is blocked on the lock.
    waiting: bool,
}

/// Every live lease of this process, by lock file.
static LEASES: Mutex<Option<HashMap<PathBuf, Weak<FileLease>>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a claim may not go ahead.
pub(crate) struct Held {
    /// When the holder's lease ends, as far as this process knows.
    pub(crate) until: Timestamp,
}

impl FileLease {
    /// The lease of the database file at `database` (as SQLite reports it;
    /// `None` or empty for an in-memory one), shared by every handle on that
    /// file in this process. `wake` is woken when another process frees it.
    pub(crate) fn for_database(database: Option<&str>, wake: &Arc<Notify>) -> Arc<FileLease> {
        let path = database
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(format!("{p}-outbox.lock")));
        let lease = match &path {
            None => Arc::new(FileLease::new(None)),
            Some(path) => {
                let mut all = lock(&LEASES);
                let all = all.get_or_insert_with(HashMap::new);
                all.retain(|_, lease| lease.strong_count() > 0);
                match all.get(path).and_then(Weak::upgrade) {
                    Some(lease) => lease,
                    None => {
                        let lease = Arc::new(FileLease::new(Some(path.clone())));
                        all.insert(path.clone(), Arc::downgrade(&lease));
                        lease
                    }
                }
            }
        };
        let mut wakers = lock(&lease.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(wake));
        drop(wakers);
        lease
    }

    fn new(path: Option<PathBuf>) -> FileLease {
        FileLease {
            path,
            state: Mutex::new(State::default()),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Take or renew the lease for `request.owner` (obligation 5 of the
    /// store contract), or say who holds it.
    pub(crate) fn take(self: &Arc<Self>, request: &ClaimRequest<'_>) -> Result<Option<Held>> {
        let mut state = lock(&self.state);
        if let Some((owner, until)) = &state.holder
            && owner != request.owner
            && request.lease_holds(*until)
        {
            trace::debug!(holder = %owner, "lease held by another relay of this process");
            return Ok(Some(Held { until: *until }));
        }
        if state.file.is_none()
            && let Some(path) = &self.path
        {
            let file = open(path)?;
            match file.try_lock() {
                Ok(()) => state.file = Some(file),
                Err(TryLockError::WouldBlock) => {
                    trace::debug!(file = %path.display(), "lease held by another process");
                    self.wait_in_background(&mut state);
                    return Ok(Some(Held {
                        until: request.now.add(request.lease),
                    }));
                }
                Err(TryLockError::Error(e)) => return Err(lock_error(path, e)),
            }
        }
        if state
            .holder
            .as_ref()
            .is_none_or(|(o, _)| o != request.owner)
        {
            trace::info!(owner = request.owner, "lease taken");
        }
        state.holder = Some((request.owner.to_owned(), request.now.add(request.lease)));
        Ok(None)
    }

    /// Give the lease up if `owner` holds it: another relay, in this process
    /// or another, may start at once.
    pub(crate) fn release(&self, owner: &str) {
        let mut state = lock(&self.state);
        if state.holder.as_ref().is_some_and(|(o, _)| o == owner) {
            trace::info!(owner, "lease released");
            state.holder = None;
            // Closing the file drops the lock.
            state.file = None;
        }
    }

    /// Block a thread of our own on the lock, and wake the relays when it is
    /// free. The thread lets go at once: the relay takes the lock on its next
    /// claim (if another process is quicker, the relay waits again).
    fn wait_in_background(self: &Arc<Self>, state: &mut State) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if state.waiting {
            return;
        }
        let lease = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("edge-outbox-lease".into())
            .spawn(move || {
                // Returns when the holder dies or releases. Dropping the
                // file lets the lock go again at once.
                let freed = open(&path).is_ok_and(|file| file.lock().is_ok());
                if let Some(lease) = lease.upgrade() {
                    lock(&lease.state).waiting = false;
                    // A lock that cannot be waited on (a file system
                    // without blocking locks) wakes nobody: the relays
                    // notice at their next poll instead of spinning.
                    if freed {
                        trace::debug!("lease file lock freed: waking the relays");
                        lease.wake_all();
                    }
                }
            });
        // Without the thread, the relay still notices at its next poll.
        state.waiting = spawned.is_ok();
    }

    fn wake_all(&self) {
        let mut wakers = lock(&self.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        for waker in wakers.iter().filter_map(Weak::upgrade) {
            waker.notify_one();
        }
    }
}

fn open(path: &PathBuf) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| lock_error(path, e))
}

fn lock_error(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::storage(
        format!(
            "cannot lock the relay lease file {}: {e}; the directory of the database must be writable",
            path.display()
        ),
        Some(Box::new(e)),
    )
}
