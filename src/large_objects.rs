//! Large objects: carried by `clone`, compared and brought level by the cutover, compared by `verify`.
//!
//! Logical decoding does not carry them (`lo_create`, `lo_put`, `lo_unlink` write `pg_largeobject`, a
//! catalog no publication can hold), so a row that points at a large object written during the follow
//! would point at nothing on the new primary (issue 23). Nor can a trigger refuse their writes. So the
//! switch compares them whole: each object's owner, grants and the MD5 of its contents on both servers,
//! copies what differs or is missing and removes what the old primary no longer has; once before the
//! fence (the bulk), once in the write pause (what changed since). The pause's share is a hash of every
//! object on both servers: the report gives its count and time.
//!
//! Reading an object's contents needs the SELECT right on it (or `lo_compat_privileges`, or a superuser);
//! where the role lacks it, the comparison says which objects and how to grant it. Contents move in chunks
//! of `CHUNK` bytes (`lo_get` with an offset, `lo_put`), so memory stays bounded whatever an object's size.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::quote_ident;
use crate::session;

/// Bytes read and written at a time.
const CHUNK: i32 = 1 << 20;

/// What a server holds of one large object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub owner: String,
    /// `grantee=PRIVILEGE` pairs, sorted, the owner's own left out.
    pub grants: Vec<String>,
    /// MD5 of the contents.
    pub md5: String,
}

/// Every large object of the connected database, by OID.
pub async fn inventory(client: &Client, side: Side) -> Result<BTreeMap<i64, Object>, Error> {
    let any: bool = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata)", &[])
        .await
        .map_err(Error::sql(side, "looking for large objects"))?
        .get(0);
    if !any {
        return Ok(BTreeMap::new());
    }
    let rows = client
        .query(
            "SELECT m.oid::int8, pg_get_userbyid(m.lomowner)::text,
                    coalesce((SELECT array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                    ELSE pg_get_userbyid(a.grantee)::text END
                                               || '=' || a.privilege_type ORDER BY 1)
                              FROM aclexplode(m.lomacl) a WHERE a.grantee <> m.lomowner), '{}'),
                    md5(lo_get(m.oid))
             FROM pg_largeobject_metadata m ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| {
            if e.code().is_some_and(|c| c.code() == "42501") {
                Error::Blocked(format!(
                    "the {side}'s role may not read every large object, so they cannot be compared or copied \
                     ({}). Grant it `GRANT SELECT ON LARGE OBJECT <oid> TO <role>` for each (as their \
                     owner), or run as a superuser",
                    crate::error::chain(&e)
                ))
            } else {
                Error::sql(side, "reading the large objects")(e)
            }
        })?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                Object {
                    owner: r.get(1),
                    grants: r.get(2),
                    md5: r.get(3),
                },
            )
        })
        .collect())
}

/// What the two inventories say must change on the new side: objects to copy (missing or different) and
/// objects to remove (gone from the old side). `renamed` maps the old side's role names to the new side's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub copy: Vec<i64>,
    pub remove: Vec<i64>,
}

/// Compares two inventories (pure).
pub fn plan(
    old: &BTreeMap<i64, Object>,
    new: &BTreeMap<i64, Object>,
    renamed: &[(String, String)],
) -> Plan {
    let map = |role: &str| -> String {
        renamed
            .iter()
            .find(|(o, _)| o == role)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| role.to_string())
    };
    let mapped = |o: &Object| Object {
        owner: map(&o.owner),
        grants: o
            .grants
            .iter()
            .map(|g| match g.split_once('=') {
                Some((who, what)) => format!("{}={what}", map(who)),
                None => g.clone(),
            })
            .collect(),
        md5: o.md5.clone(),
    };
    Plan {
        copy: old
            .iter()
            .filter(|(oid, o)| new.get(oid) != Some(&mapped(o)))
            .map(|(oid, _)| *oid)
            .collect(),
        remove: new
            .keys()
            .filter(|oid| !old.contains_key(oid))
            .copied()
            .collect(),
    }
}

/// What a `sync` did, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Synced {
    pub compared: usize,
    pub copied: usize,
    pub removed: usize,
    pub seconds: f64,
    /// Owners or grants that could not be set on the new side (the object is there, owned by the role that
    /// copied it).
    pub warnings: Vec<String>,
}

