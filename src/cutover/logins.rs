//! Before the fence, after `refuse_early`: every role that logs in on the old primary must log in on the
//! new one (DESIGN invariant 8). The roles are those the clone plans (owners, grantees, their members:
//! `roles::read`), read again now. What changed on the source since the clone is carried (see
//! `roles::recheck`), roles new since then are created as the clone would; then each LOGIN role is judged
//! (`roles::can_log_in`, which `check` uses too). A role that cannot log in refuses the cutover, whether
//! the clone created it or it was there before, with the fix; `--allow-nologin-roles` passes it with a
//! warning. Nothing of this runs in the write pause, and nothing here needs undoing: a carried change
//! is what the source has.

use super::decide::Way;
use super::steps::Switch;
use crate::error::{Error, Side};
use crate::roles::{self, OnTarget, SourceRoles, Verdict, Verifier};
use crate::state;

impl Switch<'_> {
    /// The roles again: changes carried, then every LOGIN role of the source judged on the new primary.
    pub(super) async fn logins(&mut self, resumed_fence: bool) -> Result<(), Error> {
        if self.way != Way::Cutover || resumed_fence {
            return Ok(());
        }
        let old = &self.old.client;
        let version = roles::major(old, Side::Source).await?;
        let source = roles::read(old, version).await?;
        let renamed = state::roles::renamed(&self.ctl).await;
        let on_target = |n: &str| {
            renamed
                .iter()
                .find(|(s, _)| s == n)
                .map_or(n.to_string(), |(_, t)| t.clone())
        };
        let names: Vec<String> = source.roles.iter().map(|r| on_target(&r.name)).collect();
        let carried_roles = state::roles::owners_kept(&self.ctl).await;
        if carried_roles {
            self.create_new_roles(&source, &names).await?;
            self.carry_changes(&source, &names, &renamed).await?;
        }
        let records = state::roles::records(&self.ctl)
            .await
            .map_err(Error::sql(Side::Target, "reading the carried roles"))?;
        let new = &self.new.client;
        let target = roles::target_roles(new, &names).await?;
        let auth = roles::target_auth(new).await?;
        let mut refused = Vec::new();
        for r in source.roles.iter().filter(|r| r.login) {
            let n = on_target(&r.name);
            let record = records.iter().find(|x| x.name == n);
            let t = target.get(&n).map(|t| OnTarget {
                name: n.clone(),
                login: t.login,
                expired: t.expired,
                // where the target hides verifiers: what this migration put there, if it did
                verifier: match (t.verifier, record) {
                    (Verifier::Unknown, Some(x)) if x.password_given => Verifier::Scram,
                    (Verifier::Unknown, Some(x)) if x.created => Verifier::of(&r.password),
                    (v, _) => v,
                },
                member_of: t.member_of.clone(),
            });
            if t.is_none() && !carried_roles {
                self.report.warnings.push(format!(
                    "role {n} logs in on the source and does not exist on the target (the clone did not \
                     carry roles): create it there if the application logs in as it"
                ));
                continue;
            }
            match roles::can_log_in(Verifier::of(&r.password), t.as_ref(), &auth) {
                Verdict::LogsIn => {}
                Verdict::Doubt(why) => {
                    let w = format!("role {n} may not log in on the target: {why}");
                    tracing::warn!("{w}");
                    self.report.warnings.push(w);
                }
                Verdict::Refused(why) => refused.push(format!("role {n}: {why}")),
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        if self.opts.allow_nologin_roles {
            for why in refused {
                self.report.warnings.push(format!(
                    "cannot log in on the new primary (--allow-nologin-roles): {why}"
                ));
            }
            return Ok(());
        }
        Err(Error::Blocked(format!(
            "role(s) that log in on the source cannot log in on the target: the application would be \
             locked out after the switch. Nothing was fenced.\n- {}\nFix each, then run the cutover again \
             (or cut over with --allow-nologin-roles)",
            refused.join("\n- ")
        )))
    }

    /// Roles the source's objects need that the target lacks (granted or given since the clone): created
    /// as the clone creates them.
    async fn create_new_roles(
        &mut self,
        source: &SourceRoles,
        names: &[String],
    ) -> Result<(), Error> {
        let new = &self.new.client;
        let side = roles::target_side(new).await?;
        let missing = SourceRoles {
            roles: source
                .roles
                .iter()
                .zip(names)
                .filter(|(_, n)| !side.existing.contains_key(*n))
                .map(|(r, _)| r.clone())
                .collect(),
            memberships: Vec::new(),
            database_grants: Vec::new(),
        };
        if missing.roles.is_empty() || !(side.superuser || side.createrole) {
            // (the judgement names each missing LOGIN role)
            return Ok(());
        }
        let mut missing = missing;
        missing.database_grants = source
            .database_grants
            .iter()
            .filter(|g| missing.roles.iter().any(|r| r.name == g.grantee))
            .cloned()
            .collect();
        let plan = roles::plan(&missing, &side, &[]);
        roles::carry(new, &plan).await?;
        self.report.warnings.extend(plan.notices.iter().cloned());
        state::roles::record(&self.ctl, &plan.created, &plan.cannot_log_in)
            .await
            .map_err(Error::sql(Side::Target, "recording the carried roles"))?;
        let sources: Vec<(String, Option<i64>, bool)> = missing
            .roles
            .iter()
            .map(|r| (r.name.clone(), r.row_version, false))
            .collect();
        state::roles::record_sources(&self.ctl, &sources)
            .await
            .map_err(Error::sql(Side::Target, "recording the carried roles"))?;
        for name in &plan.created {
            self.report.roles_carried.push(format!(
                "{name}: created (new on the source since the clone)"
            ));
        }
        Ok(())
    }

    /// What changed on the source since the clone, carried to the target.
    async fn carry_changes(
        &mut self,
        source: &SourceRoles,
        names: &[String],
        renamed: &[(String, String)],
    ) -> Result<(), Error> {
        let new = &self.new.client;
        let records = state::roles::records(&self.ctl)
            .await
            .map_err(Error::sql(Side::Target, "reading the carried roles"))?;
        let target = roles::target_roles(new, names).await?;
        let version = roles::major(new, Side::Target).await?;
        let changes = roles::since_clone(source, &target, &records, renamed, version);
        let mut versions: Vec<(String, i64)> = Vec::new();
        for c in &changes {
            if let Some(v) = c.source_version
                && !versions.iter().any(|(n, _)| n == &c.role)
            {
                versions.push((c.role.clone(), v));
            }
            if c.sql.is_empty() || same_verifier(new, &c.role, c.verifier.as_deref()).await {
                continue;
            }
            new.batch_execute(&c.sql).await.map_err(Error::sql(
                Side::Target,
                format!("carrying role {}: {}", c.role, c.what),
            ))?;
            tracing::info!("role {}: {} carried from the source", c.role, c.what);
            self.report
                .roles_carried
                .push(format!("{}: {}", c.role, c.what));
        }
        for (name, v) in versions {
            state::roles::carried(&self.ctl, &name, v)
                .await
                .map_err(Error::sql(Side::Target, "recording the carried roles"))?;
        }
        Ok(())
    }
}

/// Whether the target has this verifier already (false where it may not read `pg_authid`): then setting
/// it again carries nothing. The verifier is a query parameter, never part of a message.
async fn same_verifier(
    target: &tokio_postgres::Client,
    role: &str,
    verifier: Option<&str>,
) -> bool {
    let Some(v) = verifier else {
        return false;
    };
    target
        .query_one(
            "SELECT coalesce((SELECT rolpassword = $2 FROM pg_authid WHERE rolname = $1), false)",
            &[&role, &v],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}
