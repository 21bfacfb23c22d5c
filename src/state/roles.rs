//! The roles the clone carried: `hikkoshi.roles` on the target. The cutover refuses while a LOGIN role of
//! the source cannot log in on the target (see `roles`).

use tokio_postgres::Client;

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
            "UPDATE hikkoshi.roles SET can_log_in = true WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(())
}

/// LOGIN roles of the source that still cannot log in on the target (NOLOGIN there).
pub async fn cannot_log_in(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    if !client
        .query_one("SELECT to_regclass('hikkoshi.roles') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0)
    {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT r.name FROM hikkoshi.roles r
             WHERE NOT r.can_log_in
               AND NOT coalesce((SELECT rolcanlogin FROM pg_roles WHERE rolname = r.name), false)
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
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
