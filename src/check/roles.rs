//! The "roles" section: which roles `clone` will create on the target, which attributes it cannot give,
//! which passwords it cannot carry, and which LOGIN roles could not log in there (the cutover's own
//! judgement, `roles::can_log_in`, so that check and cutover agree; see `roles`).

use tokio_postgres::Client;

use super::{Level, Report};
use crate::error::{Error, Side};
use crate::roles;

pub(super) async fn roles(
    r: &mut Report,
    source: &Client,
    target: &Client,
    source_major: u32,
) -> Result<(), Error> {
    let source_roles = roles::read(source, source_major).await?;
    let target_side = roles::target_side(target).await?;
    let plan = roles::plan(&source_roles, &target_side, &[]);
    if plan.created.is_empty() {
        r.add(
            Level::Ok,
            "roles",
            Some(Side::Target),
            format!(
                "every role that owns or is granted the objects ({}) exists on the target",
                source_roles.roles.len()
            ),
            None,
        );
    } else if !target_side.superuser && !target_side.createrole {
        r.add(
            Level::Warning,
            "roles",
            Some(Side::Target),
            format!(
                "roles {} do not exist on the target, and {} may not create them: objects will belong to \
                 {} and no grant is copied",
                plan.created.join(", "),
                target_side.admin,
                target_side.admin
            ),
            Some(format!(
                "ALTER ROLE {} CREATEROLE; (the RDS master user has it), or create the roles first",
                crate::ident::quote_ident(&target_side.admin)
            )),
        );
        return Ok(());
    } else {
        let passwords = source_roles
            .roles
            .iter()
            .filter(|s| {
                plan.created.contains(&s.name)
                    && matches!(
                        s.password,
                        roles::Password::Scram(_) | roles::Password::Md5(_)
                    )
            })
            .count();
        r.add(
            Level::Ok,
            "roles",
            Some(Side::Target),
            format!(
                "clone creates role(s) {} on the target, with their memberships and settings, and keeps \
                 owners and grants; {passwords} password(s) carried",
                plan.created.join(", ")
            ),
            None,
        );
    }
    for n in &plan.notices {
        r.add(Level::Warning, "roles", Some(Side::Target), n.clone(), None);
    }
    // the cutover's own judgement, on the target as the clone will leave it
    for (name, verdict) in roles::judge(target, &source_roles, &plan, &[]).await? {
        let (what, fix) = match verdict {
            roles::Verdict::LogsIn => continue,
            roles::Verdict::Doubt(why) => {
                (format!("role {name} may not log in on the target"), why)
            }
            roles::Verdict::Refused(why) => (
                format!(
                    "role {name} logs in on the source but could not on the target: the cutover refuses                      until it can"
                ),
                why,
            ),
        };
        r.add(
            Level::Warning,
            "role logins",
            Some(Side::Target),
            what,
            Some(fix),
        );
    }
    if !plan.cannot_log_in.is_empty() {
        r.add(
            Level::Warning,
            "role passwords",
            Some(Side::Source),
            format!(
                "role(s) {} log in on the source, but this role may not read their passwords \
                 (pg_authid): they would be created NOLOGIN, and the cutover refuses until they can log in",
                plan.cannot_log_in.join(", ")
            ),
            Some(format!(
                "give each to clone: {}",
                plan.cannot_log_in
                    .iter()
                    .map(|n| format!("--role-password '{n}=env:VARIABLE'"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        );
    }
    Ok(())
}
