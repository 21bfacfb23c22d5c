//! Sequence positions: logical replication and COPY move rows, never sequence values, so hikkoshi reads each
//! sequence on the source and sets it on the target (`setval`). Sequences are not transactional: the value
//! read is the latest one, which is at or past every row the copy saw.

use tokio_postgres::Client;

use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_literal};

/// A sequence's position: `last_value` and whether `nextval` already returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub name: QualifiedName,
    pub last_value: i64,
    pub is_called: bool,
}

/// Reads the positions of `names` on one server.
pub async fn read(
    client: &Client,
    side: Side,
    names: &[QualifiedName],
) -> Result<Vec<Position>, Error> {
    let mut out = Vec::with_capacity(names.len());
    for batch in names.chunks(200) {
        let sql = batch
            .iter()
            .enumerate()
            .map(|(i, n)| format!("SELECT {i}, last_value, is_called FROM {}", n.quoted()))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client
            .query(&sql, &[])
            .await
            .map_err(Error::sql(side, "reading sequence positions"))?;
        let mut got: Vec<(i32, i64, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        got.sort();
        for (i, last_value, is_called) in got {
            out.push(Position {
                name: batch[i as usize].clone(),
                last_value,
                is_called,
            });
        }
    }
    Ok(out)
}

/// The sequences among `names` that exist on `client`'s server.
pub async fn existing(
    client: &Client,
    side: Side,
    names: &[QualifiedName],
) -> Result<Vec<QualifiedName>, Error> {
    let quoted: Vec<String> = names.iter().map(QualifiedName::quoted).collect();
    let present: Vec<bool> = client
        .query(
            "SELECT to_regclass(n) IS NOT NULL FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i",
            &[&quoted],
        )
        .await
        .map_err(Error::sql(side, "looking for sequences"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(names
        .iter()
        .zip(present)
        .filter(|(_, p)| *p)
        .map(|(n, _)| n.clone())
        .collect())
}

/// The sequences whose position on `client`'s server is now past `read`, with their new positions.
pub async fn advanced(
    client: &Client,
    side: Side,
    read: &[Position],
) -> Result<Vec<Position>, Error> {
    let names: Vec<QualifiedName> = read.iter().map(|p| p.name.clone()).collect();
    let now = self::read(client, side, &names).await?;
    Ok(now
        .into_iter()
        .zip(read)
        .filter(|(n, r)| (n.last_value, n.is_called) > (r.last_value, r.is_called))
        .map(|(n, _)| n)
        .collect())
}

/// Sets every position on the target.
pub async fn apply(client: &Client, positions: &[Position]) -> Result<(), Error> {
    for batch in positions.chunks(200) {
        let sql = batch
            .iter()
            .map(|p| {
                format!(
                    "SELECT setval({}::regclass, {}, {})",
                    quote_literal(&p.name.quoted()),
                    p.last_value,
                    p.is_called
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        client
            .batch_execute(&sql)
            .await
            .map_err(Error::sql(Side::Target, "setting sequence positions"))?;
    }
    Ok(())
}
