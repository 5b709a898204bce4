//! The role/epoch machine of one volume at one site, without I/O.
//!
//! Inputs: the peer's `Hello` (its role and epoch history for the volume), the
//! link going down, the operator's commands; time is passed in. Outputs:
//! [`Command`]s the volume's handle carries out (open or close the write
//! gate, adopt a history, replicate or pause, keep divergent data, resync
//! from the side that is ahead). The decisions follow invariant 5 of
//! DESIGN.md: a site accepts writes for a volume only while it holds the
//! highest epoch it knows, and demotes itself at once when it learns of a
//! higher one; split brain is recorded and stops replication, never resolved
//! by itself.

use std::collections::VecDeque;
use std::time::Instant;

use super::epoch::{EpochEntry, History, Relation};
use crate::store::state::Role;

/// What the peer said about the volume in its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerVolume {
    pub role: Role,
    pub history: History,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The peer's `Hello`: `None` when it does not know the volume.
    PeerHello(Option<PeerVolume>),
    LinkDown,
    /// `ferry demote`: fence the volume without promoting anything.
    Demote {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Local writes may go through (primary, not fenced).
    OpenGate,
    /// No local writes from now on; connected NBD clients are dropped.
    CloseGate { reason: String },
    /// A new replica takes its primary's history (persist it).
    AdoptHistory(History),
    /// In step with the peer: replication of the volume may run.
    Replicate,
    /// Replication of the volume stops until the cause is resolved.
    Pause { reason: String },
    /// Keep this site's state since the fork as a named `divergent` point
    /// before anything overwrites it (invariant 4).
    KeepDivergent { since: Option<EpochEntry> },
    /// Receive a tree comparison from the side that is ahead, then adopt its history.
    ResyncFrom { ahead: History },
    /// The histories forked: both sites wrote since a common state.
    SplitBrain {
        local: Option<EpochEntry>,
        peer: Option<EpochEntry>,
    },
}

/// Why a write was refused, for the peer (a typed wire error) and the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("volume is primary at this site")]
    NotReplica,
    #[error("volume is a replica at this site")]
    NotPrimary,
    #[error("volume is fenced: {0}")]
    Fenced(String),
    #[error(
        "the peer's epoch history is behind this site's (epoch {local}); it must not write here"
    )]
    StaleEpoch { local: u64 },
    #[error("split brain: the sites' histories forked; resolve it (`ferry resolve`)")]
    SplitBrain,
    #[error("this site is behind its peer; it waits for a resync from it")]
    Behind,
}

/// What status shows of the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleView {
    pub epoch: u64,
    /// "in step", "peer behind", "behind", "split brain", "new replica", "unknown".
    pub peer_relation: String,
    pub split_brain: bool,
    pub fenced: Option<String>,
    pub replicating: bool,
    /// Seconds since the peer's last `Hello` for this volume, while the link is up.
    pub last_hello_age_s: Option<u64>,
    /// The epoch the peer's last `Hello` gave for the volume (0: none yet).
    #[serde(default)]
    pub peer_epoch: u64,
}

pub struct RoleMachine {
    /// The epoch of the peer's last `Hello` for the volume.
    peer_epoch: u64,
    /// The newest entry of the peer's last `Hello` for the volume.
    peer_top: Option<EpochEntry>,
    /// Entries of the other site that a resolved split brain set aside:
    /// a peer whose history ends in one is behind (being resynced), not
    /// a new split brain.
    superseded: Vec<EpochEntry>,
    /// Set while an operator's role change runs (a promotion): the peer's
    /// writes are refused from the moment it begins.
    held: Option<String>,
    role: Role,
    history: History,
    fenced: Option<String>,
    split_brain: bool,
    relation: Option<Relation>,
    behind: Option<History>,
    last_hello: Option<Instant>,
    link_up: bool,
    out: VecDeque<Command>,
}

