//! The roles the clone carried: `hikkoshi.roles` on the target, which the cutover reads to carry what
//! changed on the source since (see `roles::recheck`).

use tokio_postgres::Client;

use crate::roles::Record;

/// Records what the roles step did: the roles it created, and the LOGIN roles that cannot log in.
pub async fn record(
    client: &Client,
    created: &[String],
    cannot_log_in: &[String],
) -> Result<(), tokio_postgres::Error> {
    for name in created {
        client
            .execute(
                "INSERT INTO hikkoshi.roles (name, created, can_log_in) VALUES ($1, true, true)
                 ON CONFLICT (name) DO NOTHING",
                &[name],
            )
            .await?;
    }
    for name in cannot_log_in {
        client
            .execute(
                "INSERT INTO hikkoshi.roles (name, created, can_log_in) VALUES ($1, true, false)
                 ON CONFLICT (name) DO UPDATE SET can_log_in = false",
                &[name],
            )
            .await?;
    }
    Ok(())
}

/// A role can log in now (a password was given).
pub async fn logs_in(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.roles SET can_log_in = true, password_given = true WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(())
}

/// Records, for the roles the clone created, the version of their source row it carried, and whether
/// `--role-password` gave their password (never the verifier: see `roles::recheck`).
pub async fn record_sources(
    client: &Client,
    rows: &[(String, Option<i64>, bool)],
) -> Result<(), tokio_postgres::Error> {
    for (name, version, given) in rows {
        client
            .execute(
                "UPDATE hikkoshi.roles SET source_version = $2, password_given = password_given OR $3
                 WHERE name = $1",
                &[name, version, given],
            )
            .await?;
    }
    Ok(())
}

/// The cutover carried a role's changes: the source row version it carried.
pub async fn carried(
    client: &Client,
    name: &str,
    version: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.roles SET source_version = $2 WHERE name = $1",
            &[&name, &version],
        )
        .await?;
    Ok(())
}

/// What the state says of each carried role.
pub async fn records(client: &Client) -> Result<Vec<Record>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT name, created, source_version, password_given FROM hikkoshi.roles ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| Record {
            name: r.get(0),
            created: r.get(1),
            source_version: r.get(2),
            password_given: r.get(3),
        })
        .collect())
}

/// The roles the clone created (for `clean` to name).
pub async fn created(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT name FROM hikkoshi.roles WHERE created ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Records whether the restore kept the source's owners and grants.
pub async fn set_owners_kept(client: &Client, kept: bool) -> Result<(), tokio_postgres::Error> {
    client
        .execute("UPDATE hikkoshi.migration SET owners_kept = $1", &[&kept])
        .await?;
    Ok(())
}

/// Whether the migration on this target kept the source's owners and grants (false when unknown).
pub async fn owners_kept(client: &Client) -> bool {
    client
        .query_one(
            "SELECT to_regclass('hikkoshi.migration') IS NOT NULL
                    AND coalesce((SELECT bool_or(owners_kept) FROM hikkoshi.migration), false)",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

/// The roles `--role-map` renamed (source name, target name), as the clone recorded them.
pub async fn renamed(client: &Client) -> Vec<(String, String)> {
    let Ok(Some(m)) = super::load(client).await else {
        return Vec::new();
    };
    m.options
        .get("role_map")
        .and_then(|v| v.as_array())
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| {
                    Some((
                        p.get(0)?.as_str()?.to_string(),
                        p.get(1)?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A role renamed by `--role-map`: its record follows it.
pub async fn rename(client: &Client, old: &str, new: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.roles SET name = $2 WHERE name = $1",
            &[&old, &new],
        )
        .await?;
    Ok(())
}
