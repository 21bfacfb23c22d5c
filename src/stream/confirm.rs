//! Which source position the stream may confirm (the slot's `confirmed_flush`, and our `synced_lsn`).
//!
//! Two facts from the walsender (walsender.c, logical.c, snapbuild.c in PostgreSQL 15–18):
//! - a keepalive carries the walsender's sent position. While it replays a transaction whose commit record
//!   it has read, that position is at most the start of the commit record, never past it (it moves to the
//!   end of a record only once the record is fully processed, and everything the record produced was
//!   written to the connection before);
//! - on restart, the walsender skips only the transactions whose commit record starts before
//!   `confirmed_flush` (`SnapBuildXactNeedsSkip` on the commit's start).
//!
//! So a keepalive position K may be confirmed as soon as every commit received before K is applied and
//! flushed on the target: a transaction whose commit was not received yet commits at or after K and is
//! sent again after a restart. No timing is involved: an idle source's position is confirmed at its first
//! keepalive, and a busy one's as soon as the target's flush passes what came before it. Besides keepalive
//! positions, the end of every durably applied commit may be confirmed.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Keepalive positions waiting for the commits received before them, at most this many (beyond it the
/// newest entry absorbs the next: it is confirmed later, never too early).
const MAX_WAITING: usize = 1024;

/// The confirm rule, fed with what the stream receives and what the target has flushed.
#[derive(Debug, Default)]
pub struct Confirm {
    /// The end of the last source commit received.
    last_commit: Lsn,
    /// Keepalive positions, each with the last commit received before it, oldest first.
    waiting: VecDeque<(Lsn, Lsn)>,
    /// What may be confirmed so far; never goes back.
    confirmed: Lsn,
}

impl Confirm {
    /// Starts from what the target has applied already.
    pub fn new(applied: Lsn) -> Confirm {
        Confirm {
            last_commit: applied,
            waiting: VecDeque::new(),
            confirmed: applied,
        }
    }

    /// A source commit ending at `end` was received (applied or skipped, it is before every later keepalive).
    pub fn commit_received(&mut self, end: Lsn) {
        self.last_commit = self.last_commit.max(end);
    }

    /// A keepalive with the walsender's position `k` was received.
    pub fn keepalive(&mut self, k: Lsn) {
        let need = self.last_commit;
        let full = self.waiting.len() >= MAX_WAITING;
        match self.waiting.back_mut() {
            Some(back) if back.1 == need || full => {
                back.0 = back.0.max(k);
                back.1 = back.1.max(need);
            }
            _ => self.waiting.push_back((k, need)),
        }
    }

    /// The target has applied and flushed every source transaction that ends at or before `durable`:
    /// returns the position that may be confirmed now.
    pub fn confirmable(&mut self, durable: Lsn) -> Lsn {
        self.confirmed = self.confirmed.max(durable);
        while let Some(&(k, need)) = self.waiting.front() {
            if need > durable {
                break;
            }
            self.confirmed = self.confirmed.max(k);
            self.waiting.pop_front();
        }
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> Lsn {
        Lsn(n)
    }

    #[test]
    fn an_idle_source_is_confirmed_at_its_first_keepalive() {
        let mut c = Confirm::new(lsn(100));
        c.keepalive(lsn(5000));
        assert_eq!(c.confirmable(lsn(100)), lsn(5000));
    }

    #[test]
    fn a_keepalive_waits_for_the_commits_received_before_it() {
        let mut c = Confirm::new(lsn(100));
        c.commit_received(lsn(200));
        c.keepalive(lsn(300));
        // the commit ending at 200 is not flushed yet: only what is durable
        assert_eq!(c.confirmable(lsn(150)), lsn(150));
        assert_eq!(c.confirmable(lsn(200)), lsn(300));
    }

    #[test]
    fn a_transaction_in_progress_does_not_hold_back_the_keepalive_before_its_commit() {
        // Begin and changes received, its commit (at or after the keepalive) not yet
        let mut c = Confirm::new(lsn(100));
        c.keepalive(lsn(400));
        assert_eq!(c.confirmable(lsn(100)), lsn(400));
        c.commit_received(lsn(480));
        c.keepalive(lsn(480));
        assert_eq!(c.confirmable(lsn(100)), lsn(400));
        assert_eq!(c.confirmable(lsn(480)), lsn(480));
    }

    #[test]
    fn confirmed_never_goes_back_and_durable_commits_count() {
        let mut c = Confirm::new(lsn(100));
        c.commit_received(lsn(900));
        assert_eq!(c.confirmable(lsn(900)), lsn(900));
        assert_eq!(c.confirmable(lsn(500)), lsn(900));
        c.keepalive(lsn(800)); // an older keepalive position changes nothing
        assert_eq!(c.confirmable(lsn(900)), lsn(900));
    }

    #[test]
    fn several_keepalives_are_confirmed_in_order_as_the_target_flushes() {
        let mut c = Confirm::new(lsn(0));
        for (commit, k) in [(10, 15), (20, 25), (30, 35)] {
            c.commit_received(lsn(commit));
            c.keepalive(lsn(k));
        }
        assert_eq!(c.confirmable(lsn(20)), lsn(25));
        assert_eq!(c.confirmable(lsn(30)), lsn(35));
    }

    #[test]
    fn a_full_queue_confirms_later_never_earlier() {
        let mut c = Confirm::new(lsn(0));
        for i in 1..=(MAX_WAITING as u64 + 10) {
            c.commit_received(lsn(i * 10));
            c.keepalive(lsn(i * 10 + 5));
        }
        assert!(c.waiting.len() <= MAX_WAITING);
        // nothing past a commit that is not durable
        let at = c.confirmable(lsn(5000));
        assert!(at <= lsn(5005), "{at}");
        let last = MAX_WAITING as u64 + 10;
        assert_eq!(c.confirmable(lsn(last * 10)), lsn(last * 10 + 5));
    }
}
