//! hikkoshi moves a live PostgreSQL database to another server. The modules follow the pipeline in
//! DESIGN.md: `check` → `plan` → `schema` → `copy` → `stream` → `cutover`, with `state` kept in the target.
//!
//! A map for a newcomer (start with DESIGN.md, then `clone::run` and `cutover::cutover`):
//!
//! | stage | where | what to read first |
//! |---|---|---|
//! | preflight | `check/` (`versions`, `source`, `target`) | `check::evaluate`: every finding with its fix; `check::support` for version pairs |
//! | plan | `plan/` (`select`, `chunk`), `catalog` | `plan::resolve`: the selection against the catalog |
//! | schema | `schema/` (`script` for older targets) | pre-data before the rows, post-data after |
//! | copy | `clone/` (`phases`: one run phase by phase; `chunks`; `objects`), `copy` (the workers), `replication/` (`slot`: exported snapshots) | `clone::run`, the whole command |
//! | stream | `stream/`: `pgoutput/` (decode), `apply/` (`relation`, `statements`, `hold`, `pipeline`, `durability`) + `fold`, `follow` (plans, reconnects, watchdog), `session` (one streaming session, an event at a time), `confirm` (which position may be confirmed), `names` (every slot and publication name), `ddl/` (the DDL capture on the source and the splitting of its query strings; `apply/ddl` runs each command at its place) | `stream::follow::run` |
//! | verify | `verify`, `cutover/proof/` (the two-part proof around the fence) | `verify::compare` |
//! | cutover | `cutover/`: `decide` (what a run does), `steps` (one method per step, one undo), `servers`, `fence/` (writes, `ddl`, `pass`, `subscriptions`), `reverse`, `hook` | `cutover::cutover` |
//! | state | `state/` (the `hikkoshi` schema in the target: `copy`, `stream`, `cutover`, `lock`, `report`, `roles`, `ddl`), `status`, `monitor` | `state::DDL` |
//! | clean | `clean` | `clean::run` |
//! | around | `conninfo`, `session`, `tls` (connections), `error` (`Error::policy`: kind, exit code, retry, hint), `backoff`, `lsn`, `ident`, `sequence`, `large_objects` (in no stream: copied by clone, levelled by the cutover), `matviews` (refresh order, contents compared), `failpoint`, `localserver` (throwaway servers), `demo`, `rehearse/` | |
//!
//! Commands depend on `stream`, `state` and the modules around them, never on each other: `cutover` runs a
//! follower through `stream::follow`, not through `clone`.

pub mod backoff;
pub mod catalog;
pub mod check;
pub mod clean;
pub mod clone;
pub mod conninfo;
pub mod copy;
pub mod cutover;
pub mod demo;
pub mod error;
pub mod failpoint;
pub mod ident;
pub mod large_objects;
pub mod localserver;
pub mod lsn;
pub mod matviews;
pub mod monitor;
pub mod plan;
pub mod progress;
pub mod rehearse;
pub mod replication;
pub mod roles;
pub mod schema;
pub mod sequence;
pub mod session;
pub mod state;
pub mod status;
pub mod stream;
pub mod tls;
pub mod verify;

pub use error::{Error, Side};
