//! A checked model, compiled to bit sets over its declared roles.

use std::collections::HashMap;

use super::spec::{ModelSpec, Problem, permission_place, role_place};

/// A set of declared roles, one bit each in declaration order: what a user holds in one
/// tenant, a role's closure, or the roles a permission is granted by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held(Box<[u64]>);

impl Held {
    fn empty(words: usize) -> Self {
        Self(vec![0; words].into_boxed_slice())
    }

    fn insert(&mut self, role: usize) {
        self.0[role / 64] |= 1 << (role % 64);
    }

    /// Whether the declared role numbered `role` is in the set.
    pub fn contains(&self, role: usize) -> bool {
        self.0.get(role / 64).is_some_and(|word| word & (1 << (role % 64)) != 0)
    }

    fn union_with(&mut self, other: &Held) {
        for (word, more) in self.0.iter_mut().zip(other.0.iter()) {
            *word |= more;
        }
    }

    /// Whether the two sets share a role.
    pub fn intersects(&self, other: &Held) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    /// The roles in the set, by number.
    fn members(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(n, &word)| {
            (0..64).filter(move |bit| word & (1 << bit) != 0).map(move |bit| n * 64 + bit)
        })
    }
}

/// A model checked and compiled (see the module docs of [`super`]).
#[derive(Clone, Debug)]
pub struct Model {
    spec: ModelSpec,
    index: HashMap<Box<str>, usize>,
    /// Per role: itself and every role it includes, transitively.
    closure: Vec<Held>,
    /// Per role: what a holder of it in the application tenant holds in every tenant (the
    /// closures of its `in_every_tenant`).
    every: Vec<Held>,
    /// Per role: everything a holder of it in the application tenant holds in every
    /// tenant, through any chain of `in_every_tenant` and `includes` (the least fixed
    /// point from that one role; the one from several roles is the union of theirs, so a
    /// check needs no fixed point of its own).
    everywhere_from: Vec<Held>,
    permissions: HashMap<Box<str>, Held>,
}

impl Default for Model {
    /// No model: every role exact, no permission granted.
    fn default() -> Self {
        Self::compile(ModelSpec::default()).unwrap_or_else(|_| unreachable!("the empty model"))
    }
}

impl Model {
    /// Checks `spec` and compiles it; every problem at once, with its place, if any.
    pub fn compile(spec: ModelSpec) -> Result<Self, Vec<Problem>> {
        let problems = spec.name_problems();
        if !problems.is_empty() {
            return Err(problems);
        }
        let index: HashMap<Box<str>, usize> =
            spec.roles.iter().enumerate().map(|(n, role)| (role.name.as_str().into(), n)).collect();
        let problems = unknown_roles(&spec, &index);
        if !problems.is_empty() {
            return Err(problems);
        }
        let includes: Vec<Vec<usize>> = spec
            .roles
            .iter()
            .map(|role| role.includes.iter().map(|r| index[r.as_str()]).collect())
            .collect();
        let order = topological(&spec, &includes)?;
        let words = spec.roles.len().div_ceil(64).max(1);
        let mut closure = vec![Held::empty(words); spec.roles.len()];
        for role in order {
            let mut held = Held::empty(words);
            held.insert(role);
            for &included in &includes[role] {
                held.union_with(&closure[included]);
            }
            closure[role] = held;
        }
        let every = spec
            .roles
            .iter()
            .map(|role| {
                let mut held = Held::empty(words);
                for name in &role.in_every_tenant {
                    held.union_with(&closure[index[name.as_str()]]);
                }
                held
            })
            .collect();
        let permissions = spec
            .permissions
            .iter()
            .map(|permission| {
                let mut mask = Held::empty(words);
                for role in &permission.roles {
                    mask.insert(index[role.as_str()]);
                }
                (permission.name.as_str().into(), mask)
            })
            .collect();
        let mut compiled =
            Self { spec, index, closure, every, everywhere_from: Vec::new(), permissions };
        compiled.everywhere_from = (0..compiled.spec.roles.len())
            .map(|role| compiled.everywhere([compiled.spec.roles[role].name.as_str()]))
            .collect();
        Ok(compiled)
    }

