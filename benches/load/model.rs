//! The model: Check and CheckBatch by permission against the same by role, on one server
//! under the contract's example model, in rounds (`BENCH_MODEL_ROUNDS`, 2) whose order
//! flips each round (role first, then permission first), so a machine that slows or
//! speeds up over the run favours neither; after the same by role with no model at all.

use super::*;

/// The contract's example model.
pub(super) const MODEL: &str = r#"
[roles.viewer]
[roles.editor]
includes = ["viewer"]
[roles.admin]
includes = ["editor"]
[roles.billing]
[roles.support-agent]
in_every_tenant = ["viewer"]

[permissions]
"invoice.read" = ["viewer"]
"invoice.pay"  = ["admin", "billing"]
"#;

const SET_MODEL: &str = "/rolecheck.v1.RoleCheck/SetModel";

/// A hot user's check by permission: every hot user is a viewer, so may read invoices.
pub(super) fn permission_check(i: u64) -> pb::CheckRequest {
    pb::CheckRequest { permission: "invoice.read".into(), role: String::new(), ..hot_check(i) }
}

pub(super) fn batch(check: impl Fn(u64) -> pb::CheckRequest) -> Bytes {
    frame(&pb::CheckBatchRequest { checks: (0..100).map(check).collect(), min_revision: 0 })
}

/// Check and CheckBatch of 100 by role, then by permission, in alternating rounds.
pub(super) async fn model_phase(concurrency: usize, baseline: &Outcome) {
    let data = tempfile::tempdir().expect("dir");
    let server = spawn(rolecheck(data.path(), &[]));
    let conn = connect(&server.grpc).await;
    seed_small(&conn).await;
    setup_calls(&conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    let by_role = |name: &str| {
        Scenario::new(format!("Check by role, {name}"), CHECK, allowed, |i| frame(&hot_check(i)))
    };
    let batch_of = |name: &str, body: Bytes| {
        let mut scenario = Scenario::fixed(name, CHECK_BATCH, all_allowed, body);
        scenario.items = 100;
        scenario
    };
    let mut outcomes = vec![baseline.clone()];
    outcomes.push(load(&conn, server.pid, concurrency, by_role("no model")).await);
    let model = frame(&pb::SetModelRequest { model: MODEL.into() });
    setup_calls(&conn, 1, 1, SET_MODEL, move |_| model.clone()).await;
    setup_calls(&conn, 1000, concurrency, CHECK, |i| frame(&hot_check(i))).await;
    for round in 1..=env_or("BENCH_MODEL_ROUNDS", 2) {
        let checks = [
            by_role(&format!("under the model, round {round}")),
            Scenario::new(
                format!("Check by permission, under the model, round {round}"),
                CHECK,
                allowed,
                |i| frame(&permission_check(i)),
            ),
        ];
        let batches = [
            batch_of(&format!("CheckBatch of 100 roles, round {round}"), batch(hot_check)),
            batch_of(
                &format!("CheckBatch of 100 permissions, round {round}"),
                batch(permission_check),
            ),
        ];
        let mut scenarios: Vec<Scenario> = checks.into_iter().chain(batches).collect();
        if round % 2 == 0 {
            scenarios.swap(0, 1);
            scenarios.swap(2, 3);
        }
        for scenario in scenarios {
            outcomes.push(load(&conn, server.pid, concurrency, scenario).await);
        }
    }
    table("The model: by permission against by role (embedded store, cached)", baseline, &outcomes);
}
