//! What a `cutover` or `rollback` does, decided from what the target recorded: a pure function, so every
//! case is a unit test (a crash at any step must lead the next run to finish or undo it, never to walk
//! twice).

use crate::state::{self, Step};

/// Which way a switch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Way {
    Cutover,
    Rollback,
}

/// What a switch does, given what the target recorded.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Nothing to do, or nothing allowed: the reason, with what to do instead.
    Refuse(String),
    /// A rollback of a cutover that died after its fence: lift the fence, nothing else was done.
    UndoInterrupted,
    /// The whole walk.
    Walk,
    /// A run died after raising its fence: arm and raise again (both idempotent) and go on from there.
    Resume,
}

/// Decides from the recorded cutover step (and whether that cutover took `--reverse`) and the clone's phase.
pub(super) fn decide(way: Way, recorded: Option<(Step, bool)>, phase: state::Phase) -> Decision {
    let refuse = |why: &str| Decision::Refuse(why.to_string());
    match (way, recorded) {
        (Way::Cutover, Some((Step::Switched, _))) => refuse(
            "this migration was cut over already: the target is the primary. `hikkoshi rollback` switches \
             back (after a cutover with --reverse)",
        ),
        (Way::Cutover, Some((Step::RollingBack | Step::RolledBack, _))) => refuse(
            "this migration was rolled back: to migrate again, `hikkoshi clean` and clone again",
        ),
        (Way::Cutover, _) if phase != state::Phase::Done => Decision::Refuse(format!(
            "the clone is not complete (phase {}): keep `hikkoshi clone --follow` running until every \
             table is copied and streaming, then cut over",
            phase.as_str()
        )),
        (Way::Cutover, Some((Step::Fenced, _))) => Decision::Resume,
        (Way::Cutover, _) => Decision::Walk,
        (Way::Rollback, Some((Step::Fenced, _))) => Decision::UndoInterrupted,
        (Way::Rollback, Some((Step::Switched, true))) => Decision::Walk,
        (Way::Rollback, Some((Step::RollingBack, true))) => Decision::Resume,
        (Way::Rollback, Some((Step::Switched, false))) => refuse(
            "this cutover was made without --reverse: no stream kept the target's writes for the source, so \
             a rollback would lose them. Copy them back by hand, or clone the target into the source as a \
             new migration",
        ),
        (Way::Rollback, Some((Step::RolledBack, _))) => {
            refuse("this migration was rolled back already: the source is the primary")
        }
        (Way::Rollback, _) => {
            refuse("there is no cutover to roll back: the source is still the primary")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Phase;

    #[test]
    fn a_cutover_walks_resumes_or_refuses_by_the_recorded_step() {
        assert_eq!(decide(Way::Cutover, None, Phase::Done), Decision::Walk);
        assert_eq!(
            decide(Way::Cutover, Some((Step::Aborted, false)), Phase::Done),
            Decision::Walk
        );
        assert_eq!(
            decide(Way::Cutover, Some((Step::Fenced, false)), Phase::Done),
            Decision::Resume
        );
        for s in [Step::Switched, Step::RollingBack, Step::RolledBack] {
            assert!(matches!(
                decide(Way::Cutover, Some((s, true)), Phase::Done),
                Decision::Refuse(_)
            ));
        }
        let Decision::Refuse(why) = decide(Way::Cutover, None, Phase::Copy) else {
            panic!("an incomplete clone was cut over");
        };
        assert!(why.contains("not complete"), "{why}");
    }

    #[test]
    fn a_rollback_needs_a_reverse_stream_and_undoes_an_interrupted_cutover() {
        assert_eq!(
            decide(Way::Rollback, Some((Step::Fenced, false)), Phase::Done),
            Decision::UndoInterrupted
        );
        assert_eq!(
            decide(Way::Rollback, Some((Step::Switched, true)), Phase::Done),
            Decision::Walk
        );
        assert_eq!(
            decide(Way::Rollback, Some((Step::RollingBack, true)), Phase::Done),
            Decision::Resume
        );
        let Decision::Refuse(why) =
            decide(Way::Rollback, Some((Step::Switched, false)), Phase::Done)
        else {
            panic!("a rollback without a reverse stream went ahead");
        };
        assert!(why.contains("without --reverse"), "{why}");
        for r in [
            None,
            Some((Step::Aborted, false)),
            Some((Step::RolledBack, true)),
        ] {
            assert!(matches!(
                decide(Way::Rollback, r, Phase::Done),
                Decision::Refuse(_)
            ));
        }
    }
}