    /// The model as written.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Whether the model declares nothing: every role exact, no permission granted.
    pub fn is_empty(&self) -> bool {
        self.spec.roles.is_empty() && self.spec.permissions.is_empty()
    }

    /// Whether a role the model does not declare is refused by Grant and SetRoles.
    pub fn strict(&self) -> bool {
        self.spec.strict
    }

    /// Whether `role` is declared.
    pub fn declares(&self, role: &str) -> bool {
        self.index.contains_key(role)
    }

    /// Whether `name` is a permission the model defines (AuthZEN reads an action name as
    /// a permission when it is one, else as a role).
    pub fn defines_permission(&self, name: &str) -> bool {
        self.permissions.contains_key(name)
    }

    /// Whether some role held in the application tenant is held in other tenants too
    /// (`in_every_tenant`): only then can a user hold a role in a tenant they are no
    /// member of.
    pub fn reaches_every_tenant(&self) -> bool {
        self.every.iter().any(|set| set.0.iter().any(|word| *word != 0))
    }

    /// The declared roles a user granted `app_granted` in the application tenant holds
    /// in every tenant (the application tenant included).
    pub fn everywhere<'a>(&self, app_granted: impl IntoIterator<Item = &'a str>) -> Held {
        let empty = Held::empty(self.words());
        // What they hold in the application tenant: the least set that holds the grants,
        // what each role includes, and what each role held there gives everywhere.
        let mut app = self.held(app_granted, &empty);
        loop {
            let mut next = app.clone();
            for role in app.members() {
                next.union_with(&self.every[role]);
            }
            if next == app {
                break;
            }
            app = next;
        }
        let mut everywhere = empty;
        for role in app.members() {
            everywhere.union_with(&self.every[role]);
        }
        everywhere
    }

    /// The declared roles held in a tenant where `granted` are granted, by a user who
    /// holds `everywhere` in every tenant (from [`everywhere`](Self::everywhere)).
    pub fn held<'a>(&self, granted: impl IntoIterator<Item = &'a str>, everywhere: &Held) -> Held {
        let mut held = everywhere.clone();
        for role in granted {
            if let Some(&n) = self.index.get(role) {
                held.union_with(&self.closure[n]);
            }
        }
        held
    }

    /// Whether a user granted `granted` in a tenant and `application` in the application
    /// tenant holds the declared role `role` there (`None`: the model does not declare
    /// it). No set is built: one bit test per granted role.
    pub fn holds_granted<'a>(
        &self,
        granted: impl IntoIterator<Item = &'a str>,
        application: impl IntoIterator<Item = &'a str>,
        role: &str,
    ) -> Option<bool> {
        let &n = self.index.get(role)?;
        Some(self.reaches(granted, application, |set| set.contains(n)))
    }

    /// Whether a user granted `granted` in a tenant and `application` in the application
    /// tenant has `permission` there: one AND per granted role, no set built.
    pub fn has_granted<'a>(
        &self,
        granted: impl IntoIterator<Item = &'a str>,
        application: impl IntoIterator<Item = &'a str>,
        permission: &str,
    ) -> bool {
        self.permissions
            .get(permission)
            .is_some_and(|mask| self.reaches(granted, application, |set| set.intersects(mask)))
    }

    /// Whether `test` holds for the closure of a role granted in the tenant, or for what a
    /// role granted in the application tenant reaches everywhere.
    fn reaches<'a>(
        &self,
        granted: impl IntoIterator<Item = &'a str>,
        application: impl IntoIterator<Item = &'a str>,
        test: impl Fn(&Held) -> bool,
    ) -> bool {
        let sets = |names: &mut dyn Iterator<Item = &'a str>, sets: &[Held]| {
            names.filter_map(|name| self.index.get(name)).any(|&n| test(&sets[n]))
        };
        sets(&mut granted.into_iter(), &self.closure)
            || sets(&mut application.into_iter(), &self.everywhere_from)
    }

    /// Whether a user who holds `held` (declared roles) and was granted the roles
    /// `granted` tests true for holds `role`: a declared role by its bit, any other
    /// exactly as granted.
    pub fn holds(&self, held: &Held, granted: impl FnOnce(&str) -> bool, role: &str) -> bool {
        match self.index.get(role) {
            Some(&n) => held.contains(n),
            None => granted(role),
        }
    }

    /// Whether a user who holds `held` has `permission`: one AND of the two sets.
    pub fn has(&self, held: &Held, permission: &str) -> bool {
        self.permissions.get(permission).is_some_and(|mask| mask.intersects(held))
    }

    /// The declared roles in `held` and the permissions they give, each sorted: what an
    /// expanded authorization object lists for a tenant.
    pub fn expand(&self, held: &Held) -> (Vec<&str>, Vec<&str>) {
        let mut roles: Vec<&str> =
            held.members().map(|n| self.spec.roles[n].name.as_str()).collect();
        roles.sort_unstable();
        let mut permissions: Vec<&str> = self
            .permissions
            .iter()
            .filter(|(_, mask)| mask.intersects(held))
            .map(|(name, _)| &**name)
            .collect();
        permissions.sort_unstable();
        (roles, permissions)
    }

    fn words(&self) -> usize {
        self.spec.roles.len().div_ceil(64).max(1)
    }
}

