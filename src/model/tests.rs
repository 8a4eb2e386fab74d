//! The model's semantics against a naive reading of the contract's words, on random
//! models and random grants; and the refusals, each naming its place.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::{Model, ModelSpec, PermissionSpec, Problem, RoleSpec};

const APP: &str = "app";
const TENANTS: [&str; 4] = [APP, "t1", "t2", "t3"];
/// Granted in tests, never declared: held exactly as granted.
const UNDECLARED: &str = "x";

/// The contract's example.
const EXAMPLE: &str = r#"
[roles.viewer]
[roles.editor]
includes = ["viewer"]            # an editor is also a viewer
[roles.admin]
includes = ["editor"]
[roles.billing]
[roles.support-agent]            # held in the application tenant...
in_every_tenant = ["viewer"]     # ...acts as viewer in every tenant

[permissions]
"invoice.read" = ["viewer"]
"invoice.pay"  = ["admin", "billing"]
"#;

/// What each tenant's grants come to, read the naive way: apply the contract's three
/// rules until nothing changes.
fn naive(
    spec: &ModelSpec,
    grants: &BTreeMap<&str, BTreeSet<String>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut held: BTreeMap<String, BTreeSet<String>> = TENANTS
        .iter()
        .map(|t| (t.to_string(), grants.get(t).cloned().unwrap_or_default()))
        .collect();
    loop {
        let before = held.clone();
        for role in &spec.roles {
            for tenant in TENANTS {
                if held[tenant].contains(&role.name) {
                    let set = held.get_mut(tenant).expect("tenant");
                    set.extend(role.includes.iter().cloned());
                }
            }
            if held[APP].contains(&role.name) {
                for tenant in TENANTS {
                    let set = held.get_mut(tenant).expect("tenant");
                    set.extend(role.in_every_tenant.iter().cloned());
                }
            }
        }
        if held == before {
            return held;
        }
    }
}

/// A random model over `n` roles `r0..`: includes only towards lower numbers (no cycle),
/// `in_every_tenant` anywhere, and permissions over any roles.
fn acyclic_spec() -> impl Strategy<Value = ModelSpec> {
    (1usize..10).prop_flat_map(|n| {
        let roles = proptest::collection::vec(
            (proptest::collection::vec(0..n, 0..3), proptest::collection::vec(0..n, 0..2)),
            n,
        );
        let permissions = proptest::collection::vec(proptest::collection::vec(0..n, 0..3), 0..6);
        (roles, permissions, any::<bool>()).prop_map(move |(roles, permissions, strict)| {
            ModelSpec {
                strict,
                roles: roles
                    .into_iter()
                    .enumerate()
                    .map(|(i, (includes, every))| RoleSpec {
                        name: format!("r{i}"),
                        includes: includes
                            .into_iter()
                            .filter(|&j| j < i)
                            .map(|j| format!("r{j}"))
                            .collect(),
                        in_every_tenant: every.into_iter().map(|j| format!("r{j}")).collect(),
                        line: None,
                    })
                    .collect(),
                permissions: permissions
                    .into_iter()
                    .enumerate()
                    .map(|(p, roles)| PermissionSpec {
                        name: format!("p{p}.do"),
                        roles: roles.into_iter().map(|j| format!("r{j}")).collect(),
                        line: None,
                    })
                    .collect(),
            }
        })
    })
}

