//! The wait between attempts after a transient failure, shared by the copy (which resumes by itself) and
//! the follower (which reconnects): 0.5 s, doubling up to 15 s. An attempt that ran 30 s or more had
//! recovered: the wait and the count start over.

use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(15);
const RECOVERED: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Backoff {
    wait: Duration,
    attempts: u32,
    /// Failed attempts in a row before giving up (None: never).
    limit: Option<u32>,
}

impl Backoff {
    pub fn new(limit: Option<u32>) -> Backoff {
        Backoff {
            wait: FIRST,
            attempts: 0,
            limit,
        }
    }

    /// After an attempt that started at `started` and failed: how long to wait before the next, or None
    /// when the attempts are used up.
    pub fn next(&mut self, started: Instant) -> Option<Duration> {
        self.after(started.elapsed())
    }

    fn after(&mut self, ran: Duration) -> Option<Duration> {
        if ran >= RECOVERED {
            (self.wait, self.attempts) = (FIRST, 0);
        }
        self.attempts += 1;
        if self.limit.is_some_and(|l| self.attempts > l) {
            return None;
        }
        let wait = self.wait;
        self.wait = (self.wait * 2).min(MAX);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_fifteen_seconds_then_give_up_at_the_limit() {
        let mut b = Backoff::new(Some(7));
        let waits: Vec<_> = (0..8).map(|_| b.after(Duration::ZERO)).collect();
        let secs: Vec<Option<f64>> = waits.iter().map(|w| w.map(|d| d.as_secs_f64())).collect();
        assert_eq!(
            secs,
            vec![
                Some(0.5),
                Some(1.0),
                Some(2.0),
                Some(4.0),
                Some(8.0),
                Some(15.0),
                Some(15.0),
                None
            ]
        );
    }

    #[test]
    fn an_attempt_that_ran_long_starts_the_count_over() {
        let mut b = Backoff::new(Some(2));
        assert!(b.after(Duration::ZERO).is_some());
        assert!(b.after(Duration::ZERO).is_some());
        assert_eq!(b.after(Duration::from_secs(31)), Some(FIRST));
        let mut unlimited = Backoff::new(None);
        assert!((0..100).all(|_| unlimited.after(Duration::ZERO).is_some()));
    }
}
