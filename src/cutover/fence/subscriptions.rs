//! Subscriptions into the old primary: a logical replication feed from another system writes there through
//! an apply worker, which runs as a replica session and fires no statement trigger (docs: "Logical
//! Replication", Architecture/Triggers), so the write fence cannot stop it (issue 23: 24 of 61 feed rows
//! landed on the old primary after the switch).
//!
//! The switch disables every enabled subscription of the database before the pause, records it in
//! `hikkoshi_fence.subscription`, and waits for its workers to end (their last transaction is then
//! committed, before the fence marker). Undone or rolled back, the fence enables them again; after a switch
//! they stay disabled and the report says how to move each to the new primary on the same slot, so that the
//! feed goes on where it stopped. A subscription the role may not alter (its owner or a superuser may)
//! refuses the switch before anything changes.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::SCHEMA;
use crate::error::{Error, Side};
use crate::ident::quote_ident;

/// A subscription in the old primary's database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub name: String,
    pub owner: String,
    pub enabled: bool,
    /// The role may `ALTER SUBSCRIPTION` it.
    pub may_alter: bool,
    pub slot: Option<String>,
    pub publications: Vec<String>,
    /// Where its feed stopped: the publisher's LSN of the last transaction it applied (its replication
    /// origin's `remote_lsn`), read once its workers have ended. A subscription moved to the new primary
    /// starts there: its slot's confirmed position may be behind it, and would send those rows again.
    pub stopped_at: Option<String>,
}

/// What `lift` does with the subscriptions the fence disabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtLift {
    /// The old primary stays the primary (undo, rollback): enable them again.
    Resume,
    /// The switch is done: leave them disabled (they belong on the new primary now).
    Leave,
}

/// The subscriptions of the connected database.
pub async fn list(client: &Client, side: Side) -> Result<Vec<Subscription>, Error> {
    Ok(client
        .query(
            "SELECT s.subname::text, pg_get_userbyid(s.subowner)::text, s.subenabled,
                    pg_has_role(s.subowner, 'USAGE')
                      OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    s.subslotname::text, s.subpublications::text[]
             FROM pg_subscription s
             WHERE s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(side, "listing the subscriptions"))?
        .iter()
        .map(|r| Subscription {
            name: r.get(0),
            owner: r.get(1),
            enabled: r.get(2),
            may_alter: r.get(3),
            slot: r.get(4),
            publications: r.get(5),
            stopped_at: None,
        })
        .collect())
}

/// The refusal when an enabled subscription cannot be disabled by the role.
pub fn refusal(subs: &[Subscription], user: &str) -> Option<super::Concern> {
    let stuck: Vec<&Subscription> = subs.iter().filter(|s| s.enabled && !s.may_alter).collect();
    if stuck.is_empty() {
        return None;
    }
    let names: Vec<String> = stuck
        .iter()
        .map(|s| format!("{} (owner {})", s.name, s.owner))
        .collect();
    Some(super::Concern {
        problem: format!(
            "subscription(s) {} write into this database as replica sessions, which no trigger can refuse, \
             and role {user} may not disable them: their rows would land on the old primary after the switch",
            names.join(", ")
        ),
        fix: format!(
            "Run the cutover as their owner or a superuser, or disable them yourself first (`ALTER \
             SUBSCRIPTION {} DISABLE`) and recreate them on the new primary after the switch",
            quote_ident(&stuck[0].name)
        ),
    })
}