/// Every reference to a role the model does not declare.
fn unknown_roles(spec: &ModelSpec, index: &HashMap<Box<str>, usize>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut check = |place: String, line, names: &[String]| {
        for name in names.iter().filter(|name| !index.contains_key(name.as_str())) {
            let message = format!("names the role {name:?}, which the model does not declare");
            problems.push(Problem::at(place.clone(), line, message));
        }
    };
    for role in &spec.roles {
        check(role_place(&role.name, "includes"), role.line, &role.includes);
        check(role_place(&role.name, "in_every_tenant"), role.line, &role.in_every_tenant);
    }
    for permission in &spec.permissions {
        check(permission_place(&permission.name), permission.line, &permission.roles);
    }
    problems
}

/// The roles in an order where each comes after every role it includes; or a problem for
/// each cycle of `includes`, naming the roles around it.
fn topological(spec: &ModelSpec, includes: &[Vec<usize>]) -> Result<Vec<usize>, Vec<Problem>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; includes.len()];
    let mut order = Vec::with_capacity(includes.len());
    let mut problems = Vec::new();
    for start in 0..includes.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Depth first, without recursion (a chain may be 1,024 roles long): the path
        // from `start`, each role with the next of its includes to visit.
        let mut path = vec![(start, 0)];
        marks[start] = Mark::Open;
        while let Some((role, next)) = path.last_mut() {
            let role = *role;
            match includes[role].get(*next) {
                Some(&included) => {
                    *next += 1;
                    match marks[included] {
                        Mark::New => {
                            marks[included] = Mark::Open;
                            path.push((included, 0));
                        }
                        Mark::Open => {
                            let from = path.iter().position(|&(r, _)| r == included).unwrap_or(0);
                            let names: Vec<&str> = path[from..]
                                .iter()
                                .map(|&(r, _)| spec.roles[r].name.as_str())
                                .chain([spec.roles[included].name.as_str()])
                                .collect();
                            problems.push(Problem::at(
                                role_place(&spec.roles[role].name, "includes"),
                                spec.roles[role].line,
                                format!("a cycle: {}", names.join(" includes ")),
                            ));
                        }
                        Mark::Done => {}
                    }
                }
                None => {
                    marks[role] = Mark::Done;
                    order.push(role);
                    path.pop();
                }
            }
        }
    }
    if problems.is_empty() { Ok(order) } else { Err(problems) }
}
