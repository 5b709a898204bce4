//! A volume's write gate: every local write (the NBD export) passes it.
//!
//! A write holds the gate (a read lock) from its check until its record and
//! image write are done; closing takes the write lock, so when `close`
//! returns no write is in progress and none can start. Closing also bumps a
//! generation that open NBD connections watch: they end, and a client that
//! reconnects finds no export until the gate opens again.

use std::sync::{RwLock, RwLockReadGuard};

use tokio::sync::watch;

pub struct Gate {
    /// `None` while open; the reason while closed.
    state: RwLock<Option<String>>,
    closes: watch::Sender<u64>,
    opens: watch::Sender<u64>,
}

/// Proof that the gate was open; writes hold it until they are done.
pub type Pass<'a> = RwLockReadGuard<'a, Option<String>>;

impl Gate {
    pub fn new(closed: Option<String>) -> Gate {
        Gate {
            state: RwLock::new(closed),
            closes: watch::channel(0).0,
            opens: watch::channel(0).0,
        }
    }

    /// Lets a write through, or says why not.
    pub fn enter(&self) -> Result<Pass<'_>, String> {
        let g = self.state.read().unwrap_or_else(|p| p.into_inner());
        match &*g {
            None => Ok(g),
            Some(why) => Err(why.clone()),
        }
    }

    pub fn is_open(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Why the gate is closed, if it is.
    pub fn closed_because(&self) -> Option<String> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn open(&self) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.opens.send_modify(|n| *n += 1);
    }

    /// Changes each time the gate opens.
    pub fn opened(&self) -> watch::Receiver<u64> {
        self.opens.subscribe()
    }

    /// Closes the gate: waits for writes in progress, refuses new ones, and
    /// tells open connections to end.
    pub fn close(&self, reason: &str) {
        {
            let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
            *g = Some(reason.to_string());
        }
        self.closes.send_modify(|n| *n += 1);
    }

    /// Changes each time the gate closes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.closes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn closing_waits_for_writes_in_progress_and_refuses_new_ones() {
        let gate = Arc::new(Gate::new(None));
        let w = gate.watch();
        let pass = gate.enter().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let (g2, c2) = (gate.clone(), closed.clone());
        let t = std::thread::spawn(move || {
            g2.close("fenced");
            c2.store(true, Ordering::SeqCst);
        });
        // The close cannot finish while a write holds the gate; the write
        // ends, then the close does.
        std::thread::yield_now();
        assert!(!closed.load(Ordering::SeqCst));
        drop(pass);
        t.join().unwrap();
        assert!(closed.load(Ordering::SeqCst));
        assert_eq!(gate.enter().err().as_deref(), Some("fenced"));
        assert!(w.has_changed().unwrap(), "connections are told");
        gate.open();
        assert!(gate.enter().is_ok());
    }
}
