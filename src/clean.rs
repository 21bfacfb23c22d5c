//! `hikkoshi clean`: removes what hikkoshi made for a migration — its slots and publications on the source,
//! the `hikkoshi` state schema on the target. The copied tables stay. Running it twice is harmless.

use crate::error::{Error, Side};
use crate::session;
use crate::state;

/// What was removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Cleaned {
    pub slots: Vec<String>,
    pub publications: Vec<String>,
    pub state_schema: bool,
}

pub async fn run(source_url: &str, target_url: &str) -> Result<Cleaned, Error> {
    let src_info = session::resolve(Side::Source, source_url)?;
    let tgt_info = session::resolve(Side::Target, target_url)?;
    let source = session::connect(&src_info, Side::Source).await?;
    let target = session::connect(&tgt_info, Side::Target).await?;
    let mut cleaned = Cleaned::default();
    let Some(m) = state::load(&target)
        .await
        .map_err(Error::sql(Side::Target, "reading hikkoshi state"))?
    else {
        return Ok(cleaned);
    };
    if !state::try_lock(&target)
        .await
        .map_err(Error::sql(Side::Target, "taking the migration lock"))?
    {
        return Err(Error::Blocked(
            "a hikkoshi process is working on this migration: stop it before cleaning".into(),
        ));
    }
    // the slot and publication of a following clone are hikkoshi_<id>; temporary ones add _<pid>
    let prefix = format!("^hikkoshi_{}(_[0-9]+)?$", m.id);
    let slots = source
        .query(
            "SELECT slot_name::text, pg_drop_replication_slot(slot_name) IS NULL
             FROM pg_replication_slots WHERE slot_name ~ $1 AND NOT active",
            &[&prefix],
        )
        .await
        .map_err(Error::sql(Side::Source, "dropping replication slots"))?;
    cleaned.slots = slots.iter().map(|r| r.get(0)).collect();
    let pubs = source
        .query(
            "SELECT pubname::text FROM pg_publication WHERE pubname ~ $1",
            &[&prefix],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing publications"))?;
    for p in &pubs {
        let name: String = p.get(0);
        source
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                crate::ident::quote_ident(&name)
            ))
            .await
            .map_err(Error::sql(Side::Source, "dropping a publication"))?;
        cleaned.publications.push(name);
    }
    target
        .batch_execute("DROP SCHEMA IF EXISTS hikkoshi CASCADE")
        .await
        .map_err(Error::sql(Side::Target, "dropping the hikkoshi schema"))?;
    cleaned.state_schema = true;
    Ok(cleaned)
}
