//! How hikkoshi's own sessions pass a fence that refuses everyone else, by a means no other role can learn or
//! use (issue 23: a fixed setting, printed in the fence's error and readable in its function's body, let an
//! application role through).
//!
//! Each hikkoshi process draws a random secret when it starts and sets it in every session it opens
//! (`session::connect`; its `SET` shows in `pg_stat_activity` only to members of hikkoshi's role and of
//! pg_read_all_stats, and only until the session's next statement). A fence lets a
//! session through when the SHA-256 of its setting is in `hikkoshi_fence.pass`, a table only the fence's
//! owner may read or write (the fence's functions are `SECURITY DEFINER`): the process that raises a fence
//! registers its own secret, and so does the apply session of a reverse stream that writes into a fenced
//! old primary. Another session would need the secret itself; the table holds only its hash, and the
//! setting of another session cannot be read.

use std::sync::OnceLock;

use tokio_postgres::Client;

use super::SCHEMA;

/// The setting that carries the process's secret.
pub const SETTING: &str = "hikkoshi.fence_pass";

/// This process's secret: 128 random bits, in hex.
pub fn secret() -> &'static str {
    static SECRET: OnceLock<String> = OnceLock::new();
    SECRET.get_or_init(|| {
        use std::io::Read;
        let mut bytes = [0u8; 16];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if read.is_err() {
            // no urandom: the clock and the pid, hashed by std's randomly keyed hasher
            use std::hash::{BuildHasher, Hasher};
            for (i, chunk) in bytes.chunks_mut(8).enumerate() {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default(),
                );
                h.write_u32(std::process::id());
                h.write_usize(i);
                chunk.copy_from_slice(&h.finish().to_le_bytes());
            }
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// The SQL condition, inside a fence function, that the session carries a registered secret.
pub(super) fn passes_sql() -> String {
    format!(
        "EXISTS (SELECT 1 FROM {SCHEMA}.pass WHERE hash = sha256(convert_to(coalesce(current_setting('{SETTING}', \
         true), ''), 'UTF8')))"
    )
}

/// Registers this session's secret with the fence on its server, if there is one (the secret never travels
/// in the query: the server hashes the session's own setting). Idempotent.
pub async fn admit(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "DO $hikkoshi$ BEGIN
                 IF to_regclass('{SCHEMA}.pass') IS NOT NULL THEN
                     INSERT INTO {SCHEMA}.pass (hash)
                     VALUES (sha256(convert_to(current_setting('{SETTING}'), 'UTF8')))
                     ON CONFLICT DO NOTHING;
                 END IF;
             END $hikkoshi$"
        ))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_random_hex_and_stable_in_a_process() {
        let s = secret();
        assert_eq!(s.len(), 32);
        assert!(s.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(s, secret());
        assert_ne!(s, "0".repeat(32));
    }
}