/// Disables every enabled subscription (recording it, so that an undo enables it again) and waits until
/// their workers have ended, at most `wait`. Returns the subscriptions disabled.
pub async fn disable(
    client: &Client,
    side: Side,
    wait: Duration,
) -> Result<Vec<Subscription>, Error> {
    let enabled: Vec<Subscription> = list(client, side)
        .await?
        .into_iter()
        .filter(|s| s.enabled)
        .collect();
    for s in &enabled {
        client
            .batch_execute(&format!(
                "INSERT INTO {SCHEMA}.subscription (name) VALUES ({}) ON CONFLICT DO NOTHING;
                 ALTER SUBSCRIPTION {} DISABLE;",
                crate::ident::quote_literal(&s.name),
                quote_ident(&s.name)
            ))
            .await
            .map_err(Error::sql(
                side,
                format!("disabling the subscription {}", s.name),
            ))?;
    }
    let names: Vec<String> = enabled.iter().map(|s| s.name.clone()).collect();
    let until = Instant::now() + wait;
    loop {
        let running: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_subscription
                 WHERE subname = ANY($1) AND pid IS NOT NULL",
                &[&names],
            )
            .await
            .map_err(Error::sql(side, "waiting for the subscriptions' workers"))?
            .get(0);
        if running == 0 {
            let mut enabled = enabled;
            // readable by superusers and pg_read_all_stats members; the report says where to look otherwise
            if let Ok(rows) = client
                .query(
                    "SELECT s.subname::text, o.remote_lsn::text FROM pg_subscription s
                     JOIN pg_replication_origin_status o ON o.external_id = 'pg_' || s.oid::text
                     WHERE s.subname = ANY($1)",
                    &[&names],
                )
                .await
            {
                for r in rows {
                    let name: String = r.get(0);
                    if let Some(s) = enabled.iter_mut().find(|s| s.name == name) {
                        s.stopped_at = r.get(1);
                    }
                }
            }
            return Ok(enabled);
        }
        if Instant::now() > until {
            return Err(Error::Blocked(format!(
                "the workers of the subscription(s) {} on the {side} did not stop within {}s of `ALTER \
                 SUBSCRIPTION … DISABLE`. Nothing was fenced; the subscriptions are enabled again",
                names.join(", "),
                wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How to move a disabled subscription to the new primary, on the same slot and from where it stopped
/// (the slot's confirmed position may be behind what it applied: starting there would apply those rows
/// twice), so that the feed loses and doubles nothing.
pub fn how_to_move(s: &Subscription) -> String {
    let name = quote_ident(&s.name);
    let slot = s.slot.as_deref().unwrap_or(&s.name);
    let publications: Vec<String> = s.publications.iter().map(|p| quote_ident(p)).collect();
    let position = match &s.stopped_at {
        Some(lsn) => crate::ident::quote_literal(lsn),
        None => {
            "'<remote_lsn of pg_replication_origin_status for it on the old primary>'".to_string()
        }
    };
    format!(
        "subscription {} was disabled on the old primary. To move it to the new primary on its slot {slot}, \
         from where it stopped: on the new one `CREATE SUBSCRIPTION {name} CONNECTION '<its connection \
         string>' PUBLICATION {} WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = \
         false); SELECT pg_replication_origin_advance('pg_' || (SELECT oid FROM pg_subscription WHERE subname \
         = {}), {position}); ALTER SUBSCRIPTION {name} ENABLE`; on the old one, once `hikkoshi clean` has lifted \
         its fence, `ALTER SUBSCRIPTION {name} SET (slot_name = NONE); DROP SUBSCRIPTION {name}`",
        s.name,
        publications.join(", "),
        crate::ident::quote_literal(slot),
        crate::ident::quote_literal(&s.name),
    )
}

/// At `lift`: enables again the subscriptions the fence disabled (`Resume`), or says which stay disabled
/// (`Leave`). Returns warnings.
pub(super) async fn at_lift(client: &Client, side: Side, what: AtLift) -> Vec<String> {
    let recorded: Vec<String> = client
        .query(
            &format!(
                "SELECT name FROM {SCHEMA}.subscription
                 WHERE to_regclass('{SCHEMA}.subscription') IS NOT NULL ORDER BY 1"
            ),
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    let mut warnings = Vec::new();
    for name in &recorded {
        if what == AtLift::Leave {
            warnings.push(format!(
                "subscription {name} on the {side} stays disabled (the cutover disabled it): move it to the new \
                 primary, or `ALTER SUBSCRIPTION {} ENABLE`",
                quote_ident(name)
            ));
            continue;
        }
        if let Err(e) = client
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {} ENABLE; DELETE FROM {SCHEMA}.subscription WHERE name = {}",
                quote_ident(name),
                crate::ident::quote_literal(name)
            ))
            .await
        {
            warnings.push(format!(
                "the subscription {name} on the {side}, disabled by the cutover, could not be enabled again \
                 ({}): run `ALTER SUBSCRIPTION {} ENABLE`",
                crate::error::chain(&e),
                quote_ident(name)
            ));
        }
    }
    warnings
}