impl RoleMachine {
    /// A volume as loaded from its durable record: `fenced` and `split_brain`
    /// are durable states the machine starts in.
    pub fn new(role: Role, history: History, fenced: Option<String>, split_brain: bool) -> Self {
        let mut m = RoleMachine {
            peer_epoch: 0,
            peer_top: None,
            superseded: Vec::new(),
            held: None,
            role,
            history,
            fenced,
            split_brain,
            relation: None,
            behind: None,
            last_hello: None,
            link_up: false,
            out: VecDeque::new(),
        };
        match (&m.role, &m.fenced) {
            (Role::Primary, None) => m.out.push_back(Command::OpenGate),
            (Role::Primary, Some(r)) => m.out.push_back(Command::CloseGate { reason: r.clone() }),
            (Role::Replica, _) => m.out.push_back(Command::CloseGate {
                reason: "the volume is a replica at this site".into(),
            }),
        }
        m
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn split_brain(&self) -> bool {
        self.split_brain
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::PeerHello(peer) => self.on_hello(peer, now),
            Input::LinkDown => {
                self.link_up = false;
                self.relation = None;
            }
            Input::Demote { reason } => {
                if self.fenced.is_none() {
                    self.fenced = Some(reason.clone());
                    self.out.push_back(Command::CloseGate { reason });
                }
            }
        }
    }

