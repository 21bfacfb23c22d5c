//! `hikkoshi verify` finds every kind of difference, down to the key, and passes an identical pair.

use crate::common::scenario::*;
use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn verify_passes_a_clone_and_names_every_kind_of_difference() {
    let Sides { pair, tgt, .. } = Pair::new(15, 18).source(FIXTURE_APP).await;
    assert_success(&pair.hikkoshi(&["clone", "--chunk-size", "1MB"]));
    let out = pair.hikkoshi(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 different"),
        "{}",
        text(&out)
    );

    // a row changed on the target, one missing, one extra, a duplicate lost in a table without key,
    // a sequence behind
    tgt.batch_execute(
        "UPDATE app.events SET amount = 999 WHERE id = 42;
         DELETE FROM app.events WHERE id = 43;
         INSERT INTO app.events (id, kind, occurred_at) VALUES (99999999, 'view', now());
         DELETE FROM app.audit_log WHERE ctid = (SELECT ctid FROM app.audit_log a
             WHERE (SELECT count(*) FROM app.audit_log b WHERE b::text = a::text) > 1 LIMIT 1);
         SELECT setval('app.invoice_no', 1001);",
    )
    .await
    .unwrap();
    let out = pair.hikkoshi(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = |name: &str| {
        v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {v}"))
    };
    let events = table("app.events");
    assert_eq!(events["matched"], false);
    assert_eq!(events["changed"], serde_json::json!(["(42)"]), "{events}");
    assert_eq!(
        events["missing_on_target"],
        serde_json::json!(["(43)"]),
        "{events}"
    );
    assert_eq!(
        events["extra_on_target"],
        serde_json::json!(["(99999999)"]),
        "{events}"
    );
    assert!(
        events["ranges"].as_u64().unwrap() > 1,
        "located within key ranges: {events}"
    );
    let audit = table("app.audit_log");
    assert_eq!(audit["matched"], false);
    assert_eq!(
        audit["missing_on_target"].as_array().unwrap().len(),
        1,
        "{audit}"
    );
    assert_eq!(table("app.orders")["matched"], true);
    let seq = v["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["sequence"] == "app.invoice_no")
        .cloned()
        .unwrap();
    assert_eq!(seq["ok"], false, "{seq}");
}
