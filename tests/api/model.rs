//! Model-based test: random sequences of writes go to the service and to an in-memory
//! reference model; after every step every Check and GetAuthorization must agree.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rolecheck::pb;
use tonic::Code;

use crate::helpers::{Backend, TestApp, spawn};

const USERS: [&str; 3] = ["u0", "u1", "u2"];
const TENANTS: [&str; 3] = ["", "t0", "t1"];
const ROLES: [&str; 3] = ["r0", "r1", "r2"];
const APP: &str = "app";

#[derive(Clone, Debug)]
enum Op {
    CreateTenant(usize),
    DeleteTenant(usize),
    Grant(usize, usize, Vec<usize>),
    Revoke(usize, usize, Vec<usize>),
    SetRoles(usize, usize, Vec<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    let roles = || proptest::collection::vec(0..ROLES.len(), 0..4);
    prop_oneof![
        1 => (0..TENANTS.len()).prop_map(Op::CreateTenant),
        1 => (0..TENANTS.len()).prop_map(Op::DeleteTenant),
        4 => (0..USERS.len(), 0..TENANTS.len(), roles()).prop_map(|(u, t, r)| Op::Grant(u, t, r)),
        3 => (0..USERS.len(), 0..TENANTS.len(), roles()).prop_map(|(u, t, r)| Op::Revoke(u, t, r)),
        2 => (0..USERS.len(), 0..TENANTS.len(), roles()).prop_map(|(u, t, r)| Op::SetRoles(u, t, r)),
    ]
}

/// The reference: which tenants exist and who holds what where.
#[derive(Default)]
struct Model {
    tenants: BTreeSet<String>,
    roles: BTreeMap<(String, String), BTreeSet<String>>,
}

fn tenant_key(t: usize) -> String {
    if TENANTS[t].is_empty() { APP.to_owned() } else { TENANTS[t].to_owned() }
}

fn names(idx: &[usize]) -> Vec<String> {
    idx.iter().map(|&i| ROLES[i].to_owned()).collect()
}

impl Model {
    /// Applies `op`; returns the status code the service must answer with.
    fn apply(&mut self, op: &Op) -> Code {
        match op {
            Op::CreateTenant(t) => {
                if self.tenants.insert(tenant_key(*t)) {
                    Code::Ok
                } else {
                    Code::AlreadyExists
                }
            }
            Op::DeleteTenant(t) => {
                let key = tenant_key(*t);
                if key == APP {
                    Code::FailedPrecondition
                } else if self.tenants.remove(&key) {
                    self.roles.retain(|(tenant, _), _| *tenant != key);
                    Code::Ok
                } else {
                    Code::NotFound
                }
            }
            Op::Grant(u, t, r) | Op::Revoke(u, t, r) | Op::SetRoles(u, t, r) => {
                if matches!(op, Op::Grant(..)) && r.is_empty() {
                    return Code::InvalidArgument;
                }
                let key = tenant_key(*t);
                if !self.tenants.contains(&key) {
                    // A Revoke in a missing tenant changes nothing and succeeds.
                    return if matches!(op, Op::Revoke(..)) { Code::Ok } else { Code::NotFound };
                }
                let held = self.roles.entry((key, USERS[*u].to_owned())).or_default();
                match op {
                    Op::Grant(..) => held.extend(names(r)),
                    Op::Revoke(..) if r.is_empty() => held.clear(),
                    Op::Revoke(..) => names(r).iter().for_each(|role| {
                        held.remove(role);
                    }),
                    _ => *held = names(r).into_iter().collect(),
                }
                Code::Ok
            }
        }
    }

    fn authorization(&self, user: &str) -> BTreeMap<String, Vec<String>> {
        self.roles
            .iter()
            .filter(|((_, u), roles)| u == user && !roles.is_empty())
            .map(|((t, _), roles)| (t.clone(), roles.iter().cloned().collect()))
            .collect()
    }
}

async fn send(app: &TestApp, op: &Op) -> Code {
    let mut checks = app.checks.clone();
    let mut tenants = app.tenants.clone();
    let result = match op {
        Op::CreateTenant(t) => tenants
            .create_tenant(pb::CreateTenantRequest { tenant_id: tenant_key(*t), name: "n".into() })
            .await
            .map(|_| ()),
        Op::DeleteTenant(t) => tenants
            .delete_tenant(pb::DeleteTenantRequest { tenant_id: tenant_key(*t) })
            .await
            .map(|_| ()),
        Op::Grant(u, t, r) => checks
            .grant(pb::GrantRequest {
                user_id: USERS[*u].into(),
                tenant_id: TENANTS[*t].into(),
                roles: names(r),
                expires_at: None,
            })
            .await
            .map(|_| ()),
        Op::Revoke(u, t, r) => checks
            .revoke(pb::RevokeRequest {
                user_id: USERS[*u].into(),
                tenant_id: TENANTS[*t].into(),
                roles: names(r),
            })
            .await
            .map(|_| ()),
        Op::SetRoles(u, t, r) => checks
            .set_roles(pb::SetRolesRequest {
                user_id: USERS[*u].into(),
                tenant_id: TENANTS[*t].into(),
                roles: names(r),
                expires_at: None,
            })
            .await
            .map(|_| ()),
    };
    result.map_or_else(|status| status.code(), |()| Code::Ok)
}

async fn run(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let app = spawn(backend).await;
    let mut model = Model::default();
    model.tenants.insert(APP.to_owned());
    for (step, op) in ops.iter().enumerate() {
        let expected = model.apply(op);
        prop_assert_eq!(send(&app, op).await, expected, "step {}: {:?}", step, op);
        for user in USERS {
            let want = model.authorization(user);
            prop_assert_eq!(&app.authorization(user).await, &want, "step {}: {:?}", step, op);
            for (t, tenant) in TENANTS.iter().enumerate() {
                for role in ROLES {
                    let held =
                        want.get(&tenant_key(t)).is_some_and(|r| r.iter().any(|x| x == role));
                    prop_assert_eq!(
                        app.check(user, tenant, role).await,
                        held,
                        "step {}: Check({}, {}, {}) after {:?}",
                        step,
                        user,
                        tenant_key(t),
                        role,
                        op
                    );
                }
            }
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() }
}

fn run_blocking(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(backend, ops))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sqlite_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_blocking(Backend::Sqlite, ops)?;
    }

    #[test]
    fn postgres_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_blocking(Backend::Postgres, ops)?;
    }
}
