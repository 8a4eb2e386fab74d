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

/// `rolecheck model check FILE`: the file's problems, one per line as `FILE:LINE: place:
/// message` (what an editor jumps to), or a one-line summary; whether it is a model.
pub fn check_file(path: &std::path::Path) -> (String, bool) {
    let name = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => return (format!("{name}: cannot read it: {err}\n"), false),
    };
    match ModelSpec::from_toml(&text).and_then(Model::compile) {
        Ok(model) => {
            let spec = model.spec();
            let summary = format!(
                "{name}: a model of {} roles and {} permissions{}\n",
                spec.roles.len(),
                spec.permissions.len(),
                if spec.strict { ", strict" } else { "" }
            );
            (summary, true)
        }
        Err(problems) => {
            let lines = problems.iter().map(|problem| match problem.line {
                Some(line) => format!("{name}:{line}: {}: {}\n", problem.place, problem.message),
                None => format!("{name}: {}: {}\n", problem.place, problem.message),
            });
            (lines.collect(), false)
        }
    }
}

#[cfg(test)]
mod tests;