/// Random grants over the tenants, of the model's roles and the undeclared one.
fn grants(
    spec: &ModelSpec,
) -> impl Strategy<Value = BTreeMap<&'static str, BTreeSet<String>>> + use<> {
    let mut names: Vec<String> = spec.roles.iter().map(|role| role.name.clone()).collect();
    names.push(UNDECLARED.into());
    let per_tenant = proptest::sample::subsequence(names.clone(), 0..=names.len().min(3));
    proptest::collection::vec(per_tenant, TENANTS.len() - 1).prop_map(|sets| {
        TENANTS[..3]
            .iter()
            .copied()
            .zip(sets.into_iter().map(|set| set.into_iter().collect()))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every holds and has answer of the compiled model matches the naive reading, for
    /// every role (declared or not) and permission in every tenant (one with no grants).
    #[test]
    fn the_compiled_model_answers_as_the_rules_read(
        (spec, grants) in acyclic_spec().prop_flat_map(|spec| (Just(spec.clone()), grants(&spec)))
    ) {
        let model = Model::compile(spec.clone()).expect("an acyclic model compiles");
        let expected = naive(&spec, &grants);
        let none = BTreeSet::new();
        let granted = |tenant: &str| grants.get(tenant).unwrap_or(&none);
        let everywhere = model.everywhere(granted(APP).iter().map(String::as_str));
        for tenant in TENANTS {
            let held = model.held(granted(tenant).iter().map(String::as_str), &everywhere);
            let here = || granted(tenant).iter().map(String::as_str);
            let app = || granted(APP).iter().map(String::as_str);
            for role in spec.roles.iter().map(|r| r.name.as_str()).chain([UNDECLARED, "r99"]) {
                let holds = model.holds(&held, |r| granted(tenant).contains(r), role);
                prop_assert_eq!(holds, expected[tenant].contains(role), "{} in {}", role, tenant);
                let direct = model.holds_granted(here(), app(), role);
                let declared = model.declares(role);
                prop_assert_eq!(direct, declared.then_some(holds), "{} in {}, no set", role, tenant);
            }
            for permission in &spec.permissions {
                let has = permission.roles.iter().any(|r| expected[tenant].contains(r));
                prop_assert_eq!(model.has(&held, &permission.name), has, "{} in {}", &permission.name, tenant);
                prop_assert_eq!(model.has_granted(here(), app(), &permission.name), has, "{}, no set", &permission.name);
            }
            prop_assert!(!model.has(&held, "not.a.permission"));
            let (roles, permissions) = model.expand(&held);
            let declared: Vec<&str> = expected[tenant].iter().map(String::as_str).filter(|r| model.declares(r)).collect();
            prop_assert_eq!(roles, declared);
            prop_assert!(permissions.iter().all(|p| model.has(&held, p)));
        }
    }

    /// A model with a cycle of includes is refused, naming it; one without compiles.
    #[test]
    fn a_cycle_is_refused_and_only_a_cycle(
        edges in (1usize..8).prop_flat_map(|n| (Just(n), proptest::collection::vec((0..n, 0..n), 0..10)))
    ) {
        let (n, edges) = edges;
        let mut spec = ModelSpec::default();
        for i in 0..n {
            let includes = edges.iter().filter(|(from, _)| *from == i).map(|(_, to)| format!("r{to}")).collect();
            spec.roles.push(RoleSpec { name: format!("r{i}"), includes, ..RoleSpec::default() });
        }
        // Naively: some role reaches itself.
        let reaches_itself = (0..n).any(|start| {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<usize> = edges.iter().filter(|(f, _)| *f == start).map(|(_, t)| *t).collect();
            while let Some(role) = todo.pop() {
                if role == start { return true; }
                if seen.insert(role) {
                    todo.extend(edges.iter().filter(|(f, _)| *f == role).map(|(_, t)| *t));
                }
            }
            false
        });
        match Model::compile(spec) {
            Ok(_) => prop_assert!(!reaches_itself),
            Err(problems) => {
                prop_assert!(reaches_itself);
                prop_assert!(problems.iter().all(|p| p.message.starts_with("a cycle: ")), "{:?}", problems);
            }
        }
    }

    /// A model written out as TOML reads back the same.
    #[test]
    fn a_model_reads_back_as_written(spec in acyclic_spec()) {
        let text = spec.to_toml();
        let mut read = ModelSpec::from_toml(&text).expect("reads back");
        for role in &mut read.roles { role.line = None; }
        for permission in &mut read.permissions { permission.line = None; }
        prop_assert_eq!(read, spec, "{}", text);
    }
}

/// The contract's example, as the seed's user 1 would meet it: admin in one tenant,
/// billing in another, support-agent in the application tenant.
#[test]
fn the_example_of_the_contract() {
    let model = Model::compile(ModelSpec::from_toml(EXAMPLE).expect("parses")).expect("compiles");
    let everywhere = model.everywhere(["support-agent"]);
    let acme = model.held(["admin"], &everywhere);
    let globex = model.held(["billing"], &everywhere);
    let initech = model.held([], &everywhere);
    let holds = |held, role| model.holds(held, |_| false, role);
    assert!(holds(&acme, "admin") && holds(&acme, "editor") && holds(&acme, "viewer"));
    assert!(model.has(&acme, "invoice.pay") && model.has(&acme, "invoice.read"));
    assert!(!holds(&globex, "editor") && holds(&globex, "viewer"), "viewer from support-agent");
    assert!(model.has(&globex, "invoice.pay"));
    assert!(holds(&initech, "viewer") && !holds(&initech, "editor"));
    assert!(model.has(&initech, "invoice.read") && !model.has(&initech, "invoice.pay"));
    assert_eq!(
        model.expand(&acme),
        (vec!["admin", "editor", "viewer"], vec!["invoice.pay", "invoice.read"])
    );
    // Without support-agent, a tenant with no grants holds nothing.
    let nobody = model.held([], &model.everywhere([]));
    assert!(!holds(&nobody, "viewer") && !model.has(&nobody, "invoice.read"));
}

fn problems(text: &str) -> Vec<String> {
    let spec = match ModelSpec::from_toml(text) {
        Ok(spec) => spec,
        Err(problems) => return problems.iter().map(Problem::to_string).collect(),
    };
    match Model::compile(spec) {
        Ok(_) => panic!("compiled: {text}"),
        Err(problems) => problems.iter().map(Problem::to_string).collect(),
    }
}

/// Each refusal names every problem with its line and place.
#[test]
fn a_bad_model_is_refused_naming_each_problem() {
    let text = "[roles.a]\nincludes = [\"b\"]\n[roles.b]\nincludes = [\"a\"]\n";
    assert_eq!(problems(text), ["line 3, roles.b.includes: a cycle: a includes b includes a"]);
    let text =
        "[roles.a]\nincludes = [\"ghost\"]\n\n[permissions]\n\"invoice.pay\" = [\"nobody\"]\n";
    assert_eq!(
        problems(text),
        [
            "line 1, roles.a.includes: names the role \"ghost\", which the model does not declare",
            "line 5, permissions.\"invoice.pay\": names the role \"nobody\", which the model does not declare",
        ]
    );
    let text = "[roles.\"has space\"]\n[permissions]\n\"\" = []\n";
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("line 1, roles.\"has space\": role: must be 1-64"), "{found:?}");
    assert!(
        found[1].starts_with("line 3, permissions.\"\": permission: must be 1-64"),
        "{found:?}"
    );
    assert_eq!(problems("[roles.a]\nincludes = 3\n").len(), 1);
    assert!(problems("[role.a]\n")[0].starts_with("line 1, the file: unknown field `role`"));
    let many: String = (0..=super::MAX_ROLES).map(|i| format!("[roles.r{i}]\n")).collect();
    assert_eq!(problems(&many), ["roles: 1025 roles declared; at most 1024"]);
}

/// A chain as long as the limit compiles (no recursion to run out of stack), and its
/// top holds the bottom.
#[test]
fn a_chain_of_the_most_roles_compiles() {
    let roles = (0..super::MAX_ROLES)
        .map(|i| RoleSpec {
            name: format!("r{i}"),
            includes: if i > 0 { vec![format!("r{}", i - 1)] } else { vec![] },
            ..RoleSpec::default()
        })
        .collect();
    let model = Model::compile(ModelSpec { roles, ..ModelSpec::default() }).expect("compiles");
    let held = model.held(["r1023"], &model.everywhere([]));
    assert!(model.holds(&held, |_| false, "r0"));
}