/// Brings the new side's large objects level with the old side's: compares, copies, removes.
pub async fn sync(
    (old, old_side): (&Client, Side),
    (new, new_side): (&Client, Side),
    renamed: &[(String, String)],
) -> Result<Synced, Error> {
    let started = Instant::now();
    let (a, b) =
        futures_util::future::join(inventory(old, old_side), inventory(new, new_side)).await;
    let (a, b) = (a?, b?);
    let p = plan(&a, &b, renamed);
    let mut done = Synced {
        compared: a.len().max(b.len()),
        ..Default::default()
    };
    done.removed = remove(new, new_side, &p.remove).await?;
    for oid in &p.copy {
        let object = &a[oid];
        copy_one((old, old_side), (new, new_side), *oid, b.contains_key(oid)).await?;
        done.warnings
            .extend(set_access(new, *oid, object, renamed).await);
        done.copied += 1;
    }
    done.seconds = started.elapsed().as_secs_f64();
    Ok(done)
}

/// The clone's copy: the source's large objects as of the copy's snapshot, `jobs` at a time (each worker a
/// source session in the snapshot and a target session); what the target has and the source had not is
/// removed. Comparing first makes a resume copy only what is missing or different.
pub async fn copy_in_snapshot(
    (src_info, tgt_info): (&ConnInfo, &ConnInfo),
    snapshot: &str,
    jobs: usize,
) -> Result<Synced, Error> {
    let started = Instant::now();
    let source = in_snapshot(src_info, snapshot).await?;
    let target = session::connect(tgt_info, Side::Target).await?;
    let (a, b) = futures_util::future::join(
        inventory(&source, Side::Source),
        inventory(&target, Side::Target),
    )
    .await;
    let (a, b) = (Arc::new(a?), Arc::new(b?));
    let p = plan(&a, &b, &[]);
    let mut done = Synced {
        compared: a.len().max(b.len()),
        copied: p.copy.len(),
        ..Default::default()
    };
    done.removed = remove(&target, Side::Target, &p.remove).await?;
    let workers = jobs.max(1).min(p.copy.len());
    let queue = Arc::new(std::sync::Mutex::new(p.copy));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (queue, a, b) = (queue.clone(), a.clone(), b.clone());
        let (src_info, tgt_info) = (src_info.clone(), tgt_info.clone());
        let snapshot = snapshot.to_string();
        set.spawn(async move {
            let source = in_snapshot(&src_info, &snapshot).await?;
            let target = session::connect(&tgt_info, Side::Target).await?;
            let mut warnings = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(oid) = next else { break };
                let exists = b.contains_key(&oid);
                copy_one(
                    (&source, Side::Source),
                    (&target, Side::Target),
                    oid,
                    exists,
                )
                .await?;
                warnings.extend(set_access(&target, oid, &a[&oid], &[]).await);
            }
            Ok::<Vec<String>, Error>(warnings)
        });
    }
    while let Some(r) = set.join_next().await {
        let warnings =
            r.map_err(|e| Error::Blocked(format!("a large-object copy task failed: {e}")))??;
        done.warnings.extend(warnings);
    }
    done.seconds = started.elapsed().as_secs_f64();
    Ok(done)
}

/// A source session whose transaction reads the exported snapshot.
async fn in_snapshot(src_info: &ConnInfo, snapshot: &str) -> Result<Client, Error> {
    let source = session::connect(src_info, Side::Source).await?;
    session::begin_in_snapshot(
        &source,
        Side::Source,
        snapshot,
        "importing the copy's snapshot",
    )
    .await?;
    Ok(source)
}

/// Removes from the new side the objects the old side does not have; returns how many.
async fn remove(new: &Client, new_side: Side, oids: &[i64]) -> Result<usize, Error> {
    for oid in oids {
        new.execute("SELECT lo_unlink($1::int8::oid)", &[oid])
            .await
            .map_err(Error::sql(new_side, format!("removing large object {oid}")))?;
    }
    Ok(oids.len())
}

