//! Opening ordinary (non-replication) sessions on the source and the target.

use tokio_postgres::{Client, NoTls};

use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};

/// Parses and completes a connection string for one side.
pub fn resolve(side: Side, url: &str) -> Result<ConnInfo, Error> {
    ConnInfo::resolve(url).map_err(|source| Error::ConnInfo { side, source })
}

/// Opens a session; its connection task runs until the client is dropped.
pub async fn connect(info: &ConnInfo, side: Side) -> Result<Client, Error> {
    let config = info.to_driver_config("hikkoshi");
    let connecting = config.connect(NoTls);
    let (client, connection) = match tokio::time::timeout(info.connect_timeout(), connecting).await
    {
        Ok(r) => r.map_err(|source| Error::Connect {
            side,
            endpoint: info.to_string(),
            source,
        })?,
        Err(_) => {
            return Err(Error::ConnectTimeout {
                side,
                endpoint: info.to_string(),
                secs: info.connect_timeout().as_secs(),
            });
        }
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "session ended");
        }
    });
    Ok(client)
}
