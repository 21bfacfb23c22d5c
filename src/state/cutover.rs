//! The cutover's record: one row of `hikkoshi.cutover` on the migration's target. Only a `cutover` or
//! `rollback` writes it; followers, `clone --follow`, `status` and `/health` read it.

use std::fmt;

use tokio_postgres::Client;

use super::event;

/// A cutover's step, as recorded (the walk is in `cutover`'s module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Set by the cutover before it raises the fence: the source is fenced (or being fenced) and the
    /// target catches up. A run killed here is finished by `cutover`, undone by `rollback`.
    Fenced,
    /// Set by the undo before the point of no return: the source is the primary again.
    Aborted,
    /// Set at the cutover's point of no return: the target is the primary; the forward stream ends.
    Switched,
    /// Set by a rollback before it raises its fence on the target: the old source catches up.
    RollingBack,
    /// Set at the rollback's point of no return: the old source is the primary; the reverse stream ends.
    RolledBack,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Fenced => "fenced",
            Step::Aborted => "aborted",
            Step::Switched => "switched",
            Step::RollingBack => "rolling-back",
            Step::RolledBack => "rolled-back",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        [
            Step::Fenced,
            Step::Aborted,
            Step::Switched,
            Step::RollingBack,
            Step::RolledBack,
        ]
        .into_iter()
        .find(|step| step.as_str() == s)
    }

    /// Whether the other side is (or is becoming) the primary, for a stream that feeds `forward`'s
    /// target (forward: source → target) or the reverse stream: such a stream has nothing left to do.
    pub fn ends_stream(self, forward: bool) -> bool {
        if forward {
            matches!(self, Step::Switched | Step::RollingBack | Step::RolledBack)
        } else {
            self == Step::RolledBack
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The recorded cutover: its step and whether it keeps a reverse stream. A step this version does not
/// know (written by a newer hikkoshi) reads as `Fenced`: every caller then refuses or waits rather than
/// walk again.
pub async fn recorded(client: &Client) -> Result<Option<(Step, bool)>, tokio_postgres::Error> {
    if !client
        .query_one("SELECT to_regclass('hikkoshi.cutover') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0)
    {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT step, reverse FROM hikkoshi.cutover", &[])
        .await?
        .map(|r| {
            let step = Step::parse(r.get::<_, &str>(0)).unwrap_or(Step::Fenced);
            (step, r.get(1))
        }))
}

/// A cutover starts its pause: `Fenced`, with whether it sets up a reverse stream.
pub async fn record_fenced(client: &Client, reverse: bool) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO hikkoshi.cutover (step, reverse, started_at)
             VALUES ($1, $2, now())
             ON CONFLICT (one) DO UPDATE SET step = $1, reverse = $2,
                 started_at = now(), finished_at = NULL, message = NULL",
            &[&Step::Fenced.as_str(), &reverse],
        )
        .await?;
    Ok(())
}

/// A rollback starts its pause.
pub async fn record_rolling_back(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.cutover SET step = $1, message = NULL",
            &[&Step::RollingBack.as_str()],
        )
        .await?;
    Ok(())
}

/// Where the fence marker is, and what the fence did.
pub async fn record_fence(
    client: &Client,
    marker: &str,
    means: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.cutover SET fence_lsn = $1::text::pg_lsn, fence_means = $2, fenced_at = now()",
            &[&marker, &means],
        )
        .await?;
    Ok(())
}

/// The point of no return: the step is done, after a write pause of `pause_seconds`.
pub async fn record_done(
    client: &Client,
    step: Step,
    pause_seconds: f64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.cutover SET step = $1, finished_at = now(), pause_seconds = $2",
            &[&step.as_str(), &pause_seconds],
        )
        .await?;
    Ok(())
}

/// Sets the step with the reason (an undo), and logs it as an event.
pub async fn set_step(client: &Client, to: Step, why: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.cutover SET step = $1, message = $2",
            &[&to.as_str(), &why],
        )
        .await?;
    let _ = event(client, "cutover", why).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_reads_back_as_written() {
        for s in [
            Step::Fenced,
            Step::Aborted,
            Step::Switched,
            Step::RollingBack,
            Step::RolledBack,
        ] {
            assert_eq!(Step::parse(s.as_str()), Some(s));
        }
        assert_eq!(Step::parse("switched-over"), None);
    }

    #[test]
    fn a_switch_ends_the_forward_stream_and_only_a_finished_rollback_the_reverse_one() {
        assert!(Step::Switched.ends_stream(true));
        assert!(Step::RollingBack.ends_stream(true));
        assert!(!Step::Fenced.ends_stream(true));
        assert!(!Step::Switched.ends_stream(false));
        assert!(!Step::RollingBack.ends_stream(false));
        assert!(Step::RolledBack.ends_stream(false));
    }
}
