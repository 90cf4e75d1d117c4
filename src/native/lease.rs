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
//!
//! The holder writes who it is into the lock file when it takes the lease
//! (`pid=`, `owner=`, `since=` lines): [`probe`] reads it for tools such as
//! the inspector's `status`. The text is informative only; the lock decides.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
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
        let path = lock_path(database);
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
            if let Some(file) = &state.file {
                write_holder(file, request.owner, request.now);
            }
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

/// The lock file of the database at `database` (as SQLite reports its
/// path); `None` for an in-memory or temporary one.
fn lock_path(database: Option<&str>) -> Option<PathBuf> {
    database
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(format!("{p}-outbox.lock")))
}

/// Who holds (or last held) the relay lease of a database file, from
/// [`Outbox::relay_lease`](crate::Outbox::relay_lease).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLease {
    /// A relay, in this process or another, holds the lease now: no other
    /// relay on this file may send until it lets go or its process ends.
    pub held: bool,
    /// What the holder wrote into the lock file when it took the lease: the
    /// holder now when `held`, otherwise the last one (whose process may have
    /// ended). `None` when no relay has taken the lease since the file was
    /// made, or the record cannot be read (Windows keeps a locked file from
    /// being read by others).
    pub holder: Option<LeaseHolder>,
}

/// The record a relay writes into the lock file when it takes the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The holding process's id.
    pub pid: u32,
    /// The relay's owner id (one per relay; see `RelayBuilder`).
    pub owner: String,
    /// When it took the lease.
    pub since: Timestamp,
}

/// Who holds the relay lease of the database at `database` (as SQLite
/// reports its path), without taking it: a shared lock is tried and let go
/// at once, so a relay that claims at that very moment waits for one wake-up
/// (see [`FileLease::take`]). An in-memory database has no lock file and
/// reports `held: false`, no holder.
///
/// Errors: [`Error::Storage`] when the lock file exists but cannot be
/// opened or locked.
pub(crate) fn probe(database: Option<&str>) -> Result<RelayLease> {
    let none = RelayLease {
        held: false,
        holder: None,
    };
    let Some(path) = lock_path(database) else {
        return Ok(none);
    };
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(none),
        Err(e) => return Err(lock_error(&path, e)),
    };
    // flock locks belong to the open file: a relay of this very process
    // holding the lease through its own handle blocks this one too.
    let held = match file.try_lock_shared() {
        Ok(()) => false,
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(e)) => return Err(lock_error(&path, e)),
    };
    let mut text = String::new();
    let holder = file
        .read_to_string(&mut text)
        .ok()
        .and_then(|_| parse_holder(&text));
    Ok(RelayLease { held, holder })
}

/// Write the holder's record into the locked lock file. Best effort: the
/// lease works without it, only tools see less.
fn write_holder(mut file: &File, owner: &str, since: Timestamp) {
    let text = format!(
        "pid={}\nowner={owner}\nsince={}\n",
        std::process::id(),
        since.to_rfc3339()
    );
    let written = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(text.as_bytes()));
    if let Err(e) = written {
        trace::debug!(error = %e, "could not record the lease holder in the lock file");
    }
}

fn parse_holder(text: &str) -> Option<LeaseHolder> {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    };
    Some(LeaseHolder {
        pid: field("pid")?.parse().ok()?,
        owner: field("owner")?.to_owned(),
        since: Timestamp::parse_rfc3339(field("since")?)?,
    })
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
