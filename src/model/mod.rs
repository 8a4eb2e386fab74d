//! The model: a role hierarchy and permissions, defined once for every tenant (CONTRACT,
//! "The model").
//!
//! A user **holds** role R in tenant T when R is granted to them in T, or is included
//! (transitively) by a role they hold in T, or is in the `in_every_tenant` of a role they
//! hold in the application tenant. A user **has** permission P in T when they hold any
//! role listed for P. Roles the model does not declare are held exactly as granted.
//!
//! A [`ModelSpec`] is the model as written (a TOML file, or the API's message); checking
//! it ([`Model::compile`]) either refuses it whole, naming every problem with its place,
//! or compiles it: each role's closure (itself and what it includes) and each
//! permission's roles become bit sets over the declared roles, so "holds" is one bit test
//! and "has" one AND of the held set with the permission's mask (see [`compiled`]).

mod compiled;
mod spec;

pub use compiled::{Held, Model};
pub use spec::{MAX_PERMISSIONS, MAX_ROLES, ModelSpec, PermissionSpec, Problem, RoleSpec};

#[cfg(test)]
mod tests;