    /// The next command to carry out.
    pub fn poll(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    fn pause(&mut self, reason: String) {
        self.out.push_back(Command::Pause { reason });
    }

    fn on_hello(&mut self, peer: Option<PeerVolume>, now: Instant) {
        self.link_up = true;
        self.last_hello = Some(now);
        let Some(peer) = peer else {
            // The peer does not know the volume (yet): a primary creates its
            // replica with its first pass or stream; nothing to decide.
            self.relation = Some(Relation::PeerEmpty);
            if self.role == Role::Primary && !self.split_brain {
                self.out.push_back(Command::Replicate);
            }
            return;
        };
        self.peer_epoch = peer.history.epoch();
        self.peer_top = peer.history.top().cloned();
        let rel = self.history.relation(&peer.history);
        let rel = if rel.is_split()
            && peer
                .history
                .top()
                .is_some_and(|t| self.superseded.contains(t))
        {
            // The loser of a resolved split brain, not yet resynced.
            Relation::LocalAhead
        } else {
            rel
        };
        self.relation = Some(rel.clone());
        if self.split_brain {
            // Recorded split brain stays until an operator resolves it.
            self.pause("split brain: resolve it with `ferry resolve`".into());
            return;
        }
        if rel.is_split() || (rel == Relation::InStep && peer.role == self.role) {
            self.split_brain = true;
            let local = self.history.top().cloned();
            let peer_top = peer.history.top().cloned();
            self.out.push_back(Command::SplitBrain {
                local,
                peer: peer_top,
            });
            self.pause("split brain: the sites' histories forked".into());
            return;
        }
        match (self.role, rel) {
            (Role::Primary, Relation::LocalAhead) if peer.role == Role::Primary => {
                // An old primary that has not learnt of this site's epoch: it
                // fences itself on this Hello and waits to be resynced
                // (failback); nothing streams to it as it is.
                self.pause(format!(
                    "the peer is an old primary of this volume (epoch {}); it fences itself",
                    peer.history.epoch()
                ));
            }
            (Role::Primary, Relation::InStep | Relation::LocalAhead | Relation::PeerEmpty) => {
                self.out.push_back(Command::Replicate)
            }
            (Role::Replica, Relation::LocalEmpty) if peer.role == Role::Primary => {
                self.history = peer.history.clone();
                self.out.push_back(Command::AdoptHistory(peer.history));
                self.relation = Some(Relation::InStep);
                self.out.push_back(Command::Replicate);
            }
            (Role::Replica, Relation::InStep) => self.out.push_back(Command::Replicate),
            (_, Relation::LocalBehind) => {
                // The peer holds a higher epoch: stop taking writes at once,
                // keep what was written since the fork, resync from the peer.
                let reason = format!(
                    "site {} holds epoch {} of this volume (this site has {})",
                    peer.history.top().map(|e| e.site.as_str()).unwrap_or("?"),
                    peer.history.epoch(),
                    self.history.epoch()
                );
                if self.role == Role::Primary {
                    self.fenced = Some(reason.clone());
                    self.out.push_back(Command::CloseGate {
                        reason: reason.clone(),
                    });
                }
                self.pause(reason);
                let since = self
                    .history
                    .0
                    .iter()
                    .rev()
                    .find(|e| peer.history.0.contains(e))
                    .cloned();
                self.out.push_back(Command::KeepDivergent { since });
                self.behind = Some(peer.history.clone());
                self.out.push_back(Command::ResyncFrom {
                    ahead: peer.history,
                });
            }
            (Role::Replica, Relation::LocalAhead) => {
                // An old primary that has not learnt of the promotion yet.
                self.pause(format!(
                    "the peer's history for this volume is behind this site's (epoch {})",
                    self.history.epoch()
                ));
            }
            (_, rel) => self.pause(format!("no replication: peer relation {rel:?}")),
        }
    }

    /// Whether a promotion holds the peer's writes.
    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// This site, a primary cut off from its peer, asserted that it stays
    /// primary (`failover --force` there): its history grows by `e`.
    pub fn assert_local(&mut self, e: EpochEntry) {
        self.history.push(e);
    }

    /// Entries a resolved split brain set aside (see `superseded`).
    pub fn set_superseded(&mut self, entries: Vec<EpochEntry>) {
        self.superseded = entries;
    }

    /// The newest entry of the peer's last `Hello`.
    pub fn peer_top(&self) -> Option<EpochEntry> {
        self.peer_top.clone()
    }

    /// A planned switchover that did not happen: the fence it set goes.
    pub fn unfence(&mut self) {
        if self.role == Role::Primary && self.fenced.take().is_some() {
            self.out.push_back(Command::OpenGate);
        }
    }

    /// Refuses the peer's writes from now on (a promotion begins), or
    /// admits them again (`None`: the promotion was refused part way).
    pub fn hold_peer_writes(&mut self, why: Option<String>) {
        self.held = why;
    }

    /// May the peer write this volume here (a replica's passes and records)?
    pub fn admit_peer_write(&self) -> Result<(), Refusal> {
        if self.role != Role::Replica {
            return Err(Refusal::NotReplica);
        }
        if let Some(why) = &self.held {
            return Err(Refusal::Fenced(why.clone()));
        }
        if self.split_brain {
            return Err(Refusal::SplitBrain);
        }
        if self.behind.is_some() {
            return Err(Refusal::Behind);
        }
        match &self.relation {
            Some(Relation::LocalAhead) => Err(Refusal::StaleEpoch {
                local: self.history.epoch(),
            }),
            Some(r) if r.is_split() => Err(Refusal::SplitBrain),
            Some(Relation::LocalBehind) => Err(Refusal::Behind),
            _ => Ok(()),
        }
    }

    /// May local clients write (the export of a primary)?
    pub fn admit_local_write(&self) -> Result<(), Refusal> {
        if self.role != Role::Primary {
            return Err(Refusal::NotPrimary);
        }
        match &self.fenced {
            Some(r) => Err(Refusal::Fenced(r.clone())),
            None => Ok(()),
        }
    }

    /// A new replica created by its primary's first request takes its history.
    pub fn adopt(&mut self, history: History) -> Result<(), Refusal> {
        match self.history.relation(&history) {
            Relation::LocalEmpty => {
                self.history = history;
                self.relation = Some(Relation::InStep);
                Ok(())
            }
            Relation::InStep => {
                self.relation = Some(Relation::InStep);
                Ok(())
            }
            Relation::LocalAhead => Err(Refusal::StaleEpoch {
                local: self.history.epoch(),
            }),
            Relation::LocalBehind => Err(Refusal::Behind),
            _ => {
                self.split_brain = true;
                self.out.push_back(Command::SplitBrain {
                    local: self.history.top().cloned(),
                    peer: history.top().cloned(),
                });
                Err(Refusal::SplitBrain)
            }
        }
    }

    pub fn view(&self, now: Instant) -> RoleView {
        let peer_relation = match (&self.relation, self.split_brain, &self.behind) {
            (_, true, _) => "split brain",
            (_, _, Some(_)) => "behind",
            (None, ..) => "unknown",
            (Some(Relation::InStep), ..) => "in step",
            (Some(Relation::LocalAhead), ..) => "peer behind",
            (Some(Relation::LocalBehind), ..) => "behind",
            (Some(Relation::PeerEmpty), ..) => "new replica",
            (Some(Relation::LocalEmpty | Relation::BothEmpty), ..) => "unknown",
            (Some(_), ..) => "split brain",
        };
        let replicating = !self.split_brain
            && self.behind.is_none()
            && matches!(
                (&self.role, &self.relation),
                (
                    Role::Primary,
                    Some(Relation::InStep | Relation::LocalAhead | Relation::PeerEmpty)
                ) | (Role::Replica, Some(Relation::InStep))
            );
        RoleView {
            epoch: self.history.epoch(),
            peer_relation: peer_relation.into(),
            split_brain: self.split_brain,
            fenced: self.fenced.clone(),
            replicating,
            last_hello_age_s: self
                .last_hello
                .filter(|_| self.link_up)
                .map(|t| now.saturating_duration_since(t).as_secs()),
            peer_epoch: self.peer_epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::epoch::{Fork, Gen};
    use crate::hash::Hash;
    use std::time::Duration;

    fn drain(m: &mut RoleMachine) -> Vec<Command> {
        std::iter::from_fn(|| m.poll()).collect()
    }

    fn entry(epoch: u64, site: &str, generation: u128) -> EpochEntry {
        EpochEntry {
            epoch,
            site: site.into(),
            generation: Gen(generation),
            fork: (epoch > 1).then_some(Fork {
                epoch: epoch - 1,
                seq: 10,
                checksum: 1,
                root: Hash::ZERO,
            }),
        }
    }

    #[test]
    fn a_primary_opens_its_gate_and_replicates_to_a_peer_in_step() {
        let h = History(vec![entry(1, "a", 1)]);
        let t0 = Instant::now();
        let mut m = RoleMachine::new(Role::Primary, h.clone(), None, false);
        assert_eq!(drain(&mut m), vec![Command::OpenGate]);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Replica,
                history: h,
            })),
            t0,
        );
        assert_eq!(drain(&mut m), vec![Command::Replicate]);
        assert!(m.admit_local_write().is_ok());
        assert_eq!(m.admit_peer_write(), Err(Refusal::NotReplica));
        let v = m.view(t0 + Duration::from_secs(5));
        assert_eq!(v.peer_relation, "in step");
        assert_eq!(v.last_hello_age_s, Some(5));
        m.handle(Input::LinkDown, t0 + Duration::from_secs(6));
        assert_eq!(m.view(t0 + Duration::from_secs(7)).last_hello_age_s, None);
    }

    #[test]
    fn a_new_replica_adopts_its_primarys_history() {
        let t0 = Instant::now();
        let mut m = RoleMachine::new(Role::Replica, History::default(), None, false);
        assert!(matches!(drain(&mut m)[..], [Command::CloseGate { .. }]));
        let h = History(vec![entry(1, "a", 1)]);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: h.clone(),
            })),
            t0,
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::AdoptHistory(h.clone()), Command::Replicate]
        );
        assert_eq!(m.history(), &h);
        assert!(m.admit_peer_write().is_ok());
        assert!(m.admit_local_write().is_err());
    }

    #[test]
    fn a_primary_that_learns_of_a_higher_epoch_fences_itself_at_once() {
        let old = History(vec![entry(1, "a", 1)]);
        let mut newer = old.clone();
        newer.push(entry(2, "b", 2));
        let mut m = RoleMachine::new(Role::Primary, old.clone(), None, false);
        drain(&mut m);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: newer.clone(),
            })),
            Instant::now(),
        );
        let out = drain(&mut m);
        assert!(matches!(&out[0], Command::CloseGate { reason } if reason.contains("epoch 2")));
        assert!(matches!(out[1], Command::Pause { .. }));
        assert_eq!(
            out[2],
            Command::KeepDivergent {
                since: Some(entry(1, "a", 1))
            }
        );
        assert_eq!(out[3], Command::ResyncFrom { ahead: newer });
        assert!(matches!(m.admit_local_write(), Err(Refusal::Fenced(_))));
        assert_eq!(m.view(Instant::now()).peer_relation, "behind");
    }

    #[test]
    fn forked_histories_are_split_brain_and_stop_replication_but_not_service() {
        let base = History(vec![entry(1, "a", 1)]);
        let mut mine = base.clone();
        mine.push(entry(2, "a", 7));
        let mut theirs = base.clone();
        theirs.push(entry(2, "b", 8));
        let mut m = RoleMachine::new(Role::Primary, mine, None, false);
        drain(&mut m);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: theirs,
            })),
            Instant::now(),
        );
        let out = drain(&mut m);
        assert!(matches!(out[0], Command::SplitBrain { .. }));
        assert!(matches!(out[1], Command::Pause { .. }));
        assert!(m.split_brain());
        // Each side keeps serving as it was: the gate stays open.
        assert!(m.admit_local_write().is_ok());
        // And a reconnect does not clear it.
        m.handle(Input::LinkDown, Instant::now());
        m.handle(Input::PeerHello(None), Instant::now());
        assert!(m.split_brain());
        assert!(!m.view(Instant::now()).replicating);
    }

    #[test]
    fn an_old_primary_cannot_write_into_a_promoted_replica() {
        let old = History(vec![entry(1, "a", 1)]);
        let mut newer = old.clone();
        newer.push(entry(2, "b", 2));
        // At b, which was promoted: the peer a still says epoch 1.
        let mut m = RoleMachine::new(Role::Replica, newer, None, false);
        drain(&mut m);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: old.clone(),
            })),
            Instant::now(),
        );
        assert!(matches!(drain(&mut m)[..], [Command::Pause { .. }]));
        assert_eq!(m.admit_peer_write(), Err(Refusal::StaleEpoch { local: 2 }));
        assert_eq!(m.adopt(old), Err(Refusal::StaleEpoch { local: 2 }));
    }

    #[test]
    fn a_promoted_site_does_not_stream_to_the_old_primary_that_is_behind() {
        let old = History(vec![entry(1, "a", 1)]);
        let mut newer = old.clone();
        newer.push(entry(2, "b", 2));
        let mut m = RoleMachine::new(Role::Primary, newer, None, false);
        drain(&mut m);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: old.clone(),
            })),
            Instant::now(),
        );
        assert!(matches!(drain(&mut m)[..], [Command::Pause { .. }]));
        assert!(m.admit_local_write().is_ok(), "it stays primary");
        // Once the old primary has become its replica, streaming resumes.
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Replica,
                history: old,
            })),
            Instant::now(),
        );
        assert_eq!(drain(&mut m), vec![Command::Replicate]);
    }

    #[test]
    fn demote_fences_durably_and_only_once() {
        let mut m = RoleMachine::new(Role::Primary, History::first("a"), None, false);
        drain(&mut m);
        m.handle(
            Input::Demote {
                reason: "operator".into(),
            },
            Instant::now(),
        );
        m.handle(
            Input::Demote {
                reason: "again".into(),
            },
            Instant::now(),
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::CloseGate {
                reason: "operator".into()
            }]
        );
        // Restarted fenced: the gate stays closed.
        let mut m = RoleMachine::new(
            Role::Primary,
            History::first("a"),
            Some("operator".into()),
            false,
        );
        assert!(matches!(drain(&mut m)[..], [Command::CloseGate { .. }]));
    }

    #[test]
    fn a_recreated_volume_under_an_old_name_is_refused_as_split_brain() {
        let mut m = RoleMachine::new(Role::Replica, History::first("a"), None, false);
        drain(&mut m);
        assert_eq!(m.adopt(History::first("a")), Err(Refusal::SplitBrain));
        assert!(matches!(drain(&mut m)[..], [Command::SplitBrain { .. }]));
    }

    #[test]
    fn the_loser_of_a_resolved_split_brain_is_behind_not_forked_again() {
        let base = History(vec![entry(1, "a", 1)]);
        let mut loser = base.clone();
        loser.push(entry(2, "a", 7));
        let mut winner = base.clone();
        winner.push(entry(2, "b", 8));
        winner.push(entry(3, "b", 9));
        let mut m = RoleMachine::new(Role::Primary, winner, None, false);
        m.set_superseded(vec![entry(2, "a", 7)]);
        drain(&mut m);
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: loser.clone(),
            })),
            Instant::now(),
        );
        assert!(matches!(drain(&mut m)[..], [Command::Pause { .. }]));
        assert!(!m.split_brain());
        // Any other fork still is one.
        let mut other = base;
        other.push(entry(2, "a", 5));
        m.handle(
            Input::PeerHello(Some(PeerVolume {
                role: Role::Primary,
                history: other,
            })),
            Instant::now(),
        );
        assert!(m.split_brain());
    }
}