/// Copies one object's contents, chunk by chunk, replacing the new side's (in one transaction there).
async fn copy_one(
    (old, old_side): (&Client, Side),
    (new, new_side): (&Client, Side),
    oid: i64,
    exists: bool,
) -> Result<(), Error> {
    let what = || format!("copying large object {oid}");
    new.batch_execute("BEGIN")
        .await
        .map_err(Error::sql(new_side, what()))?;
    let copied = async {
        if exists {
            new.execute("SELECT lo_unlink($1::int8::oid)", &[&oid])
                .await
                .map_err(Error::sql(new_side, what()))?;
        }
        new.execute("SELECT lo_from_bytea($1::int8::oid, ''::bytea)", &[&oid])
            .await
            .map_err(Error::sql(new_side, what()))?;
        let mut offset: i64 = 0;
        loop {
            let chunk: Vec<u8> = old
                .query_one(
                    "SELECT lo_get($1::int8::oid, $2, $3)",
                    &[&oid, &offset, &CHUNK],
                )
                .await
                .map_err(Error::sql(old_side, what()))?
                .get(0);
            if chunk.is_empty() {
                return Ok(());
            }
            new.execute(
                "SELECT lo_put($1::int8::oid, $2, $3)",
                &[&oid, &offset, &chunk],
            )
            .await
            .map_err(Error::sql(new_side, what()))?;
            offset += chunk.len() as i64;
        }
    }
    .await;
    match copied {
        Ok(()) => new
            .batch_execute("COMMIT")
            .await
            .map_err(Error::sql(new_side, what())),
        Err(e) => {
            let _ = new.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// The owner and grants of a copied object (through `--role-map`); what cannot be set is returned.
async fn set_access(
    new: &Client,
    oid: i64,
    object: &Object,
    renamed: &[(String, String)],
) -> Vec<String> {
    let map = |role: &str| -> String {
        renamed
            .iter()
            .find(|(o, _)| o == role)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| role.to_string())
    };
    let mut sql = vec![
        format!("REVOKE ALL ON LARGE OBJECT {oid} FROM PUBLIC"),
        format!(
            "ALTER LARGE OBJECT {oid} OWNER TO {}",
            quote_ident(&map(&object.owner))
        ),
    ];
    for g in &object.grants {
        if let Some((who, what)) = g.split_once('=') {
            let who = if who == "PUBLIC" {
                "PUBLIC".to_string()
            } else {
                quote_ident(&map(who))
            };
            sql.push(format!("GRANT {what} ON LARGE OBJECT {oid} TO {who}"));
        }
    }
    let mut warnings = Vec::new();
    for s in sql {
        if let Err(e) = new.batch_execute(&s).await {
            warnings.push(format!(
                "large object {oid}: `{s}` failed on the new side ({})",
                crate::error::chain(&e)
            ));
        }
    }
    warnings
}

/// The differences between two inventories, in words (for `verify`).
pub fn differences(
    old: &BTreeMap<i64, Object>,
    new: &BTreeMap<i64, Object>,
    renamed: &[(String, String)],
) -> Vec<String> {
    let p = plan(old, new, renamed);
    let mut out = Vec::new();
    for oid in &p.copy {
        out.push(match new.get(oid) {
            None => format!("large object {oid} is on the source only"),
            Some(n) if n.md5 != old[oid].md5 => format!("large object {oid} has other contents"),
            Some(_) => format!("large object {oid} has another owner or other grants"),
        });
    }
    for oid in &p.remove {
        out.push(format!("large object {oid} is on the target only"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(owner: &str, grants: &[&str], md5: &str) -> Object {
        Object {
            owner: owner.into(),
            grants: grants.iter().map(|g| g.to_string()).collect(),
            md5: md5.into(),
        }
    }

    #[test]
    fn missing_changed_and_regranted_objects_are_copied_and_gone_ones_removed() {
        let old = BTreeMap::from([
            (1, object("app", &[], "a")),
            (2, object("app", &[], "b")),
            (3, object("app", &["reader=SELECT"], "c")),
            (4, object("app", &[], "d")),
        ]);
        let new = BTreeMap::from([
            (1, object("app", &[], "a")),
            (2, object("app", &[], "x")),
            (3, object("app", &[], "c")),
            (9, object("app", &[], "z")),
        ]);
        assert_eq!(
            plan(&old, &new, &[]),
            Plan {
                copy: vec![2, 3, 4],
                remove: vec![9]
            }
        );
        let said = differences(&old, &new, &[]);
        assert_eq!(said.len(), 4, "{said:?}");
        assert!(said[0].contains("other contents"), "{said:?}");
    }

    #[test]
    fn renamed_roles_are_the_same_owner() {
        let old = BTreeMap::from([(1, object("app", &["app=UPDATE"], "a"))]);
        let new = BTreeMap::from([(1, object("app_new", &["app_new=UPDATE"], "a"))]);
        let renamed = [("app".to_string(), "app_new".to_string())];
        assert_eq!(plan(&old, &new, &renamed), Plan::default());
        assert_eq!(plan(&old, &new, &[]).copy, vec![1]);
    }
}
